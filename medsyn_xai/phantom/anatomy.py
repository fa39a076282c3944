"""Normal chest anatomy of the phantom: body wall, lungs and lobes, mediastinum and bones.

Landmarks are written once in canonical millimetres for the 320 x 384 x 384 mm
field of view and stretched per patient by :class:`~medsyn_xai.phantom.spec.AnatomyParams`,
so every grid size shows the same anatomy at its own resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsyn_xai.phantom.geometry import Grid, sample_polyline, smooth_noise, tube_fill, tube_radii
from medsyn_xai.phantom.spec import LOBE_LABELS, AnatomyParams
from medsyn_xai.phantom.vessels import grow_artery_tree

__all__ = ["HU", "Anatomy", "build_anatomy"]

# Attenuation of each tissue in Hounsfield units, for a CT without contrast.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "mediastinal_fat": -90.0,
    "muscle": 40.0,
    "lung_anterior": -865.0,
    "lung_posterior": -810.0,
    "blood": 40.0,
    "esophagus": 40.0,
    "liver": 58.0,
    "abdomen": 35.0,
    "fluid": 10.0,
    "vertebral_body": 450.0,
    "cortical_bone": 700.0,
    "disc": 80.0,
    "spinal_canal": 15.0,
    "sternum": 500.0,
}

# Canonical coordinates are stretched about this zyx point in mm.
_PIVOT = np.array([40.0, 196.0, 192.0])

# Tube centre lines as canonical (z, y, x, radius) rows in mm.
_AORTA = (
    (150, 150, 200, 15), (195, 143, 202, 16), (225, 145, 204, 15), (243, 160, 208, 14),
    (250, 185, 214, 14), (243, 210, 220, 13), (225, 224, 225, 12), (180, 226, 225, 12),
    (100, 226, 223, 12), (-10, 224, 218, 12),
)
_PULMONARY_TRUNK = ((145, 128, 196, 13), (185, 150, 205, 13), (198, 168, 206, 12))
_RIGHT_PULMONARY_ARTERY = ((198, 168, 206, 10), (196, 170, 175, 10), (190, 175, 150, 9), (185, 180, 138, 8))
_LEFT_PULMONARY_ARTERY = ((198, 168, 206, 10), (218, 185, 226, 10), (205, 205, 246, 8))
_TRACHEA = ((330, 182, 192, 9), (220, 185, 192, 9))
_RIGHT_MAIN_BRONCHUS = ((220, 185, 192, 6.5), (200, 190, 160, 6.5), (190, 195, 140, 6))
_LEFT_MAIN_BRONCHUS = ((220, 185, 192, 6), (205, 192, 220, 6), (192, 198, 245, 5.5))
_ESOPHAGUS = ((330, 205, 190, 7), (150, 210, 196, 7), (40, 212, 205, 7))
_AIRWAY_WALL_MM = 2.0

# Lobar bronchi run from the end of each main bronchus towards these canonical zyx points.
_LOBAR_BRONCHUS_TARGETS = {
    "right": ((225, 190, 122), (165, 160, 122), (150, 215, 128)),
    "left": ((225, 185, 258), (172, 165, 260), (150, 215, 255)),
}
# Artery tree roots head from each hilum towards a lattice of canonical zyx points
# spread through each lung: four heights, three depths, one lateral position.
_ARTERY_TARGETS = {
    side: tuple((z, y, x) for z in (90.0, 150.0, 210.0, 265.0) for y in (135.0, 190.0, 245.0))
    for side, x in (("right", 100.0), ("left", 284.0))
}

# Heart as a canonical ellipsoid whose long axis points 35 degrees from the
# left towards the anterior wall, like the cardiac apex.
_HEART_CENTRE = (110.0, 150.0, 215.0)
_HEART_SEMI_AXES = (48.0, 62.0, 45.0)  # z, long axis, short axis in mm
_HEART_ANGLE = np.deg2rad(35.0)
_PERICARDIAL_FAT_MM = 3.0

# Thoracic cavity (inner rib cage) as a canonical ellipse: centre y, x and semi-axes.
_CAVITY = (196.0, 192.0, 86.0, 126.0)
_MEDIASTINUM_HALF_WIDTH = 20.0
_VERTEBRA_PERIOD = 26.0
_RIB_PERIOD = 25.0


@dataclass(eq=False)
class Anatomy:
    """One normal chest before findings are painted. Every array is (Z, Y, X).

    Attributes:
        hu: float32 HU of everything except pulmonary vessels and airways, which
            the caller paints after the parenchymal findings.
        lobes: uint8 lobe labels 0-5 (see :data:`~medsyn_xai.phantom.spec.LOBE_LABELS`).
        lingula: bool, the lingular part of the left upper lobe.
        heart: bool, the heart as drawn (enlarged when cardiomegaly was requested).
        heart_normal: bool, the heart at its normal size.
        pericardial_fluid: bool, the pericardial effusion shell (empty without one).
        vessels: bool, pulmonary trunk, hilar arteries and the branches inside the lungs.
        vessel_fill: float32 fraction of each voxel the vessels fill, for partial-volume HU.
        airway: bool, air lumen of trachea, main and lobar bronchi.
        airway_fill: float32 fraction of each voxel the airway lumen fills.
        airway_wall: bool, soft-tissue wall around ``airway``.
        texture: float32 smooth unit-variance noise used for lung and lesion texture.
        hila: zyx mm of the right and left hilum, keyed "right" and "left".
    """

    hu: np.ndarray
    lobes: np.ndarray
    lingula: np.ndarray
    heart: np.ndarray
    heart_normal: np.ndarray
    pericardial_fluid: np.ndarray
    vessels: np.ndarray
    vessel_fill: np.ndarray
    airway: np.ndarray
    airway_fill: np.ndarray
    airway_wall: np.ndarray
    texture: np.ndarray
    hila: dict[str, np.ndarray]


@dataclass(frozen=True)
class _Frame:
    """Stretch from canonical millimetres to this patient's millimetres, per zyx axis."""

    scale: np.ndarray

    def to_case(self, points: np.ndarray) -> np.ndarray:
        return _PIVOT + (np.asarray(points, dtype=np.float64) - _PIVOT) * self.scale

    def length(self, mm: float | np.ndarray) -> float | np.ndarray:
        return mm * float(np.sqrt(self.scale[1] * self.scale[2]))

    def tube(self, grid: Grid, rows: tuple, widen_mm: float = 0.0) -> np.ndarray:
        """Return the float32 radius map of a canonical (z, y, x, radius) polyline, 0 off the tube."""
        table = np.asarray(rows, dtype=np.float64)
        points, radii = sample_polyline(self.to_case(table[:, :3]), self.length(table[:, 3]) + widen_mm,
                                        0.5 * min(grid.spacing))
        return tube_radii(grid, points, radii)


