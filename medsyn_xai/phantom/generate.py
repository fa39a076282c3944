"""Compose anatomy and findings into a synthetic chest CT with its masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsyn_xai.phantom.anatomy import HU, Anatomy, build_anatomy
from medsyn_xai.phantom.findings import FINDING_HU, heart_changes, place_findings
from medsyn_xai.phantom.geometry import make_grid
from medsyn_xai.phantom.spec import LOBE_LABELS, PhantomSpec, sample_anatomy

__all__ = ["CT_RANGE_HU", "MASK_KEYS", "Phantom", "generate_phantom"]

CT_RANGE_HU = (-1024, 3071)
MASK_KEYS = ("lobes", "airway", "vessels", "lesion")

# Random streams, each seeded with [spec.seed, stream]. Findings use stream 100 + index.
_ANATOMY_PARAMS_STREAM = 0
_ANATOMY_STREAM = 1
_NOISE_STREAM = 2

# Painting order: a later layer covers an earlier one where they overlap, and
# only the voxels a layer still shows at the end stay in its mask.
_PAINT_ORDER = (
    "emphysema",
    "ground_glass",
    "vessels",
    "consolidation",
    "atelectasis",
    "airway",
    "pleural_effusion",
    "pneumothorax",
    "nodule",
    "mass",
)
# Amplitude in HU of the smooth texture added inside each painted finding.
_TEXTURE_HU = {"emphysema": 6.0, "ground_glass": 35.0, "consolidation": 15.0, "atelectasis": 12.0,
               "pleural_effusion": 4.0, "nodule": 12.0, "mass": 15.0}
_COLLAPSED_LUNG_HU = 40.0
_SIDE_LABELS = {
    "right": (LOBE_LABELS["RUL"], LOBE_LABELS["RML"], LOBE_LABELS["RLL"]),
    "left": (LOBE_LABELS["LUL"], LOBE_LABELS["LLL"]),
}
_PARTIAL_VOLUME_MM = 2.0
_NOISE_HU = 12.0


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic chest CT with ground-truth masks.

    Attributes:
        ct: int16 (Z, Y, X) HU clipped to [-1024, 3071]. Axes are zyx: x from the
            patient's right (x=0) to left, y from anterior (y=0) to posterior,
            z from inferior (z=0) to superior.
        masks: uint8 (Z, Y, X) arrays keyed "lobes" (labels 0-5, see
            :data:`~medsyn_xai.phantom.spec.LOBE_LABELS`), "airway", "vessels" and
            "lesion" (0/1). The lesion mask is the union of ``finding_masks``.
        finding_masks: one bool (Z, Y, X) mask per ``spec.findings`` entry, in the
            same order. Absent findings have all-False masks.
        spec: the spec the phantom was generated from.
        spacing_mm: (z, y, x) voxel size in mm.
    """

    ct: np.ndarray
    masks: dict[str, np.ndarray]
    finding_masks: list[np.ndarray]
    spec: PhantomSpec
    spacing_mm: tuple[float, float, float]


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in shape):
        message = f"shape must be three ints (Z, Y, X), got {shape!r}"
        raise ValueError(message)
    if min(shape) < 8:
        message = f"shape must be at least 8 voxels along each axis, got {shape!r}; use e.g. (16, 16, 16)"
        raise ValueError(message)
    return tuple(int(n) for n in shape)


def _paint_layers(hu: np.ndarray, anatomy: Anatomy, spec: PhantomSpec, regions: list[np.ndarray],
                  pleural: np.ndarray) -> list[tuple[str, np.ndarray, int | None]]:
    """Paint vessels, airways and finding regions into ``hu`` in :data:`_PAINT_ORDER`.

    Returns the painted layers as (name, bool mask, finding index or None) in
    painting order. Vessels and airways stop at pleural air or fluid.
    """
    layers: list[tuple[str, np.ndarray, int | None]] = []
    for name in _PAINT_ORDER:
        if name == "vessels":
            layers.append((name, anatomy.vessels & ~pleural, None))
            continue
        if name == "airway":
            layers.append((name, anatomy.airway & ~pleural, None))
            continue
        for index, (finding, region) in enumerate(zip(spec.findings, regions)):
            if finding.kind == name:
                layers.append((name, region, index))

    for name, mask, _ in layers:
        if name == "vessels":
            # Thin vessels fill part of a voxel, so their HU lies between lung and blood.
            fill = anatomy.vessel_fill[mask]
            hu[mask] += fill * (HU["blood"] - hu[mask])
        elif name == "airway":
            hu[anatomy.airway_wall & ~pleural] = HU["muscle"]
            fill = anatomy.airway_fill[mask]
            hu[mask] += fill * (HU["air"] - hu[mask])
        else:
            hu[mask] = FINDING_HU[name] + _TEXTURE_HU.get(name, 0.0) * anatomy.texture[mask]
    return layers


