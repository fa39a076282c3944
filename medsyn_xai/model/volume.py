"""Conversion between model channels in [-1, 1] and CT (HU) plus mask volumes.

Channel 0 is the CT: HU clipped to [-1024, 600] and scaled linearly to [-1, 1].
Every other channel is a mask: a label map with labels 0..n scaled to [-1, 1]
(n = 5 for "lobes"), or a binary mask where 1 maps to +1 and 0 to -1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["HU_MIN", "HU_MAX", "LABEL_COUNTS", "decode_volume", "encode_volume", "hu_to_unit", "unit_to_hu"]

HU_MIN = -1024.0
HU_MAX = 600.0
LABEL_COUNTS = {"lobes": 5}


def hu_to_unit(hu: np.ndarray | torch.Tensor):
    """Map HU to [-1, 1] after clipping to [HU_MIN, HU_MAX]."""
    if isinstance(hu, torch.Tensor):
        return (hu.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN) * 2 - 1
    return (np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN) * 2 - 1


def unit_to_hu(unit: np.ndarray | torch.Tensor):
    """Map [-1, 1] back to HU in [HU_MIN, HU_MAX]."""
    return (unit + 1) / 2 * (HU_MAX - HU_MIN) + HU_MIN


def encode_volume(ct_hu: np.ndarray, masks: dict[str, np.ndarray], channel_names: tuple[str, ...]) -> np.ndarray:
    """Stack a CT and its masks into model channels.

    Args:
        ct_hu: (Z, Y, X) CT in HU.
        masks: name -> (Z, Y, X) integer mask; every name in ``channel_names[1:]``
            must be present.
        channel_names: channel order, CT first.

    Returns:
        (C, Z, Y, X) float32 in [-1, 1].
    """
    channels = [hu_to_unit(ct_hu.astype(np.float32))]
    for name in channel_names[1:]:
        if name not in masks:
            raise KeyError(f"mask '{name}' is missing: the model expects channels {', '.join(channel_names)}")
        n_labels = LABEL_COUNTS.get(name, 1)
        channels.append(masks[name].astype(np.float32) / n_labels * 2 - 1)
    return np.stack(channels).astype(np.float32)


def decode_volume(
    x0: torch.Tensor,
    channel_names: tuple[str, ...],
    grid: tuple[int, int, int],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Turn a sampled x0 into a CT in HU and masks on the output grid.

    The CT and binary masks are resized trilinearly (``align_corners=False``)
    before rounding or thresholding at 0; label maps are resized with nearest
    neighbour so no label is invented between two others.

    Args:
        x0: (1, C, F, H, W) float in [-1, 1].
        channel_names: C names, CT first.
        grid: output (Z, Y, X).

    Returns:
        CT int16 (Z, Y, X) in HU within [-1024, 600], and name -> uint8 (Z, Y, X).
    """
    if x0.shape[1] != len(channel_names):
        raise ValueError(
            f"model has {x0.shape[1]} output channels but {len(channel_names)} channel names "
            f"({', '.join(channel_names)}): set model.channel_names to match"
        )
    x0 = x0.detach().to("cpu", torch.float32)
    size = tuple(int(s) for s in grid)
    smooth = F.interpolate(x0, size=size, mode="trilinear", align_corners=False)[0]
    nearest = F.interpolate(x0, size=size, mode="nearest")[0]

    ct = torch.round(unit_to_hu(smooth[0].clamp(-1, 1))).clamp(HU_MIN, HU_MAX).to(torch.int16).numpy()

    masks = {}
    for index, name in enumerate(channel_names[1:], start=1):
        n_labels = LABEL_COUNTS.get(name, 1)
        if n_labels == 1:
            masks[name] = (smooth[index] > 0).to(torch.uint8).numpy()
        else:
            labels = torch.round((nearest[index].clamp(-1, 1) + 1) / 2 * n_labels)
            masks[name] = labels.to(torch.uint8).numpy()
    return ct, masks
