"""Voxel grid and shape rasterisers shared by the anatomy and finding generators.

All coordinates are millimetres in array order (z, y, x): x runs from the
patient's right to left, y from anterior to posterior, z from inferior to
superior. Voxel i along an axis has its centre at ``(i + 0.5) * spacing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "FIELD_OF_VIEW_MM",
    "Grid",
    "make_grid",
    "normalize",
    "rasterize_tubes",
    "sample_polyline",
    "sample_segments",
    "smooth_noise",
    "tube_fill",
    "tube_radii",
]

# Every shape covers the same body region, so the spacing is this field of
# view divided by the shape: (5, 6, 6) mm at 64^3 and (20, 24, 24) mm at 16^3.
FIELD_OF_VIEW_MM = (320.0, 384.0, 384.0)


@dataclass(frozen=True, eq=False)
class Grid:
    """Voxel-centre coordinates of a (Z, Y, X) volume.

    Attributes:
        shape: (Z, Y, X) voxel counts.
        spacing: (z, y, x) voxel size in mm.
        z: (Z, 1, 1) float32 voxel-centre z in mm, ready to broadcast.
        y: (1, Y, 1) float32 voxel-centre y in mm.
        x: (1, 1, X) float32 voxel-centre x in mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    def voxel_index(self, points_mm: np.ndarray) -> np.ndarray:
        """Return the (N, 3) int64 index of the voxel containing each (N, 3) zyx point, clipped to the grid."""
        index = np.floor(np.asarray(points_mm) / np.asarray(self.spacing)).astype(np.int64)
        return np.clip(index, 0, np.asarray(self.shape) - 1)

    def lookup(self, mask: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
        """Return the (N,) bool value of ``mask`` at each (N, 3) zyx point, False for points off the grid."""
        points_mm = np.asarray(points_mm)
        raw = np.floor(points_mm / np.asarray(self.spacing)).astype(np.int64)
        on_grid = np.all((raw >= 0) & (raw < np.asarray(self.shape)), axis=1)
        index = self.voxel_index(points_mm)
        return on_grid & mask[index[:, 0], index[:, 1], index[:, 2]]

    def centre_of(self, index: np.ndarray) -> np.ndarray:
        """Return the zyx mm centre of the voxels at (N, 3) or (3,) integer index."""
        return (np.asarray(index) + 0.5) * np.asarray(self.spacing)


def make_grid(shape: tuple[int, int, int]) -> Grid:
    """Build the grid for ``shape`` (Z, Y, X) covering :data:`FIELD_OF_VIEW_MM`."""
    spacing = tuple(float(fov / n) for fov, n in zip(FIELD_OF_VIEW_MM, shape))
    axes = [((np.arange(n, dtype=np.float32) + 0.5) * s) for n, s in zip(shape, spacing)]
    return Grid(
        shape=tuple(int(n) for n in shape),
        spacing=spacing,
        z=axes[0][:, None, None],
        y=axes[1][None, :, None],
        x=axes[2][None, None, :],
    )


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row of an (N, 3) array to unit length, leaving zero rows at zero."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-9)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float,
                 spacing: tuple[float, ...]) -> np.ndarray:
    """Draw Gaussian noise smoothed over ``sigma_mm``, rescaled to unit standard deviation.

    Returns a float32 array of ``shape``. The correlation length is the same in
    millimetres at every grid size.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma_voxels = [sigma_mm / s for s in spacing]
    smooth = ndimage.gaussian_filter(white, sigma=sigma_voxels, mode="nearest")
    spread = float(smooth.std())
    if spread > 0.0:
        smooth /= spread
    return smooth


def sample_segments(starts: np.ndarray, ends: np.ndarray, start_radii: np.ndarray,
                    end_radii: np.ndarray, step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample points along straight tube segments, at most ``step_mm`` apart.

    Args:
        starts: (N, 3) zyx segment starts in mm.
        ends: (N, 3) zyx segment ends in mm.
        start_radii: (N,) radius in mm at each start.
        end_radii: (N,) radius in mm at each end. The radius varies linearly in between.
        step_mm: largest gap between neighbouring samples.

    Returns:
        (M, 3) float64 sample points and (M,) radii in mm.
    """
    lengths = np.linalg.norm(ends - starts, axis=1)
    counts = np.ceil(lengths / step_mm).astype(np.int64) + 1
    owner = np.repeat(np.arange(len(starts)), counts)
    first = np.cumsum(counts) - counts
    position = np.arange(counts.sum()) - np.repeat(first, counts)
    fraction = position / np.maximum(np.repeat(counts, counts) - 1, 1)

    points = starts[owner] + fraction[:, None] * (ends[owner] - starts[owner])
    radii = start_radii[owner] + fraction * (end_radii[owner] - start_radii[owner])
    return points, radii


