"""Regions of the phantom's findings, placed in the lobes, the pleural spaces and the pericardium.

Every function returns (Z, Y, X) bool masks on the phantom grid. Which voxels
stay visible after painting, and their HU, is decided in
:mod:`medsyn_xai.phantom.generate`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medsyn_xai.phantom.anatomy import Anatomy
from medsyn_xai.phantom.geometry import Grid, normalize, smooth_noise
from medsyn_xai.phantom.spec import LOBE_LABELS, LOBE_SIDES, SHORT_AXIS_RATIO, Finding, lobe_label

__all__ = [
    "CARDIOMEGALY_SCALE",
    "FINDING_HU",
    "PERICARDIAL_FLUID_MM",
    "heart_changes",
    "lobe_mask",
    "place_findings",
]

# HU painted for each finding. The anatomy paints pericardial effusion (as fluid)
# and cardiomegaly (as heart), so their values here are for reference.
FINDING_HU = {
    "nodule": 30.0,
    "mass": 35.0,
    "consolidation": 30.0,
    "ground_glass": -600.0,
    "atelectasis": 45.0,
    "pleural_effusion": 10.0,
    "pneumothorax": -1000.0,
    "emphysema": -955.0,
    "cardiomegaly": 40.0,
    "pericardial_effusion": 10.0,
}

# Cardiomegaly multiplies the heart's (z, long, short) semi-axes. With default
# anatomy at 128^3 this raises the cardiothoracic ratio (widest heart over widest
# lung-to-lung width) from 0.45 to 0.58, past the 0.5 that defines cardiomegaly.
CARDIOMEGALY_SCALE = (1.12, 1.3, 1.3)
PERICARDIAL_FLUID_MM = {None: 8.0, "small": 6.0, "moderate": 12.0, "large": 20.0}

# Pleural collections: (maximum thickness, craniocaudal reach) in mm.
_EFFUSION_MM = {"small": (20.0, 70.0), "moderate": (45.0, 130.0), "large": (80.0, 200.0)}
_PNEUMOTHORAX_MM = {None: 12.0, "small": 12.0, "moderate": 28.0, "large": 55.0}
_EMPHYSEMA_FRACTION = {"mild": 0.1, "moderate": 0.22, "severe": 0.4}
_LOBE_KINDS = ("nodule", "mass", "consolidation", "ground_glass", "atelectasis")
_SIDE_LABELS = {
    "right": (LOBE_LABELS["RUL"], LOBE_LABELS["RML"], LOBE_LABELS["RLL"]),
    "left": (LOBE_LABELS["LUL"], LOBE_LABELS["LLL"]),
}


def heart_changes(findings: tuple[Finding, ...],
                  spacing: tuple[float, float, float]) -> tuple[tuple[float, float, float], float]:
    """Return the heart's (z, long, short) scale and the pericardial fluid thickness in mm for these findings.

    The fluid is at least three quarters of the largest voxel size thick, so that
    an effusion still covers voxels on a coarse (z, y, x) ``spacing`` in mm.
    """
    scale = (1.0, 1.0, 1.0)
    fluid_mm = 0.0
    for finding in findings:
        if finding.drawn and finding.kind == "cardiomegaly":
            scale = CARDIOMEGALY_SCALE
        if finding.drawn and finding.kind == "pericardial_effusion":
            thickness = max(PERICARDIAL_FLUID_MM[finding.size], 0.75 * max(spacing))
            fluid_mm = max(fluid_mm, thickness)
    return scale, fluid_mm


def lobe_mask(lobes: np.ndarray, lingula: np.ndarray, lobe: str) -> np.ndarray:
    """Return the (Z, Y, X) bool voxels of a lobe name from :data:`~medsyn_xai.phantom.spec.FINDING_LOBES`."""
    mask = lobes == lobe_label(lobe)
    if lobe == "lingula":
        mask &= lingula
    return mask


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Return the slices of the smallest box holding every True voxel of a non-empty mask."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(slices)


def _box_around(grid: Grid, centre: np.ndarray, radius_mm: float) -> tuple[slice, ...]:
    """Return slices of the grid box reaching ``radius_mm`` around the voxel index ``centre``."""
    slices = []
    for axis in range(3):
        reach = int(np.ceil(radius_mm / grid.spacing[axis])) + 1
        slices.append(slice(max(int(centre[axis]) - reach, 0), min(int(centre[axis]) + reach + 1, grid.shape[axis])))
    return tuple(slices)


def _offsets_mm(grid: Grid, box: tuple[slice, ...], origin_mm: np.ndarray) -> list[np.ndarray]:
    """Return broadcastable z, y, x offsets in mm of the box's voxel centres from ``origin_mm``."""
    offsets = []
    for axis, part in enumerate(box):
        centres = (np.arange(part.start, part.stop) + 0.5) * grid.spacing[axis] - origin_mm[axis]
        offsets.append(centres.reshape([-1 if a == axis else 1 for a in range(3)]))
    return offsets