def _canonical_axes(grid: Grid, frame: _Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return canonical z (Z,1,1), y (1,Y,1) and x (1,1,X) in mm of the grid's voxel centres."""
    z = _PIVOT[0] + (grid.z - _PIVOT[0]) / frame.scale[0]
    y = _PIVOT[1] + (grid.y - _PIVOT[1]) / frame.scale[1]
    x = _PIVOT[2] + (grid.x - _PIVOT[2]) / frame.scale[2]
    return z, y, x


def _diaphragm_height(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Return the (1, Y, X) canonical z in mm of the diaphragm domes, the right one higher."""
    right = x < _PIVOT[2]
    apex = np.where(right, 78.0, 66.0)
    dx = x - np.where(right, 122.0, 262.0)
    dy = y - 180.0
    return apex - 0.0045 * dx**2 - 0.0022 * dy**2 - 0.22 * np.maximum(dy, 0.0)


def _heart_quadric(z: np.ndarray, y: np.ndarray, x: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Return the heart ellipsoid's quadratic form, at most 1 inside, for canonical zyx semi-axes."""
    cz, cy, cx = _HEART_CENTRE
    cos, sin = np.cos(_HEART_ANGLE), np.sin(_HEART_ANGLE)
    along = (x - cx) * cos - (y - cy) * sin
    across = (x - cx) * sin + (y - cy) * cos
    return ((z - cz) / semi_axes[0]) ** 2 + (along / semi_axes[1]) ** 2 + (across / semi_axes[2]) ** 2


def _spine_and_ribs(hu: np.ndarray, inside_wall: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray,
                    cavity_radius: np.ndarray, cavity_offset_y: np.ndarray) -> np.ndarray:
    """Paint vertebrae, ribs and sternum into ``hu`` and return the (Z, Y, X) bool spine mask that the lungs avoid."""
    # 1. Vertebral bodies with a cortical rim, discs every 26 mm, canal and posterior elements.
    centre_distance = np.sqrt((x - 192.0) ** 2 + (y - 240.0) ** 2)
    canal_distance = np.sqrt((x - 192.0) ** 2 + (y - 268.0) ** 2)
    phase = np.mod(z, _VERTEBRA_PERIOD)
    body = np.broadcast_to(centre_distance <= 19.0, hu.shape)
    hu[body] = HU["vertebral_body"]
    hu[body & np.broadcast_to(centre_distance > 16.0, hu.shape)] = HU["cortical_bone"]
    hu[body & np.broadcast_to(phase < 5.0, hu.shape)] = HU["disc"]

    lamina = (canal_distance > 8.0) & (canal_distance <= 14.0) & (y > 262.0)
    spinous = (np.abs(x - 192.0) < 4.0) & (y >= 276.0) & (y <= 290.0)
    transverse = (np.abs(y - 258.0) < 5.0) & (np.abs(x - 192.0) < 36.0) & (phase > 8.0) & (phase < 18.0)
    posterior = (lamina | spinous | transverse) & inside_wall
    hu[np.broadcast_to(posterior, hu.shape)] = HU["cortical_bone"]
    hu[np.broadcast_to(canal_distance <= 8.0, hu.shape)] = HU["spinal_canal"]

    # 2. Ribs: one band outside the cavity, sloping down by 55 mm from the spine to the front.
    sine = np.clip(cavity_offset_y / np.maximum(cavity_radius, 1e-6), -1.0, 1.0)
    rib_band = (cavity_radius >= 1.03) & (cavity_radius <= 1.11) & (sine > -0.93)
    rib_phase = z + 55.0 * (1.0 - sine) / 2.0
    ribs = rib_band & (np.mod(rib_phase, _RIB_PERIOD) < 9.0) & (rib_phase > 40.0) & inside_wall
    hu[ribs] = HU["cortical_bone"]

    # 3. Sternum in front of the cavity.
    sternum = (np.abs(x - 192.0) < 17.0) & (y >= 96.0) & (y <= 107.0) & (z >= 140.0) & (z <= 300.0)
    hu[np.broadcast_to(sternum, hu.shape) & inside_wall] = HU["sternum"]

    spine = (centre_distance <= 24.0) | (canal_distance <= 16.0)
    return np.broadcast_to(spine, hu.shape)


def _split_lobes(lung: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the lungs into five lobes by tilted fissure planes.

    Returns uint8 (Z, Y, X) labels, the bool lingula mask, and the float32
    distance in canonical mm from the nearest fissure plane.
    """
    # The x tilt turns each oblique fissure so that its lateral end lies more
    # anterior, as on axial CT.
    tilt = np.array([-0.45, 0.45]) + rng.uniform(-0.15, 0.15, size=2)
    offset = rng.uniform(-8.0, 8.0, size=3)
    horizontal_tilt = rng.uniform(-0.1, 0.1, size=2)

    # Oblique fissures rise from the anterior diaphragm to the posterior upper chest,
    # so lower lobes are posterior and inferior.
    right_oblique = 55.0 + 1.15 * (y - 115.0) + tilt[0] * (x - 118.0) + offset[0]
    left_oblique = 50.0 + 1.07 * (y - 110.0) + tilt[1] * (x - 266.0) + offset[1]
    horizontal = 165.0 + horizontal_tilt[0] * (y - 150.0) + horizontal_tilt[1] * (x - 118.0) + offset[2]
    right = x < _PIVOT[2]

    oblique = np.where(right, right_oblique, left_oblique)
    below_oblique = z < oblique
    below_horizontal = z < horizontal
    lobes = np.zeros(lung.shape, dtype=np.uint8)
    right_lung = lung & right
    left_lung = lung & ~right
    lobes[right_lung & below_oblique] = LOBE_LABELS["RLL"]
    lobes[right_lung & ~below_oblique & below_horizontal] = LOBE_LABELS["RML"]
    lobes[right_lung & ~below_oblique & ~below_horizontal] = LOBE_LABELS["RUL"]
    lobes[left_lung & below_oblique] = LOBE_LABELS["LLL"]
    lobes[left_lung & ~below_oblique] = LOBE_LABELS["LUL"]

    lingula = (lobes == LOBE_LABELS["LUL"]) & (z < 150.0 - 0.25 * (y - 150.0))

    oblique_slope = np.where(right, np.hypot(1.15, tilt[0]), np.hypot(1.07, tilt[1]))
    oblique_distance = np.abs(z - oblique) / np.sqrt(1.0 + oblique_slope**2)
    horizontal_distance = np.where(right & ~below_oblique, np.abs(z - horizontal), np.inf)
    fissure_distance = np.minimum(oblique_distance, horizontal_distance).astype(np.float32)
    return lobes, lingula, fissure_distance


def _heart_masks(z: np.ndarray, y: np.ndarray, x: np.ndarray, heart_size: float,
                 heart_scale: tuple[float, float, float],
                 pericardial_fluid_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (Z, Y, X) bool masks of the normal heart, the drawn heart, pericardial fluid and the whole sac."""
    semi_axes = np.asarray(_HEART_SEMI_AXES) * heart_size
    heart_normal = _heart_quadric(z, y, x, semi_axes) <= 1.0
    heart = (_heart_quadric(z, y, x, semi_axes * np.asarray(heart_scale)) <= 1.0) | heart_normal
    fluid_axes = semi_axes * np.asarray(heart_scale) + pericardial_fluid_mm
    pericardial_fluid = (_heart_quadric(z, y, x, fluid_axes) <= 1.0) & ~heart
    sac = _heart_quadric(z, y, x, fluid_axes + _PERICARDIAL_FAT_MM) <= 1.0
    return heart_normal, heart, pericardial_fluid, sac


def _add_lobar_bronchi(grid: Grid, frame: _Frame, lumen_radius: np.ndarray,
                       outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add lobar bronchi to the central airways' lumen radius map and outer-wall mask; return both."""
    step_mm = 0.5 * min(grid.spacing)
    radius = frame.length(np.array([4.5, 3.5]))
    for side, bronchus in (("right", _RIGHT_MAIN_BRONCHUS), ("left", _LEFT_MAIN_BRONCHUS)):
        start = frame.to_case(np.asarray(bronchus[-1][:3], dtype=np.float64))
        for target in frame.to_case(np.asarray(_LOBAR_BRONCHUS_TARGETS[side], dtype=np.float64)):
            points, radii = sample_polyline(np.stack([start, target]), radius, step_mm)
            lumen_radius = np.maximum(lumen_radius, tube_radii(grid, points, radii))
            outer = outer | (tube_radii(grid, points, radii + _AIRWAY_WALL_MM) > 0.0)
    return lumen_radius, outer


def _artery_tree_radius(grid: Grid, frame: _Frame, lung: np.ndarray, hila: dict[str, np.ndarray],
                        rng: np.random.Generator) -> np.ndarray:
    """Grow both lungs' artery trees from the hila and return their float32 (Z, Y, X) radius map in mm."""
    starts = np.concatenate([np.repeat(hila[side][None], len(_ARTERY_TARGETS[side]), axis=0)
                             for side in ("right", "left")])
    targets = frame.to_case(np.concatenate([np.asarray(_ARTERY_TARGETS[side], dtype=np.float64)
                                            for side in ("right", "left")]))
    points, radii = grow_artery_tree(grid, lung, starts, targets, rng,
                                     root_radius_mm=frame.length(4.5),
                                     min_radius_mm=max(0.8, 0.25 * min(grid.spacing)))
    return tube_radii(grid, points, radii)


def build_anatomy(
    grid: Grid,
    params: AnatomyParams,
    rng: np.random.Generator,
    *,
    heart_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    pericardial_fluid_mm: float = 0.0,
) -> Anatomy:
    """Build a normal chest on ``grid``, with the heart optionally enlarged or wrapped in fluid.

    Args:
        grid: the target grid.
        params: patient build (body, lung and heart size, fat thickness).
        rng: the anatomy's random generator (fissure tilts, artery tree, lung texture).
        heart_scale: multipliers of the heart's (z, long, short) semi-axes. Values above 1 draw cardiomegaly.
        pericardial_fluid_mm: thickness in mm of a pericardial effusion around the heart, 0 for none.

    Returns:
        The :class:`Anatomy`, with lungs carved around the (possibly enlarged) heart.
    """
    frame = _Frame(np.array([params.lung_height, params.body_depth, params.body_width]))
    z, y, x = _canonical_axes(grid, frame)
    hu = np.full(grid.shape, HU["air"], dtype=np.float32)

    # 1. Body outline (a superellipse in patient mm), subcutaneous fat and muscle wall.
    half_width = 160.0 * params.body_width
    half_depth = 112.0 * params.body_depth
    dx = np.abs(grid.x - 192.0)
    dy = np.abs(grid.y - 192.0)
    body = (dx / half_width) ** 2.4 + (dy / half_depth) ** 2.4 <= 1.0
    fat_inner = (dx / (half_width - params.fat_mm)) ** 2.4 + (dy / (half_depth - params.fat_mm)) ** 2.4 <= 1.0
    hu[np.broadcast_to(body, grid.shape)] = HU["fat"]
    hu[np.broadcast_to(fat_inner, grid.shape)] = HU["muscle"]

    # 2. Thoracic cavity, split by the diaphragm into chest above and abdomen below.
    # The rib cage narrows towards the thoracic inlet above z = 200 mm.
    cavity_y, cavity_x, cavity_semi_y, cavity_semi_x = _CAVITY
    narrowing = np.clip((z - 200.0) / 110.0, 0.0, 1.0) ** 1.5
    cavity_offset_y = (y - cavity_y) / (cavity_semi_y * (1.0 - 0.15 * narrowing))
    cavity_offset_x = (x - cavity_x) / (cavity_semi_x * (1.0 - 0.3 * narrowing))
    cavity_radius = np.sqrt(cavity_offset_x**2 + cavity_offset_y**2)
    cavity = (cavity_radius <= 1.0) & fat_inner
    below_diaphragm = z < _diaphragm_height(y, x)
    chest = cavity & ~below_diaphragm
    abdomen = cavity & below_diaphragm
    hu[np.broadcast_to(chest, grid.shape)] = HU["mediastinal_fat"]
    hu[abdomen & (x < _PIVOT[2])] = HU["liver"]
    hu[abdomen & (x >= _PIVOT[2])] = HU["abdomen"]

    # 3. Heart, pericardial fluid and the thin fat layer of the pericardial sac.
    heart_normal, heart, pericardial_fluid, sac = _heart_masks(z, y, x, params.heart_size, heart_scale,
                                                               pericardial_fluid_mm)
    heart_normal &= cavity
    heart &= cavity
    pericardial_fluid &= cavity
    hu[heart] = HU["blood"]
    hu[pericardial_fluid] = HU["fluid"]

    # 4. Mediastinal tubes and the spine, which the lungs are carved around.
    aorta = frame.tube(grid, _AORTA) > 0.0
    esophagus = frame.tube(grid, _ESOPHAGUS) > 0.0
    central_artery_radius = np.maximum.reduce([frame.tube(grid, rows) for rows in
                                               (_PULMONARY_TRUNK, _RIGHT_PULMONARY_ARTERY, _LEFT_PULMONARY_ARTERY)])
    central_arteries = central_artery_radius > 0.0
    central_airways = (_TRACHEA, _RIGHT_MAIN_BRONCHUS, _LEFT_MAIN_BRONCHUS)
    central_lumen_radius = np.maximum.reduce([frame.tube(grid, rows) for rows in central_airways])
    central_outer = np.logical_or.reduce([frame.tube(grid, rows, _AIRWAY_WALL_MM) > 0.0 for rows in central_airways])
    hu[aorta & fat_inner] = HU["blood"]
    hu[esophagus & fat_inner] = HU["esophagus"]
    spine = _spine_and_ribs(hu, fat_inner, z, y, x, cavity_radius, cavity_offset_y)

    # 5. Lungs: the chest minus mediastinum, narrowing to the apices.
    top = 305.0
    apex_scale = np.sqrt(np.clip((top - z) / (top - 220.0), 0.0, 1.0))
    lung_centre_x = np.where(x < _PIVOT[2], 118.0, 266.0)
    apex_shape = ((x - lung_centre_x) / 62.0) ** 2 + ((y - 205.0) / 95.0) ** 2 <= apex_scale**2
    lung = chest & apex_shape & (np.abs(x - _PIVOT[2]) >= _MEDIASTINUM_HALF_WIDTH)
    lung &= ~(sac | aorta | esophagus | central_arteries | central_outer | spine)
    lobes, lingula, fissure_distance = _split_lobes(lung, z, y, x, rng)
    # Above the lung apices the inlet contains muscle rather than mediastinal fat.
    inlet = chest & ~lung & (z > 240.0) & (np.abs(x - _PIVOT[2]) >= _MEDIASTINUM_HALF_WIDTH)
    hu[inlet & (hu == HU["mediastinal_fat"])] = HU["muscle"]

    texture = smooth_noise(rng, grid.shape, 3.0, grid.spacing)
    front = _CAVITY[0] - _CAVITY[2]
    depth = np.clip((y - front) / (2.0 * _CAVITY[2]), 0.0, 1.0)
    lung_hu = HU["lung_anterior"] + (HU["lung_posterior"] - HU["lung_anterior"]) * depth + 18.0 * texture
    # A fissure is about 1 mm thick, so its partial-volume brightening falls with voxel size.
    min_spacing = min(grid.spacing)
    lung_hu = lung_hu + np.where(fissure_distance < 0.5 * min_spacing, min(150.0, 600.0 / min_spacing), 0.0)
    hu[lung] = lung_hu[lung]

    # 6. Airways: trachea and main bronchi, plus lobar bronchi running into the lungs.
    lumen_radius, airway_outer = _add_lobar_bronchi(grid, frame, central_lumen_radius, central_outer)
    lumen_radius = np.where(fat_inner, lumen_radius, 0.0)
    airway_wall = airway_outer & (lumen_radius <= 0.0) & fat_inner

    # 7. Pulmonary artery trees from the hila. Branches may cross the hilar fat
    # between the central arteries and the lung, but no other structure.
    hila = {
        "right": frame.to_case(np.asarray(_RIGHT_PULMONARY_ARTERY[-1][:3], dtype=np.float64)),
        "left": frame.to_case(np.asarray(_LEFT_PULMONARY_ARTERY[-1][:3], dtype=np.float64)),
    }
    tree_radius = _artery_tree_radius(grid, frame, lung, hila, rng)
    tree_radius = np.where(chest & ~(sac | aorta | spine | central_outer), tree_radius, 0.0)
    vessel_radius = np.maximum(tree_radius, np.where(fat_inner, central_artery_radius, 0.0))

    return Anatomy(
        hu=hu,
        lobes=lobes,
        lingula=lingula,
        heart=heart,
        heart_normal=heart_normal,
        pericardial_fluid=pericardial_fluid,
        vessels=vessel_radius > 0.0,
        vessel_fill=tube_fill(grid, vessel_radius),
        airway=lumen_radius > 0.0,
        airway_fill=tube_fill(grid, lumen_radius),
        airway_wall=airway_wall,
        texture=texture,
        hila=hila,
    )
