"""Pictures of a study: tri-planar entity overlays, joint maps, the token chart and the HTML report.

``render_entity(store, 0)`` returns a PNG of the first entity's heatmap on the CT;
``build_report(store)`` returns one self-contained HTML page. Volumes follow the
project's (z, y, x) orientation; images follow the radiological convention
(patient's right on the image's left). See :mod:`medsyn_xai.render.overlays`.
"""

from medsyn_xai.render.charts import TOKEN_CHART_SIZE_PX, TokenMass, render_token_chart, token_mass
from medsyn_xai.render.maps import (
    TOP_FRACTION,
    WINDOWS,
    EntityNotFoundError,
    dice,
    entity_heatmap,
    find_entity,
    joint_overlap,
    top_fraction_mask,
)
from medsyn_xai.render.overlays import (
    TRIPLANAR_SIZE_PX,
    VIEWS,
    Triplanar,
    entity_triplanar,
    joint_triplanar,
    panel_index,
    render_entity,
    render_joint,
    slice_panels,
)
from medsyn_xai.render.report import build_report

__all__ = [
    "TOKEN_CHART_SIZE_PX",
    "TOP_FRACTION",
    "TRIPLANAR_SIZE_PX",
    "VIEWS",
    "WINDOWS",
    "EntityNotFoundError",
    "TokenMass",
    "Triplanar",
    "build_report",
    "dice",
    "entity_heatmap",
    "entity_triplanar",
    "find_entity",
    "joint_overlap",
    "joint_triplanar",
    "panel_index",
    "render_entity",
    "render_joint",
    "render_token_chart",
    "slice_panels",
    "token_mass",
    "top_fraction_mask",
]
