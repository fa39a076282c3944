"""Explanation metrics: how well a heatmap points at a ground-truth mask.

All functions take a heatmap and a mask of the same shape (any number of
dimensions; in this package (Z, Y, X) on the output grid). The heatmap is
non-negative float; the mask is boolean or 0/1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

__all__ = ["auroc", "mass_in_mask", "pointing_game"]


def _check(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from mask shape {mask.shape}: resize one to the other")
    if not np.all(np.isfinite(heatmap)):
        raise ValueError("heatmap contains NaN or infinite values")
    return heatmap, mask


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, *, tolerance: int = 0) -> bool:
    """Return True when the heatmap's maximum lies inside the mask.

    Args:
        heatmap: non-negative scores.
        mask: ground-truth region; an empty mask always misses.
        tolerance: voxels by which the mask is dilated first (0 = exact).
    """
    heatmap, mask = _check(heatmap, mask)
    if not mask.any():
        return False
    if tolerance > 0:
        mask = ndimage.binary_dilation(mask, iterations=tolerance)
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(mask[peak])


def mass_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Return the fraction of the heatmap's total mass inside the mask, in [0, 1].

    A heatmap with zero total mass returns 0.
    """
    heatmap, mask = _check(heatmap, mask)
    total = heatmap.sum()
    if total <= 0:
        return 0.0
    return float(heatmap[mask].sum() / total)


def auroc(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Return the area under the ROC curve of voxel scores against the mask.

    Computed from the Mann-Whitney rank statistic with ties counted as one half.
    Returns NaN when the mask is empty or covers every voxel.
    """
    heatmap, mask = _check(heatmap, mask)
    n_positive = int(mask.sum())
    n_negative = mask.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = rankdata(heatmap.ravel())
    positive_rank_sum = ranks[mask.ravel()].sum()
    return float((positive_rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))
