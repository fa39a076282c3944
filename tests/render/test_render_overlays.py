"""Tri-planar overlays: orientation, pixel size, absent entities and the joint map, decoded from real PNGs."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.image
import numpy as np
import pytest
from test_render_stores import ENTITIES, gaussian, write_render_study

from medsyn_xai.render import (
    TRIPLANAR_SIZE_PX,
    EntityNotFoundError,
    entity_triplanar,
    panel_index,
    render_entity,
    render_joint,
    slice_panels,
)
from medsyn_xai.render.overlays import HEAT_CMAP, draw_triplanar

# A grid with three different sizes and anisotropic voxels, so swapped axes show up.
SHAPE = (24, 32, 40)
SPACING = (2.5, 0.8, 0.7)
# Superior (z 16 of 24), anterior (y 8 of 32) and on the patient's right (x 7 of 40).
BLOB = (16, 8, 7)


def decode(png: bytes) -> np.ndarray:
    """Decode PNG bytes to (H, W, 4) float RGBA in [0, 1]."""
    return matplotlib.image.imread(io.BytesIO(png), format="png")


@pytest.fixture()
def blob_store(tmp_path):
    """One entity whose heatmap peaks exactly at the CT's bright blob."""
    heatmaps = gaussian(SHAPE, BLOB, sigma=1.5)[None]
    return write_render_study(
        tmp_path, shape=SHAPE, spacing_mm=SPACING, specs=ENTITIES[:1], blob=BLOB, heatmaps=heatmaps
    )


def test_slice_panels_align_blob_and_peak(blob_store):
    ct = blob_store.ct
    heatmap = blob_store.entity_heatmaps[0]
    ct_panels, heat_panels = slice_panels(ct, BLOB), slice_panels(heatmap, BLOB)
    # Radiological display: right on the left (column = x), superior on top (row = Z - 1 - z),
    # anterior at the top of axial and on the left of sagittal.
    expected = {"axial": (8, 7), "coronal": (24 - 1 - 16, 7), "sagittal": (24 - 1 - 16, 8)}
    for view, (row, column) in expected.items():
        blob_rows, blob_columns = np.nonzero(ct_panels[view] == 400)
        assert (blob_rows.mean(), blob_columns.mean()) == (row, column), view
        assert np.unravel_index(np.argmax(heat_panels[view]), heat_panels[view].shape) == (row, column), view
        assert panel_index(view, SHAPE, BLOB) == (row, column), view
    assert ct_panels["axial"].shape == (32, 40)
    assert ct_panels["coronal"].shape == (24, 40)
    assert ct_panels["sagittal"].shape == (24, 32)
    # The blob is on the patient's right, which is the image's left in axial and coronal.
    assert expected["axial"][1] < 40 / 2
    assert expected["coronal"][1] < 40 / 2


def test_triplanar_png_heat_peak_position(blob_store):
    result = entity_triplanar(blob_store, 0, window="lung")
    assert result.voxel == BLOB
    image = decode(result.png)
    assert image.shape[:2] == (TRIPLANAR_SIZE_PX[1], TRIPLANAR_SIZE_PX[0])

    # Peak colour: 60 % of the colormap's top colour over the white blob (400 HU is above the lung window).
    peak_colour = 0.6 * np.array(matplotlib.colormaps[HEAT_CMAP](1.0)[:3]) + 0.4
    for view in ("axial", "coronal", "sagittal"):
        row, column = result.pixel_of(view, BLOB)
        assert image[round(row), round(column), :3] == pytest.approx(peak_colour, abs=0.03), view
        left, top, right, bottom = result.boxes[view]
        if view in ("axial", "coronal"):
            assert column < (left + right) / 2, f"{view}: the patient's right must be on the image's left"
        if view in ("coronal", "sagittal"):
            assert row < (top + bottom) / 2, f"{view}: superior must be at the top"
    axial_row, _ = result.pixel_of("axial", BLOB)
    assert axial_row < (result.boxes["axial"][1] + result.boxes["axial"][3]) / 2, "axial: anterior must be at the top"

    # Six voxels away the heatmap is below its threshold, so the pixel is plain gray CT.
    away = (BLOB[0], BLOB[1] + 6, BLOB[2] + 6)
    row, column = result.pixel_of("axial", away)
    red, green, blue = image[round(row), round(column), :3]
    assert red == pytest.approx(green, abs=0.01)
    assert green == pytest.approx(blue, abs=0.01)


