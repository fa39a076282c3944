"""Tri-planar heatmap overlays on the CT: one entity, or the joint map of two entities.

Display convention (radiological): in axial and coronal views the patient's right
is on the image's left, so voxel x = 0 is the leftmost column. Axial views have
anterior at the top. Coronal and sagittal views have superior at the top, and
sagittal views have anterior on the left. Pixel aspect follows ``spacing_mm``, so
anatomy keeps its proportions.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no
global backend switch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import structlog
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from medsyn_xai.render.figures import literal, new_figure, png_bytes
from medsyn_xai.render.maps import (
    TOP_FRACTION,
    check_window,
    entities_of,
    entity_heatmap,
    format_slice_ranges,
    joint_overlap,
    peak_voxel,
    resolve_entity,
    window_ct,
)
from medsyn_xai.store import StudyStore

__all__ = [
    "HEAT_CMAP",
    "HEAT_THRESHOLD",
    "OVERLAY_ALPHA",
    "TRIPLANAR_DPI",
    "TRIPLANAR_SIZE_PX",
    "VIEWS",
    "Triplanar",
    "draw_triplanar",
    "entity_status",
    "entity_title",
    "entity_triplanar",
    "heat_range",
    "joint_triplanar",
    "panel_aspect",
    "panel_index",
    "render_entity",
    "render_joint",
    "slice_panels",
]

log = structlog.get_logger(__name__)

VIEWS = ("axial", "coronal", "sagittal")

TRIPLANAR_SIZE_PX = (1500, 520)
"""Width and height in pixels of every tri-planar PNG."""

TRIPLANAR_DPI = 100

HEAT_CMAP = "inferno"

HEAT_THRESHOLD = 0.1
"""Heatmap values below min + HEAT_THRESHOLD * (max - min) of the whole map are drawn transparent.