def generate_phantom(spec: PhantomSpec, shape: tuple[int, int, int] = (64, 64, 64)) -> Phantom:
    """Generate the chest CT and masks that ``spec`` describes.

    The field of view is always 320 x 384 x 384 mm (z, y, x), so the spacing is
    that divided by ``shape`` and every shape shows the same anatomy. The same
    spec and shape always give bit-identical arrays.

    Cardiomegaly's mask, and so its lesion voxels, is the heart volume added to
    the normal-size heart. Every other drawn finding's mask is the voxels it
    painted that no later finding covered.

    Args:
        spec: findings, seed and optional anatomy parameters.
        shape: (Z, Y, X) voxel counts, each at least 8. Default (64, 64, 64),
            which gives a (5, 6, 6) mm spacing.

    Returns:
        The :class:`Phantom`.
    """
    shape = _check_shape(shape)
    if not isinstance(spec, PhantomSpec):
        message = f"spec must be a PhantomSpec, got {type(spec).__name__}; build one with PhantomSpec(seed=...)"
        raise TypeError(message)
    grid = make_grid(shape)

    # 1. Anatomy, with the heart enlarged or wrapped in fluid for drawn heart findings.
    params = spec.anatomy
    if params is None:
        params = sample_anatomy(np.random.default_rng([spec.seed, _ANATOMY_PARAMS_STREAM]))
    heart_scale, pericardial_fluid_mm = heart_changes(spec.findings, grid.spacing)
    anatomy = build_anatomy(grid, params, np.random.default_rng([spec.seed, _ANATOMY_STREAM]),
                            heart_scale=heart_scale, pericardial_fluid_mm=pericardial_fluid_mm)

    # 2. Finding regions, and the lung that pleural air or fluid leaves behind.
    regions = place_findings(grid, anatomy, spec.findings, spec.seed)
    pleural = np.zeros(shape, dtype=bool)
    for finding, region in zip(spec.findings, regions):
        if finding.kind in ("pleural_effusion", "pneumothorax"):
            pleural |= region
    lobes = np.where(pleural, 0, anatomy.lobes).astype(np.uint8)

    hu = anatomy.hu
    for finding, region in zip(spec.findings, regions):
        if finding.drawn and finding.kind == "pneumothorax":
            # The lung that collapsed away from the air contains less air, so it is denser.
            collapsed = np.isin(lobes, _SIDE_LABELS[finding.side])
            hu[collapsed] += _COLLAPSED_LUNG_HU

    # 3. Paint layers in order and keep, per layer, the voxels it still shows.
    layers = _paint_layers(hu, anatomy, spec, regions, pleural)
    visible: dict[str | int, np.ndarray] = {}
    covered = np.zeros(shape, dtype=bool)
    for name, mask, index in reversed(layers):
        visible[name if index is None else index] = mask & ~covered
        covered |= mask

    # 4. Partial-volume blur over about 2 mm, then white quantum noise.
    sigma = [_PARTIAL_VOLUME_MM / s for s in grid.spacing]
    if max(sigma) >= 0.15:
        hu = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")
    noise_rng = np.random.default_rng([spec.seed, _NOISE_STREAM])
    hu += _NOISE_HU * noise_rng.standard_normal(shape, dtype=np.float32)
    ct = np.clip(np.rint(hu), *CT_RANGE_HU).astype(np.int16)

    # 5. Masks.
    # Heart findings are not repainted, so their regions are already what shows.
    finding_masks = [visible.get(index, region) for index, region in enumerate(regions)]
    lesion = np.zeros(shape, dtype=bool)
    for mask in finding_masks:
        lesion |= mask
    masks = {
        "lobes": lobes,
        "airway": visible["airway"].astype(np.uint8),
        "vessels": visible["vessels"].astype(np.uint8),
        "lesion": lesion.astype(np.uint8),
    }
    return Phantom(ct=ct, masks=masks, finding_masks=finding_masks, spec=spec, spacing_mm=grid.spacing)
