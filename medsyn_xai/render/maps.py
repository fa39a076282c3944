"""Volume helpers shared by the renderers: CT windows, entity lookup, heatmaps on the CT grid, overlap.

Every volume here is indexed (z, y, x) with the project's orientation: x runs from
the patient's right (x = 0) to left, y from anterior to posterior, z from inferior
to superior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsyn_xai.store import StudyStore

__all__ = [
    "BODY_HU",
    "TOP_FRACTION",
    "WINDOWS",
    "EntityNotFoundError",
    "Overlap",
    "check_window",
    "dice",
    "entities_of",
    "entity_heatmap",
    "find_entity",
    "format_slice_ranges",
    "joint_overlap",
    "peak_voxel",
    "resolve_entity",
    "scale_unit",
    "slice_ranges",
    "top_fraction_mask",
    "window_ct",
]

WINDOWS: dict[str, tuple[float, float]] = {"lung": (1500.0, -600.0), "mediastinum": (350.0, 50.0)}
"""Display windows as (width, level) in HU."""

BODY_HU = -500.0
"""Voxels with CT above this value in HU count as inside the body."""

TOP_FRACTION = 0.1
"""Fraction of voxels in a heatmap's "top" set used for Dice and overlap slices."""


class EntityNotFoundError(ValueError):
    """An entity text or index that the study does not hold."""


def check_window(window: str) -> tuple[float, float]:
    """Return (width, level) in HU of the window named ``window`` ("lung" or "mediastinum")."""
    if window not in WINDOWS:
        message = f"invalid window {window!r}: use one of {', '.join(WINDOWS)}, for example --window lung"
        raise ValueError(message)
    return WINDOWS[window]


def window_ct(ct: np.ndarray, window: str) -> np.ndarray:
    """Map HU values to display gray levels.

    Args:
        ct: CT values in HU, any shape and numeric dtype.
        window: "lung" (W 1500, L -600) or "mediastinum" (W 350, L 50).

    Returns:
        float32 array of ``ct``'s shape in [0, 1]: 0 at level - width / 2 and below,
        1 at level + width / 2 and above.
    """
    width, level = check_window(window)
    low = level - width / 2
    return np.clip((ct.astype(np.float32) - low) / width, 0.0, 1.0)


def entities_of(store: StudyStore) -> list[dict[str, Any]]:
    """Return the store's entity dicts, or an empty list when the NER step has not run."""
    return store.entities if store.has_entities else []


def find_entity(store: StudyStore, text: str) -> int:
    """Return the index of the first entity whose text equals ``text``, ignoring case and outer spaces.

    Raises:
        EntityNotFoundError: no entity has that text; the message lists the texts
            the store holds.
    """
    entities = entities_of(store)
    expected = text.strip().casefold()
    for index, entity in enumerate(entities):
        if str(entity.get("text", "")).strip().casefold() == expected:
            return index
    raise EntityNotFoundError(f"entity {text!r} is not in study {store.study_id!r}: {_available(store, entities)}")


def resolve_entity(store: StudyStore, entity: int | str) -> int:
    """Return the entity index of ``entity``: an index checked against the store, or a text for :func:`find_entity`."""
    if isinstance(entity, str):
        return find_entity(store, entity)
    entities = entities_of(store)
    if isinstance(entity, bool) or not isinstance(entity, (int, np.integer)) or not 0 <= entity < len(entities):
        message = (
            f"entity index {entity!r} is out of range for study {store.study_id!r} "
            f"with {len(entities)} entities: {_available(store, entities)}"
        )
        raise EntityNotFoundError(message)
    return int(entity)


def _available(store: StudyStore, entities: list[dict[str, Any]]) -> str:
    if not entities:
        return "the study has no entities, so run 'medsyn-xai explain' on it first"
    texts = ", ".join(repr(str(entity.get("text", ""))) for entity in entities)
    return f"use one of {texts}"


def entity_heatmap(store: StudyStore, index: int, *, heatmaps: np.ndarray | None = None) -> np.ndarray:
    """Return entity ``index``'s heatmap on the CT grid.

    Args:
        store: an open study with entities.
        index: entity index, 0-based.
        heatmaps: the store's float32 (E, Z', Y', X') heatmaps when already read,
            to save a read. Default: None (read from the store).

    Returns:
        float32 (Z, Y, X) mean attention probability. Heatmaps stored on another
        grid are resized trilinearly so index (z, y, x) is the same place as in the CT.
    """
    maps = store.entity_heatmaps if heatmaps is None else heatmaps
    grid = tuple(int(size) for size in store.ct.shape)
    heatmap = np.asarray(maps[index], dtype=np.float32)
    if heatmap.shape == grid:
        return heatmap
    import torch

    from medsyn_xai.saliency.resize import resize_maps

    resized = resize_maps(torch.from_numpy(heatmap)[None], grid)  # (1, Z, Y, X)
    return resized[0].numpy()