def _nodule_region(grid: Grid, lobe: np.ndarray, kind: str, diameter_mm: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Place a lobulated ellipsoid of axial long diameter ``diameter_mm`` inside the lobe."""
    radius = 0.5 * diameter_mm
    ratio = SHORT_AXIS_RATIO[kind]

    # 1. Choose a centre deep enough for the lesion, else the lobe's deepest voxels.
    box = _bounding_box(lobe)
    padded = np.pad(lobe[box], 1)
    depth = ndimage.distance_transform_edt(padded, sampling=grid.spacing)[1:-1, 1:-1, 1:-1]
    candidates = np.argwhere(depth >= radius + 2.0)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= 0.7 * depth.max())
    centre = candidates[rng.integers(len(candidates))] + np.array([part.start for part in box])

    # 2. Draw the ellipsoid, long axis in the axial plane, with a lobulated margin.
    around = _box_around(grid, centre, 1.4 * radius)
    dz, dy, dx = _offsets_mm(grid, around, grid.centre_of(centre))
    angle = rng.uniform(0.0, np.pi)
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    distance = np.sqrt((along / radius) ** 2 + (across / (ratio * radius)) ** 2 + (dz / (ratio * radius)) ** 2)
    lobulation = 0.1 if kind == "nodule" else 0.18
    local_shape = distance.shape
    margin = lobulation * smooth_noise(rng, local_shape, max(0.35 * radius, 1.0), grid.spacing)

    region = np.zeros(grid.shape, dtype=bool)
    region[around] = (distance + margin <= 1.0) & lobe[around]
    region[tuple(centre)] = True
    return region


def _airspace_region(grid: Grid, lobe: np.ndarray, fraction: float, roughness_mm: float,
                     patchiness: float, rng: np.random.Generator) -> np.ndarray:
    """Fill ``fraction`` of the lobe around a random seed voxel, with a noisy, patchy border."""
    box = _bounding_box(lobe)
    inside = lobe[box]
    voxels = np.argwhere(inside)
    seed = voxels[rng.integers(len(voxels))]
    dz, dy, dx = _offsets_mm(grid, box, grid.centre_of(seed + np.array([part.start for part in box])))
    distance = np.sqrt(dz**2 + dy**2 + dx**2)
    score = distance / max(float(distance[inside].max()), 1e-6)
    score = score + patchiness * smooth_noise(rng, inside.shape, roughness_mm, grid.spacing)
    threshold = np.quantile(score[inside], fraction)

    region = np.zeros(grid.shape, dtype=bool)
    region[box] = inside & (score <= threshold)
    return region


def _atelectasis_region(grid: Grid, lobe: np.ndarray, lung: np.ndarray, hilum: np.ndarray,
                        rng: np.random.Generator) -> np.ndarray:
    """Draw a wedge based on the lobe's pleural surface, pointing towards the hilum."""
    # 1. Choose a pleural surface voxel, favouring the dependent (posterior) lung.
    surface = lobe & ~ndimage.binary_erosion(lung)
    if not surface.any():
        surface = lobe & ~ndimage.binary_erosion(lobe)
    voxels = np.argwhere(surface)
    weights = voxels[:, 1] - voxels[:, 1].min() + 1.0
    base = voxels[rng.choice(len(voxels), p=weights / weights.sum())]
    base_mm = grid.centre_of(base)

    # 2. Keep lobe voxels inside a cone whose apex lies towards the hilum.
    axis = normalize((hilum - base_mm)[None])[0]
    depth = rng.uniform(25.0, 45.0)
    apex = base_mm + depth * axis
    around = _box_around(grid, base, depth + 10.0)
    dz, dy, dx = _offsets_mm(grid, around, apex)
    outward = -(dz * axis[0] + dy * axis[1] + dx * axis[2])
    length = np.sqrt(dz**2 + dy**2 + dx**2)
    cone = (outward >= np.cos(np.deg2rad(30.0)) * length) & (outward <= depth + 8.0)

    region = np.zeros(grid.shape, dtype=bool)
    region[around] = cone & lobe[around]
    region[tuple(base)] = True
    return region


def _column_edges(lung: np.ndarray, grid: Grid, axis: int, last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return the mm coordinate of the first (or last) lung voxel along ``axis`` in every column.

    Also returns which columns contain lung at all. Both arrays keep ``axis`` with length 1.
    """
    count = lung.shape[axis]
    if last:
        index = count - 1 - np.argmax(np.flip(lung, axis=axis), axis=axis)
    else:
        index = np.argmax(lung, axis=axis)
    edge_mm = (np.expand_dims(index, axis) + 0.5) * grid.spacing[axis]
    return edge_mm, np.expand_dims(lung.any(axis=axis), axis)


def _effusion_region(grid: Grid, side_lung: np.ndarray, size: str) -> np.ndarray:
    """Fill the dependent (posterior) basal lung of one side with a layer of fluid."""
    thickness, reach = _EFFUSION_MM[size]
    posterior_edge, has_lung = _column_edges(side_lung, grid, axis=1, last=True)
    depth_from_back = posterior_edge - grid.y
    base = (np.flatnonzero(side_lung.any(axis=(1, 2)))[0] + 0.5) * grid.spacing[0]
    layer = thickness * np.sqrt(np.clip(1.0 - (grid.z - base) / reach, 0.0, 1.0))
    return side_lung & has_lung & (depth_from_back <= layer)


def _pneumothorax_region(grid: Grid, side_lung: np.ndarray, side: str, size: str | None) -> np.ndarray:
    """Replace the non-dependent (anterior) and apical lung of one side with pleural air."""
    thickness = _PNEUMOTHORAX_MM[size]
    rows = np.flatnonzero(side_lung.any(axis=(1, 2)))
    base = (rows[0] + 0.5) * grid.spacing[0]
    apex = (rows[-1] + 0.5) * grid.spacing[0]
    height = np.clip((grid.z - base) / max(apex - base, 1e-6), 0.0, 1.0)
    layer = thickness * (0.5 + 0.5 * height)

    anterior_edge, has_lung = _column_edges(side_lung, grid, axis=1, last=False)
    region = side_lung & has_lung & (grid.y - anterior_edge <= layer)
    region |= side_lung & (grid.z >= apex - 0.8 * thickness)
    if size in ("moderate", "large"):
        # A bigger collection also peels the lung off the lateral chest wall.
        lateral_edge, _ = _column_edges(side_lung, grid, axis=2, last=side == "left")
        region |= side_lung & (np.abs(grid.x - lateral_edge) <= 0.6 * layer)
    return region


def _emphysema_region(grid: Grid, lung: np.ndarray, extent: str, zone: str,
                      rng: np.random.Generator) -> np.ndarray:
    """Mark clustered low-attenuation voxels covering an extent-dependent fraction of the zone's lung."""
    rows = np.flatnonzero(lung.any(axis=(1, 2)))
    middle = 0.5 * (rows[0] + rows[-1] + 1) * grid.spacing[0]
    zone_mask = lung.copy()
    if zone == "upper":
        zone_mask &= grid.z >= middle
    if zone == "lower":
        zone_mask &= grid.z < middle
    if not zone_mask.any():
        zone_mask = lung
    sigma = 7.0 if extent == "severe" else 4.0
    noise = smooth_noise(rng, grid.shape, sigma, grid.spacing)
    threshold = np.quantile(noise[zone_mask], 1.0 - _EMPHYSEMA_FRACTION[extent])
    return zone_mask & (noise >= threshold)


def _side_mask(lobes: np.ndarray, side: str) -> np.ndarray:
    return np.isin(lobes, _SIDE_LABELS[side])


def place_findings(grid: Grid, anatomy: Anatomy, findings: tuple[Finding, ...], seed: int) -> list[np.ndarray]:
    """Return one (Z, Y, X) bool region per finding, empty for absent ones.

    Pleural collections are placed first because they take lung away. Lobe
    findings then go into what is left of their lobe, or into the whole lobe
    when a collection has filled it. Each finding draws from its own random
    stream ``default_rng([seed, 100 + index])``, so adding a finding does not
    move the others.
    """
    regions = [np.zeros(grid.shape, dtype=bool) for _ in findings]
    generators = [np.random.default_rng([seed, 100 + index]) for index in range(len(findings))]

    # 1. Pleural effusions, then pneumothoraces in the lung the fluid left.
    lobes = anatomy.lobes.copy()
    for kind in ("pleural_effusion", "pneumothorax"):
        for index, finding in enumerate(findings):
            if not finding.drawn or finding.kind != kind:
                continue
            sides = ("right", "left") if finding.side == "bilateral" else (finding.side,)
            for side in sides:
                side_lung = _side_mask(lobes, side)
                if not side_lung.any():
                    continue
                if kind == "pleural_effusion":
                    regions[index] |= _effusion_region(grid, side_lung, finding.size)
                else:
                    regions[index] |= _pneumothorax_region(grid, side_lung, side, finding.size)
            lobes[regions[index]] = 0

    # 2. Lobe findings and emphysema in the remaining lung.
    for index, finding in enumerate(findings):
        rng = generators[index]
        if not finding.drawn:
            continue
        if finding.kind == "emphysema" and (lobes > 0).any():
            regions[index] = _emphysema_region(grid, lobes > 0, finding.extent, finding.zone, rng)
        if finding.kind not in _LOBE_KINDS:
            continue
        lobe = lobe_mask(lobes, anatomy.lingula, finding.lobe)
        if not lobe.any():
            lobe = lobe_mask(anatomy.lobes, anatomy.lingula, finding.lobe)
        if not lobe.any() and finding.lobe == "lingula":
            lobe = anatomy.lobes == LOBE_LABELS["LUL"]
        if finding.kind in ("nodule", "mass"):
            regions[index] = _nodule_region(grid, lobe, finding.kind, float(finding.size_mm), rng)
        if finding.kind == "consolidation":
            regions[index] = _airspace_region(grid, lobe, rng.uniform(0.35, 0.8), 12.0, 0.15, rng)
        if finding.kind == "ground_glass":
            regions[index] = _airspace_region(grid, lobe, rng.uniform(0.25, 0.6), 8.0, 0.5, rng)
        if finding.kind == "atelectasis":
            hilum = anatomy.hila[LOBE_SIDES[finding.lobe]]
            regions[index] = _atelectasis_region(grid, lobe, anatomy.lobes > 0, hilum, rng)

    # 3. Heart findings, already drawn by the anatomy.
    for index, finding in enumerate(findings):
        if finding.drawn and finding.kind == "cardiomegaly":
            regions[index] = anatomy.heart & ~anatomy.heart_normal
        if finding.drawn and finding.kind == "pericardial_effusion":
            regions[index] = anatomy.pericardial_fluid.copy()
    return regions