def test_triplanar_png_ct_blob_position(blob_store):
    ct = blob_store.ct
    result = draw_triplanar(ct, np.zeros(ct.shape, np.float32), SPACING, voxel=BLOB, window="mediastinum")
    image = decode(result.png)
    for view in ("axial", "coronal", "sagittal"):
        row, column = result.pixel_of(view, BLOB)
        assert image[round(row), round(column), :3].min() > 0.97, f"{view}: the 400 HU blob must be white"
    row, column = result.pixel_of("axial", (BLOB[0], BLOB[1] + 3, BLOB[2] + 3))
    assert image[round(row), round(column), :3].max() < 0.9, "next to the blob the CT is not white"


def test_triplanar_panel_aspect(blob_store):
    result = entity_triplanar(blob_store, 0)
    size_z, size_y, size_x = (count * spacing for count, spacing in zip(SHAPE, SPACING))
    extents_mm = {"axial": (size_x, size_y), "coronal": (size_x, size_z), "sagittal": (size_y, size_z)}
    for view, (width_mm, height_mm) in extents_mm.items():
        left, top, right, bottom = result.boxes[view]
        assert (right - left) / (bottom - top) == pytest.approx(width_mm / height_mm, rel=0.02), view


@pytest.mark.parametrize("n_entities", [1, len(ENTITIES)])
def test_render_entity_png_size(tmp_path, n_entities):
    store = write_render_study(tmp_path, specs=ENTITIES[:n_entities])
    for index in range(n_entities):
        image = decode(render_entity(store, index))
        assert image.shape == (520, 1500, 4)
        assert image[..., :3].std() > 0.05


def test_render_entity_absent_dimmed(tmp_path):
    specs = [
        ("nodule", "FINDING", "present", (0.5, 0.5, 0.5)),
        ("pleural effusion", "FINDING", "absent", (0.5, 0.5, 0.5)),
    ]
    store = write_render_study(tmp_path, specs=specs)
    present, absent = entity_triplanar(store, 0), entity_triplanar(store, 1)
    assert present.voxel == absent.voxel
    ct_only = draw_triplanar(store.ct, np.zeros(store.ct.shape, np.float32), store.spacing_mm, voxel=present.voxel)
    # Same CT and map, so the distance of the overlay colour from the plain CT shows its opacity.
    # The median over a 5 x 5 pixel patch inside the voxel ignores the thin hatch lines.
    row, column = (round(value) for value in present.pixel_of("axial", present.voxel))

    def patch(png: bytes) -> np.ndarray:
        return np.median(decode(png)[row - 2 : row + 3, column - 2 : column + 3, :3], axis=(0, 1))

    ct_pixel = patch(ct_only.png)
    present_shift = np.abs(patch(present.png) - ct_pixel).sum()
    absent_shift = np.abs(patch(absent.png) - ct_pixel).sum()
    assert 0 < absent_shift < present_shift


def test_render_entity_window(tmp_path):
    store = write_render_study(tmp_path, specs=ENTITIES[:1])
    lung, mediastinum = entity_triplanar(store, 0, window="lung"), entity_triplanar(store, 0, window="mediastinum")
    row, column = lung.pixel_of("axial", (lung.voxel[0], 16, 2))  # body wall, soft tissue at 40 HU
    assert decode(lung.png)[round(row), round(column), 0] > decode(mediastinum.png)[round(row), round(column), 0] + 0.2
    with pytest.raises(ValueError, match="invalid window 'soft'"):
        render_entity(store, 0, window="soft")


def test_render_entity_unknown_text(tmp_path):
    store = write_render_study(tmp_path)
    with pytest.raises(EntityNotFoundError, match="'atelectasis' is not in study 'case': use one of 'nodule', "):
        render_entity(store, "atelectasis")


def test_render_entity_without_entities(tmp_path):
    store = write_render_study(tmp_path, specs=[])
    with pytest.raises(EntityNotFoundError, match="has no entities"):
        render_entity(store, 0)


def test_render_joint_identical_maps(tmp_path):
    store = write_render_study(tmp_path)
    png, overlap = render_joint(store, "nodule", "NODULE")
    assert decode(png).shape == (520, 1500, 4)
    assert overlap["dice"] == 1.0
    assert overlap["a"] == overlap["b"] == "nodule"
    assert overlap["slices"]
    assert overlap["n_both"] == overlap["n_a"]


def test_render_joint_disjoint_maps(tmp_path):
    heatmaps = np.zeros((2, 32, 32, 32), np.float32)
    heatmaps[0, 0:3] = 0.4  # slices 0-2: 3/32 of the voxels, inside each map's top 10 %
    heatmaps[1, 29:32] = 0.4
    store = write_render_study(tmp_path, specs=ENTITIES[:2], heatmaps=heatmaps)
    png, overlap = render_joint(store, 0, 1)
    assert decode(png).shape == (520, 1500, 4)
    assert overlap["dice"] == 0.0
    assert overlap["slices"] == []