def peak_voxel(volume: np.ndarray) -> tuple[int, int, int]:
    """Return the (z, y, x) index of the maximum of a 3D ``volume``, or its centre when the volume is constant."""
    if volume.size == 0 or float(volume.max()) <= float(volume.min()):
        return tuple(int(size) // 2 for size in volume.shape)  # type: ignore[return-value]
    z, y, x = np.unravel_index(int(np.argmax(volume)), volume.shape)
    return int(z), int(y), int(x)


def scale_unit(volume: np.ndarray) -> np.ndarray:
    """Return ``volume`` scaled linearly to [0, 1] as float32. A constant volume becomes all zeros."""
    low, high = float(volume.min()), float(volume.max())
    if high <= low:
        return np.zeros(volume.shape, dtype=np.float32)
    return ((volume - low) / (high - low)).astype(np.float32)


def top_fraction_mask(volume: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Return the boolean mask of ``volume``'s top ``fraction`` of voxels.

    A voxel is in the set when its value is at or above the ``1 - fraction``
    quantile and above the volume's minimum. So a constant map has an empty set,
    and a map that is zero outside a small blob selects only the blob. Ties at
    the threshold can make the set a little larger than ``fraction``.

    Args:
        volume: float array, any shape.
        fraction: share of voxels to keep, in (0, 1]. Default: 0.1.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"invalid fraction {fraction!r}: pass a share of voxels in (0, 1], for example 0.1")
    if volume.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    threshold = float(np.quantile(volume, 1.0 - fraction))
    return (volume >= threshold) & (volume > float(volume.min()))


def dice(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Return the Dice coefficient 2 |A and B| / (|A| + |B|) of two boolean masks; 0.0 when both are empty."""
    total = int(mask_a.sum()) + int(mask_b.sum())
    if total == 0:
        return 0.0
    return 2.0 * int(np.logical_and(mask_a, mask_b).sum()) / total


def slice_ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Group sorted slice indices into inclusive runs: [2, 3, 4, 9] -> [(2, 4), (9, 9)]."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and index == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], int(index))
        else:
            ranges.append((int(index), int(index)))
    return ranges


def format_slice_ranges(ranges: Sequence[Sequence[int]]) -> str:
    """Write inclusive slice runs as text, for example "z 2-4, 9", or "none"."""
    if not ranges:
        return "none"
    parts = [str(start) if start == end else f"{start}-{end}" for start, end in ranges]
    return "z " + ", ".join(parts)


@dataclass(frozen=True)
class Overlap:
    """The overlap of two entity heatmaps: their joint map, Dice and shared axial slices.

    Attributes:
        joint: float32 (Z, Y, X) voxel-wise minimum of the two heatmaps after each
            is scaled to [0, 1]; unitless.
        dice: Dice coefficient of the two top-``fraction`` voxel sets.
        slices: inclusive runs (start, end) of axial slice indices z where both
            top sets share at least one voxel.
        fraction: share of voxels in each top set.
        n_a: voxels in the first top set.
        n_b: voxels in the second top set.
        n_both: voxels in both.
    """

    joint: np.ndarray
    dice: float
    slices: list[tuple[int, int]]
    fraction: float
    n_a: int
    n_b: int
    n_both: int


def joint_overlap(heatmap_a: np.ndarray, heatmap_b: np.ndarray, *, fraction: float = TOP_FRACTION) -> Overlap:
    """Compare two heatmaps on the same (Z, Y, X) grid.

    1. Scale each map to [0, 1] and take their voxel-wise minimum as the joint map.

    2. Select each map's own top ``fraction`` of voxels (:func:`top_fraction_mask`)
       and score the two sets with Dice.

    3. List the axial slices z where the two sets share a voxel, as runs.

    Args:
        heatmap_a: float (Z, Y, X) heatmap of the first entity.
        heatmap_b: float (Z, Y, X) heatmap of the second entity.
        fraction: share of voxels in each top set. Default: 0.1.
    """
    if heatmap_a.shape != heatmap_b.shape or heatmap_a.ndim != 3:
        message = (
            f"heatmaps of shapes {heatmap_a.shape} and {heatmap_b.shape} cannot be compared: "
            "pass two (Z, Y, X) maps on the same grid"
        )
        raise ValueError(message)
    joint = np.minimum(scale_unit(heatmap_a), scale_unit(heatmap_b))

    top_a = top_fraction_mask(heatmap_a, fraction)
    top_b = top_fraction_mask(heatmap_b, fraction)
    both = top_a & top_b

    overlap_slices = np.flatnonzero(both.any(axis=(1, 2)))  # (Z, Y, X) -> z indices with shared voxels
    return Overlap(
        joint=joint,
        dice=dice(top_a, top_b),
        slices=slice_ranges(overlap_slices.tolist()),
        fraction=fraction,
        n_a=int(top_a.sum()),
        n_b=int(top_b.sum()),
        n_both=int(both.sum()),
    )
