"""Resizing of coarse attention maps to the CT grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_maps"]


def resize_maps(maps: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Resize a stack of 3D maps trilinearly to ``grid`` in one call.

    Each axis gets its own scale (``align_corners=False``), so the map and a CT of
    shape ``grid`` cover the same field of view and index (z, y, x) is the same
    place in both.

    Args:
        maps: (N, d, h, w) float tensor, for example one map per token or entity.
        grid: output (Z, Y, X) in voxels.

    Returns:
        (N, Z, Y, X) float32 tensor on the device of ``maps``.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (N, d, h, w), got {tuple(maps.shape)}")
    if len(grid) != 3 or any(int(size) < 1 for size in grid):
        raise ValueError(f"grid must be three positive sizes (Z, Y, X), got {grid}")
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *grid), dtype=torch.float32)
    resized = F.interpolate(
        maps[:, None].to(torch.float32),  # (N, 1, d, h, w): channels for interpolate
        size=tuple(int(size) for size in grid),
        mode="trilinear",
        align_corners=False,
    )
    return resized[:, 0]