The threshold is relative to the map's range rather than to zero because attention
maps carry a baseline of about 1 / T everywhere.
"""

HEATMAP_UNITS = "mean attention probability"
JOINT_UNITS = "min of both heatmaps scaled to [0, 1]"

OVERLAY_ALPHA = {"present": 0.6, "uncertain": 0.6, "absent": 0.3}
"""Opacity of the heatmap overlay by entity assertion."""
_STATUS = {
    "absent": ("ABSENT (negated): the report rules this out; overlay dimmed and hatched", "#c00000"),
    "uncertain": ("UNCERTAIN (hedged in the report)", "#c06000"),
    "present": ("present", "#006000"),
}
# Edge letters (left, right, top, bottom) of each view, in the patient's frame.
_EDGE_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
# Figure-fraction rectangles (left, bottom, width, height); each image shrinks inside its own to keep its aspect.
_PANEL_RECTS = {
    "axial": (0.02, 0.04, 0.28, 0.78),
    "coronal": (0.31, 0.04, 0.28, 0.78),
    "sagittal": (0.60, 0.04, 0.28, 0.78),
}
_COLORBAR_RECT = (0.905, 0.08, 0.012, 0.70)


def slice_panels(volume: np.ndarray, voxel: Sequence[int]) -> dict[str, np.ndarray]:
    """Cut the three orthogonal slices through ``voxel``, each in screen order.

    Row 0 of every panel is the top of the image and column 0 its left edge.

    Args:
        volume: (Z, Y, X) array, any dtype.
        voxel: (z, y, x) index the slices pass through.

    Returns:
        "axial": (Y, X) slice z, rows anterior to posterior, columns patient right to left;
        "coronal": (Z, X) slice y, rows superior to inferior, columns right to left;
        "sagittal": (Z, Y) slice x, rows superior to inferior, columns anterior to posterior.
    """
    z, y, x = (int(value) for value in voxel)
    return {
        "axial": volume[z],
        "coronal": volume[::-1, y, :],  # flip z so superior is row 0
        "sagittal": volume[::-1, :, x],
    }


def panel_index(view: str, shape_zyx: Sequence[int], voxel: Sequence[int]) -> tuple[int, int]:
    """Return the (row, column) of voxel (z, y, x) in the panel of ``view`` cut by :func:`slice_panels`."""
    z, y, x = (int(value) for value in voxel)
    top_row = int(shape_zyx[0]) - 1 - z
    positions = {"axial": (y, x), "coronal": (top_row, x), "sagittal": (top_row, y)}
    if view not in positions:
        raise ValueError(f"invalid view {view!r}: use one of {', '.join(VIEWS)}")
    return positions[view]


def panel_aspect(view: str, spacing_mm: Sequence[float]) -> float:
    """Return the height / width ratio of one panel pixel: row spacing over column spacing in mm."""
    size_z, size_y, size_x = (float(value) for value in spacing_mm)
    ratios = {"axial": size_y / size_x, "coronal": size_z / size_x, "sagittal": size_z / size_y}
    if view not in ratios:
        raise ValueError(f"invalid view {view!r}: use one of {', '.join(VIEWS)}")
    return ratios[view]


def heat_range(heatmap: np.ndarray) -> tuple[float, float, float] | None:
    """Return (low, high, threshold) of a heatmap's colour scale, or None for a constant map.

    low and high are the map's minimum and maximum. Voxels below ``threshold``
    (``low + HEAT_THRESHOLD * (high - low)``) stay transparent, and a constant map
    is not drawn at all.
    """
    low, high = float(heatmap.min()), float(heatmap.max())
    if high <= low:
        return None
    return low, high, low + HEAT_THRESHOLD * (high - low)


@dataclass(frozen=True)
class Triplanar:
    """A rendered tri-planar PNG and where each panel landed in it.

    Attributes:
        png: PNG bytes of ``TRIPLANAR_SIZE_PX`` (1500 x 520) pixels.
        voxel: (z, y, x) the three slices pass through.
        shape_zyx: CT grid (Z, Y, X) in voxels.
        boxes: view -> (left, top, right, bottom) of the image area in PNG pixels,
            origin at the top-left corner.
    """

    png: bytes
    voxel: tuple[int, int, int]
    shape_zyx: tuple[int, int, int]
    boxes: dict[str, tuple[float, float, float, float]]

    def pixel_of(self, view: str, voxel: Sequence[int]) -> tuple[float, float]:
        """Return the PNG (row, column) in pixels of the centre of ``voxel`` in ``view``'s panel.

        ``voxel`` must lie in the panel's slice, for example ``self.voxel``.
        """
        row, column = panel_index(view, self.shape_zyx, voxel)
        rows, columns = _panel_shape(view, self.shape_zyx)
        left, top, right, bottom = self.boxes[view]
        return top + (row + 0.5) * (bottom - top) / rows, left + (column + 0.5) * (right - left) / columns


def _panel_shape(view: str, shape_zyx: Sequence[int]) -> tuple[int, int]:
    size_z, size_y, size_x = (int(value) for value in shape_zyx)
    return {"axial": (size_y, size_x), "coronal": (size_z, size_x), "sagittal": (size_z, size_y)}[view]


def draw_triplanar(
    ct: np.ndarray,
    heatmap: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    voxel: Sequence[int] | None = None,
    window: str = "lung",
    title: str = "",
    status: tuple[str, str] | None = None,
    absent: bool = False,
    units: str = HEATMAP_UNITS,
) -> Triplanar:
    """Draw CT slices with a heatmap overlay through one voxel and return the PNG.

    Args:
        ct: int16 or float (Z, Y, X) CT in HU.
        heatmap: float (Z, Y, X) map on the CT grid, in ``units``.
        spacing_mm: voxel size (z, y, x) in mm.
        voxel: (z, y, x) the slices pass through. Default: None (the heatmap's maximum).
        window: CT display window, "lung" or "mediastinum". Default: "lung".
        title: first title line. Default: "".
        status: (text, colour) of the second title line. Default: None.
        absent: dim the overlay and hatch it, for a negated entity. Default: False.
        units: colorbar label. Default: "mean attention probability".

    Returns:
        A :class:`Triplanar` of 1500 x 520 pixels at 100 dpi.
    """
    if ct.ndim != 3 or heatmap.shape != ct.shape:
        message = (
            f"invalid heatmap of shape {heatmap.shape} for CT of shape {ct.shape}: "
            "resize the heatmap to the CT grid first (see entity_heatmap)"
        )
        raise ValueError(message)
    check_window(window)
    point = peak_voxel(heatmap) if voxel is None else tuple(int(value) for value in voxel)
    if not all(0 <= value < size for value, size in zip(point, ct.shape)):
        raise ValueError(f"invalid voxel {point}: pass a (z, y, x) index inside the CT grid {ct.shape}")

    # 1. Cut the same three slices from the CT and the heatmap.
    gray_panels = slice_panels(window_ct(ct, window), point)
    heat_panels = slice_panels(heatmap, point)
    scale = heat_range(heatmap)
    norm = Normalize(vmin=0.0, vmax=1.0) if scale is None else Normalize(vmin=scale[0], vmax=scale[1])
    cmap = matplotlib.colormaps[HEAT_CMAP]
    alpha = OVERLAY_ALPHA["absent" if absent else "present"]

    # 2. Draw each panel: gray CT, then the heatmap above the threshold.
    figure = new_figure(TRIPLANAR_SIZE_PX, TRIPLANAR_DPI)
    axes = {}
    for view in VIEWS:
        ax = figure.add_axes(_PANEL_RECTS[view])
        aspect = panel_aspect(view, spacing_mm)
        ax.imshow(gray_panels[view], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect=aspect)
        hot = np.zeros(heat_panels[view].shape, bool) if scale is None else heat_panels[view] >= scale[2]
        overlay = np.ma.masked_array(heat_panels[view], mask=~hot)
        ax.imshow(overlay, cmap=cmap, norm=norm, alpha=alpha, interpolation="nearest", aspect=aspect)
        if absent and hot.any():
            _hatch(ax, hot)
        _label_panel(ax, view, point)
        axes[view] = ax

    # 3. Colorbar with units, and the title lines.
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=figure.add_axes(_COLORBAR_RECT))
    colorbar.set_label(literal(units))
    figure.text(0.5, 0.965, literal(title), ha="center", va="center", fontsize=13, fontweight="bold")
    if status is not None:
        text, colour = status
        figure.text(0.5, 0.915, literal(text), ha="center", va="center", fontsize=11, color=colour, fontweight="bold")

    # 4. Save, then read back where each image landed (origin top-left, in pixels).
    png = png_bytes(figure)
    height_px = TRIPLANAR_SIZE_PX[1]
    boxes = {}
    for view, ax in axes.items():
        extent = ax.get_window_extent()
        boxes[view] = (float(extent.x0), height_px - float(extent.y1), float(extent.x1), height_px - float(extent.y0))
    shape = tuple(int(size) for size in ct.shape)
    return Triplanar(png=png, voxel=point, shape_zyx=shape, boxes=boxes)  # type: ignore[arg-type]


def _hatch(ax: Any, region: np.ndarray) -> None:
    """Hatch ``region`` (rows, columns) of an image axes in white."""
    rows, columns = region.shape
    contours = ax.contourf(
        np.arange(columns), np.arange(rows), region.astype(np.float32),
        levels=[0.5, 1.5], colors="none", hatches=["///"],
    )
    contours.set_edgecolor("white")
    contours.set_linewidth(0.0)


def _label_panel(ax: Any, view: str, voxel: Sequence[int]) -> None:
    """Add the panel title with its slice index and the four orientation letters."""
    z, y, x = voxel
    index = {"axial": f"z = {z}", "coronal": f"y = {y}", "sagittal": f"x = {x}"}[view]
    ax.set_title(f"{view}  {index}", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    left, right, top, bottom = _EDGE_LETTERS[view]
    placements = [(0.03, 0.5, left, "left", "center"), (0.97, 0.5, right, "right", "center"),
                  (0.5, 0.97, top, "center", "top"), (0.5, 0.03, bottom, "center", "bottom")]
    for x_pos, y_pos, letter, horizontal, vertical in placements:
        ax.text(
            x_pos, y_pos, letter, transform=ax.transAxes, ha=horizontal, va=vertical,
            color="white", fontsize=12, fontweight="bold", path_effects=outline,
        )


def entity_title(store: StudyStore, entity: dict[str, Any]) -> str:
    """Return the first title line of an entity's figure: text, label, assertion and study id."""
    assertion = entity.get("assertion", "present")
    return f"{entity.get('text', '')}  ({entity.get('label', '?')}, {assertion})  study {store.study_id}"


def entity_status(entity: dict[str, Any], hidden_tokens: Sequence[int] = ()) -> tuple[str, str]:
    """Return the (text, colour) status line of an entity from its assertion and token coverage.

    ``hidden_tokens`` are the study's token positions hidden from the model as
    negated (the store attribute of that name).
    """
    text, colour = _STATUS.get(str(entity.get("assertion", "present")), _STATUS["present"])
    token_indices = entity.get("token_indices") or []
    uncovered = entity.get("covered") is False or ("token_indices" in entity and not token_indices)
    if uncovered:
        text = f"{text}; no token covers this entity, so its heatmap is zero"
    elif token_indices and set(token_indices) <= set(hidden_tokens):
        text = f"{text}; its tokens were hidden from the model, so its heatmap is zero"
    return text, colour


def entity_triplanar(
    store: StudyStore, index: int | str, *, window: str = "lung", heatmaps: np.ndarray | None = None
) -> Triplanar:
    """Render one entity's heatmap through its maximum voxel.

    Args:
        store: an open study with entities.
        index: entity index, or its text (see :func:`find_entity`).
        window: CT window "lung" (W 1500, L -600) or "mediastinum" (W 350, L 50). Default: "lung".
        heatmaps: the store's float32 (E, Z', Y', X') heatmaps when already read, so
            a loop over entities reads them once. Default: None (read from the store).

    Returns:
        A :class:`Triplanar` of 1500 x 520 pixels.
    """
    check_window(window)
    position = resolve_entity(store, index)
    entity = store.entities[position]
    heatmap = entity_heatmap(store, position, heatmaps=heatmaps)
    result = draw_triplanar(
        store.ct, heatmap, store.spacing_mm, window=window, title=entity_title(store, entity),
        status=entity_status(entity, store.attrs.get("hidden_tokens") or ()),
        absent=entity.get("assertion") == "absent",
    )
    log.debug("entity_rendered", study_id=store.study_id, entity=position, voxel=list(result.voxel), window=window)
    return result


def render_entity(store: StudyStore, index: int | str, *, window: str = "lung") -> bytes:
    """Return a 1500 x 520 pixel PNG of one entity's heatmap on the CT (see :func:`entity_triplanar`)."""
    return entity_triplanar(store, index, window=window).png


def joint_triplanar(
    store: StudyStore, a: int | str, b: int | str, *, window: str = "lung", fraction: float = TOP_FRACTION
) -> tuple[Triplanar, dict[str, Any]]:
    """Render where two entities' heatmaps are both high, and measure their overlap.

    The joint map is the voxel-wise minimum of the two heatmaps after each is
    scaled to [0, 1] (:func:`joint_overlap`), drawn through its maximum voxel.

    Args:
        store: an open study with entities.
        a: first entity, as index or text.
        b: second entity, as index or text.
        window: CT window, "lung" or "mediastinum". Default: "lung".
        fraction: share of voxels in each map's top set. Default: 0.1.

    Returns:
        The :class:`Triplanar` (1500 x 520 pixels) and a dict with keys a, b (entity
        texts), dice (float in [0, 1]), fraction, slices (inclusive [start, end]
        axial runs on the CT grid where both top sets share voxels), n_a, n_b, n_both.
    """
    check_window(window)
    first, second = resolve_entity(store, a), resolve_entity(store, b)
    entities = entities_of(store)
    heatmaps = store.entity_heatmaps
    overlap = joint_overlap(
        entity_heatmap(store, first, heatmaps=heatmaps),
        entity_heatmap(store, second, heatmaps=heatmaps),
        fraction=fraction,
    )
    text_a, text_b = (str(entities[position].get("text", "")) for position in (first, second))
    percent = f"{fraction * 100:g} %"
    title = (
        f"'{text_a}' and '{text_b}': Dice of top-{percent} sets {overlap.dice:.2f}; "
        f"overlap on axial slices {format_slice_ranges(overlap.slices)}"
    )
    assertions = [str(entities[position].get("assertion", "present")) for position in (first, second)]
    labels = [str(entities[position].get("label", "?")) for position in (first, second)]
    negated = "absent" in assertions
    status_text = f"{labels[0]}, {assertions[0]}  x  {labels[1]}, {assertions[1]}"
    if negated:
        status_text = f"{status_text}: ABSENT (negated) entity involved; overlay dimmed and hatched"
    status = (status_text, _STATUS["absent"][1] if negated else "#303030")
    result = draw_triplanar(
        store.ct, overlap.joint, store.spacing_mm, window=window, title=title,
        status=status, absent=negated, units=JOINT_UNITS,
    )
    summary = {
        "a": text_a,
        "b": text_b,
        "dice": overlap.dice,
        "fraction": fraction,
        "slices": [[start, end] for start, end in overlap.slices],
        "n_a": overlap.n_a,
        "n_b": overlap.n_b,
        "n_both": overlap.n_both,
    }
    return result, summary


def render_joint(
    store: StudyStore, a: int | str, b: int | str, *, window: str = "lung"
) -> tuple[bytes, dict[str, Any]]:
    """Return the joint-map PNG (1500 x 520 pixels) of two entities and their overlap dict.

    See :func:`joint_triplanar` for the map and the keys of the dict (dice, slices, ...).
    """
    result, summary = joint_triplanar(store, a, b, window=window)
    return result.png, summary
