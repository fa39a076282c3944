"""Axial slices of CT and heatmap blended in numpy, small enough to embed many in the HTML report.

Same display convention as :mod:`medsyn_xai.render.overlays`: the patient's right
is on the image's left and anterior at the top.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
import matplotlib.image
import numpy as np

from medsyn_xai.render.maps import window_ct
from medsyn_xai.render.overlays import HEAT_CMAP, OVERLAY_ALPHA, heat_range

__all__ = ["axial_slice_png", "overlay_rgb"]


def overlay_rgb(
    gray: np.ndarray, heat: np.ndarray, scale: tuple[float, float, float] | None, *, absent: bool = False
) -> np.ndarray:
    """Blend one heatmap slice over one windowed CT slice, without a figure.

    Args:
        gray: float (rows, columns) CT gray levels in [0, 1] (see :func:`window_ct`).
        heat: float (rows, columns) heatmap slice.
        scale: (low, high, threshold) of the whole map from :func:`heat_range`, or
            None to draw no overlay.
        absent: dim the overlay and keep it only on diagonal stripes. Default: False.

    Returns:
        uint8 (rows, columns, 3) RGB image.
    """
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # (rows, columns) -> (rows, columns, 3)
    if scale is not None:
        low, high, threshold = scale
        colours = matplotlib.colormaps[HEAT_CMAP](np.clip((heat - low) / (high - low), 0.0, 1.0))[..., :3]
        weight = np.where(heat >= threshold, OVERLAY_ALPHA["absent" if absent else "present"], 0.0)
        if absent:
            rows, columns = np.indices(heat.shape)
            weight = np.where((rows + columns) % 4 < 2, weight, 0.0)
        rgb = rgb * (1 - weight[..., None]) + colours * weight[..., None]
    return np.round(rgb * 255).astype(np.uint8)


def axial_slice_png(
    ct: np.ndarray,
    heatmap: np.ndarray,
    spacing_mm: Sequence[float],
    z: int,
    *,
    window: str = "lung",
    absent: bool = False,
    size_px: int = 256,
) -> bytes:
    """Return a small PNG of axial slice ``z``: CT in ``window`` with the heatmap blended in.

    Patient's right is on the image's left and anterior at the top. Pixels are
    repeated (nearest neighbour) so the longer side is about ``size_px`` pixels and
    the aspect follows ``spacing_mm``.

    Args:
        ct: (Z, Y, X) CT in HU.
        heatmap: float (Z, Y, X) map on the CT grid.
        spacing_mm: voxel size (z, y, x) in mm.
        z: axial slice index.
        window: "lung" or "mediastinum". Default: "lung".
        absent: dim and stripe the overlay, for a negated entity. Default: False.
        size_px: length of the longer side in pixels. Default: 256.
    """
    rgb = overlay_rgb(window_ct(ct[z], window), heatmap[z], heat_range(heatmap), absent=absent)
    _, size_y, size_x = spacing_mm
    height_mm, width_mm = rgb.shape[0] * float(size_y), rgb.shape[1] * float(size_x)
    scale = size_px / max(height_mm, width_mm)
    height, width = max(1, round(height_mm * scale)), max(1, round(width_mm * scale))
    rows = np.arange(height) * rgb.shape[0] // height
    columns = np.arange(width) * rgb.shape[1] // width
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, rgb[rows][:, columns], format="png")
    return buffer.getvalue()