def sample_polyline(vertices: np.ndarray, radii: np.ndarray,
                    step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample a tube through (K, 3) zyx ``vertices`` in mm with (K,) ``radii`` in mm."""
    vertices = np.asarray(vertices, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    return sample_segments(vertices[:-1], vertices[1:], radii[:-1], radii[1:], step_mm)


def tube_radii(grid: Grid, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Return the tube radius in mm at every voxel a tube covers, and 0 elsewhere.

    A voxel is covered when its centre lies within its nearest sample point's radius.

    Each voxel is tested against the sample point that a Euclidean distance
    transform finds nearest, so the union of spheres is exact away from junctions
    of tubes with very different radii. The voxel containing each sample is always
    marked, so tubes thinner than a voxel still appear as a one-voxel line. Callers
    drop samples that are too thin to show.

    Args:
        grid: the target grid.
        points: (N, 3) zyx sample points in mm, as from :func:`sample_segments`.
        radii: (N,) tube radius in mm at each sample.

    Returns:
        (Z, Y, X) float32 radius in mm of the covering sample, 0 where no tube is.
    """
    radius_map = np.zeros(grid.shape, dtype=np.float32)
    if len(points) == 0:
        return radius_map
    spacing = np.asarray(grid.spacing)
    shape = np.asarray(grid.shape)

    # 1. Crop to the box the tubes can reach.
    low = np.floor((points - radii[:, None]).min(axis=0) / spacing).astype(np.int64) - 1
    high = np.ceil((points + radii[:, None]).max(axis=0) / spacing).astype(np.int64) + 1
    low = np.clip(low, 0, shape)
    high = np.clip(high, 0, shape)
    if np.any(high <= low):
        return radius_map
    crop_shape = tuple(high - low)

    # 2. Keep one sample per voxel, the widest, so the seed choice is deterministic.
    on_grid = np.all((points >= 0) & (points < shape * spacing), axis=1)
    voxel = np.floor(points[on_grid] / spacing).astype(np.int64) - low
    inside_crop = np.all((voxel >= 0) & (voxel < np.asarray(crop_shape)), axis=1)
    voxel = voxel[inside_crop]
    kept_points = points[on_grid][inside_crop]
    kept_radii = radii[on_grid][inside_crop]
    if len(voxel) == 0:
        return radius_map
    flat = np.ravel_multi_index(voxel.T, crop_shape)
    order = np.lexsort((-kept_radii, flat))
    _, first = np.unique(flat[order], return_index=True)
    chosen = order[first]
    seed_id = np.full(crop_shape, -1, dtype=np.int64)
    seed_id.flat[flat[chosen]] = chosen

    # 3. Find each voxel's nearest seed and compare the exact distance with its radius.
    nearest = ndimage.distance_transform_edt(
        seed_id < 0, sampling=spacing, return_distances=False, return_indices=True
    )
    owner = seed_id[nearest[0], nearest[1], nearest[2]]
    centres = [
        ((np.arange(low[axis], high[axis]) + 0.5) * spacing[axis]).reshape(
            [-1 if a == axis else 1 for a in range(3)]
        )
        for axis in range(3)
    ]
    squared = sum((centres[axis] - kept_points[owner, axis]) ** 2 for axis in range(3))
    covered = (squared <= kept_radii[owner] ** 2) | (seed_id >= 0)
    crop = np.where(covered, kept_radii[owner], 0.0)

    radius_map[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = crop
    return radius_map


def rasterize_tubes(grid: Grid, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Return the (Z, Y, X) bool mask of the voxels that :func:`tube_radii` covers."""
    return tube_radii(grid, points, radii) > 0.0


def tube_fill(grid: Grid, radius_map: np.ndarray) -> np.ndarray:
    """Estimate the fraction of each voxel a tube fills, from :func:`tube_radii` output.

    The estimate is the tube's cross-section over a voxel face, capped at 1, so
    a 1 mm artery in a 6 mm voxel fills about a tenth of it. Returns float32 in [0, 1].
    """
    face_mm2 = float(np.prod(grid.spacing)) ** (2.0 / 3.0)
    return np.minimum(np.pi * radius_map.astype(np.float32) ** 2 / face_mm2, 1.0)
