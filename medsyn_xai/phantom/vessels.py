"""Branching pulmonary artery trees grown from the hila into the lungs."""

from __future__ import annotations

import numpy as np

from medsyn_xai.phantom.geometry import Grid, normalize, sample_segments

__all__ = ["grow_artery_tree"]

# Murray's law gives a child/parent radius ratio of 2**(-1/3), about 0.79, for
# a symmetric split. Lengths shrink a little faster, so the tree stays in the lung.
_RADIUS_RATIO = 0.78
_LENGTH_RATIO = 0.8
_MAX_GENERATIONS = 9


def _perpendicular(directions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a random unit vector perpendicular to each row of (N, 3) ``directions``."""
    random = rng.standard_normal(directions.shape)
    random -= np.sum(random * directions, axis=1, keepdims=True) * directions
    return normalize(random)


def grow_artery_tree(
    grid: Grid,
    lung: np.ndarray,
    starts: np.ndarray,
    targets: np.ndarray,
    rng: np.random.Generator,
    *,
    root_radius_mm: float,
    min_radius_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Grow one bifurcating tree per root and return its tube samples.

    Each root runs from a hilum towards its target for 45% of the way. Every
    branch then splits in two, turning 20-40 degrees to either side with a pull
    away from the hilum. A branch whose end leaves the lung is halved, and dropped
    if its midpoint is outside too. Growth stops once radii fall below
    ``min_radius_mm``.

    Args:
        grid: the target grid.
        lung: (Z, Y, X) bool lung mask that branch ends must stay inside.
        starts: (R, 3) zyx root starts (hilum points) in mm.
        targets: (R, 3) zyx points in mm that the roots head for.
        rng: the random generator, advanced by this call.
        root_radius_mm: radius of the root segments in mm.
        min_radius_mm: thinnest branch drawn, in mm.

    Returns:
        (M, 3) zyx sample points in mm and (M,) radii in mm for
        :func:`~medsyn_xai.phantom.geometry.rasterize_tubes`.
    """
    starts = np.asarray(starts, dtype=np.float64)
    offsets = np.asarray(targets, dtype=np.float64) - starts
    hila = starts.copy()
    directions = normalize(offsets)
    lengths = 0.45 * np.linalg.norm(offsets, axis=1)
    radii = np.full(len(starts), root_radius_mm)
    step_mm = 0.5 * min(grid.spacing)

    segments: list[tuple[np.ndarray, ...]] = []
    for generation in range(_MAX_GENERATIONS):
        # 1. Place each branch end, halving branches that leave the lung.
        ends = starts + directions * lengths[:, None]
        if generation > 0:
            inside = grid.lookup(lung, ends)
            halves = starts + directions * (0.5 * lengths)[:, None]
            ends = np.where(inside[:, None], ends, halves)
            keep = inside | grid.lookup(lung, halves)
            starts, ends, directions, radii, lengths, hila = (
                array[keep] for array in (starts, ends, directions, radii, lengths, hila)
            )
        segments.append((starts, ends, radii, radii * 0.9))

        # 2. Split every branch that is still thick enough into two children.
        child_radii = radii * _RADIUS_RATIO
        thick = child_radii >= min_radius_mm
        if not np.any(thick):
            break
        ends, directions, lengths, hila = ends[thick], directions[thick], lengths[thick], hila[thick]
        count = len(ends)
        side = _perpendicular(directions, rng)
        outward = normalize(ends - hila)
        angles = rng.uniform(0.35, 0.7, size=(2, count, 1))
        first = np.cos(angles[0]) * directions + np.sin(angles[0]) * side + 0.3 * outward
        second = np.cos(angles[1]) * directions - np.sin(angles[1]) * side + 0.3 * outward

        starts = np.concatenate([ends, ends])
        directions = normalize(np.concatenate([first, second]))
        radii = np.concatenate([child_radii[thick], child_radii[thick]])
        lengths = np.concatenate([lengths, lengths]) * _LENGTH_RATIO * rng.uniform(0.85, 1.15, size=2 * count)
        hila = np.concatenate([hila, hila])

    all_starts, all_ends, start_radii, end_radii = (np.concatenate(parts) for parts in zip(*segments))
    return sample_segments(all_starts, all_ends, start_radii, end_radii, step_mm)
