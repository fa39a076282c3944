"""Volume helpers of the renderers: windows, entity lookup, heatmap grids, top sets, Dice and shared slices."""

from __future__ import annotations

import numpy as np
import pytest
from test_render_stores import ENTITIES, gaussian, write_render_study

from medsyn_xai.render import EntityNotFoundError, dice, entity_heatmap, find_entity, joint_overlap, top_fraction_mask
from medsyn_xai.render.maps import format_slice_ranges, peak_voxel, resolve_entity, slice_ranges, window_ct


def test_window_ct_edges():
    ct = np.array([-1350, -600, 150, 1000], dtype=np.int16)
    assert window_ct(ct, "lung").tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    soft_tissue = np.array([-125, 50, 225], dtype=np.int16)
    assert window_ct(soft_tissue, "mediastinum").tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_window_ct_unknown_window():
    with pytest.raises(ValueError, match=r"invalid window 'bone': use one of lung, mediastinum"):
        window_ct(np.zeros(3, np.int16), "bone")


def test_find_entity_ignores_case(tmp_path):
    store = write_render_study(tmp_path)
    assert find_entity(store, "Right Upper Lobe") == 1
    assert find_entity(store, "  NODULE ") == 0


def test_find_entity_missing_lists_texts(tmp_path):
    store = write_render_study(tmp_path)
    with pytest.raises(EntityNotFoundError) as caught:
        find_entity(store, "pneumothorax")
    message = str(caught.value)
    assert "'pneumothorax' is not in study 'case'" in message
    assert all(repr(text) in message for text, *_ in ENTITIES)
    assert "\n" not in message


def test_find_entity_without_entities(tmp_path):
    store = write_render_study(tmp_path, explained=False)
    with pytest.raises(EntityNotFoundError, match="has no entities, so run 'medsyn-xai explain'"):
        find_entity(store, "nodule")


def test_resolve_entity_index_range(tmp_path):
    store = write_render_study(tmp_path)
    assert resolve_entity(store, 4) == 4
    assert resolve_entity(store, "ground glass") == 3
    with pytest.raises(EntityNotFoundError, match="entity index 5 is out of range .* with 5 entities"):
        resolve_entity(store, 5)
    with pytest.raises(EntityNotFoundError, match="out of range"):
        resolve_entity(store, -1)


def test_entity_heatmap_coarse_grid_resized(tmp_path):
    coarse = np.stack([gaussian((8, 8, 8), (6, 2, 1), sigma=1.0)])  # (1, 8, 8, 8)
    store = write_render_study(tmp_path, specs=ENTITIES[:1], heatmaps=coarse)
    heatmap = entity_heatmap(store, 0)
    assert heatmap.shape == (32, 32, 32)
    assert heatmap.dtype == np.float32
    z, y, x = peak_voxel(heatmap)
    # Coarse voxel (6, 2, 1) covers fine voxels 24-27, 8-11 and 4-7 (scale 4, align_corners=False).
    assert 24 <= z <= 27
    assert 8 <= y <= 11
    assert 4 <= x <= 7


def test_peak_voxel_constant_volume():
    assert peak_voxel(np.zeros((4, 6, 8), np.float32)) == (2, 3, 4)
    volume = np.zeros((4, 6, 8), np.float32)
    volume[1, 5, 2] = 1.0
    assert peak_voxel(volume) == (1, 5, 2)


def test_top_fraction_mask_top_tenth():
    volume = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    mask = top_fraction_mask(volume, 0.1)
    assert int(mask.sum()) == 100
    assert mask[9].all()
    assert not mask[:9].any()
    with pytest.raises(ValueError, match="invalid fraction 0"):
        top_fraction_mask(volume, 0)


def test_top_fraction_mask_flat_map():
    assert not top_fraction_mask(np.full((4, 4, 4), 0.3, np.float32)).any()


def slab(start: int, stop: int, shape=(32, 16, 16)) -> np.ndarray:
    volume = np.zeros(shape, np.float32)
    volume[start:stop] = 1.0
    return volume


def test_joint_overlap_identical_maps():
    blob = gaussian((32, 16, 16), (10, 8, 8))
    same = joint_overlap(blob, blob.copy())
    assert same.dice == 1.0
    assert same.n_a == same.n_b == same.n_both
    assert same.n_both > 0
    assert np.allclose(same.joint, blob / blob.max())


def test_joint_overlap_disjoint_maps():
    apart = joint_overlap(slab(0, 3), slab(29, 32))
    assert apart.dice == 0.0
    assert apart.slices == []
    assert apart.n_both == 0
    assert float(apart.joint.max()) == 0.0


def test_joint_overlap_partial_slabs():
    overlap = joint_overlap(slab(0, 3), slab(1, 4))
    # Top sets: slices 0-2 and 1-3 (each 3/32 < 10 % of voxels); shared slices 1-2.
    assert overlap.dice == pytest.approx(2 * 2 / (3 + 3))
    assert overlap.slices == [(1, 2)]
    assert format_slice_ranges(overlap.slices) == "z 1-2"


def test_joint_overlap_different_grids():
    with pytest.raises(ValueError, match=r"shapes \(4, 4, 4\) and \(4, 4, 5\) cannot be compared"):
        joint_overlap(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_dice_two_empty_masks():
    empty = np.zeros((3, 3, 3), bool)
    assert dice(empty, empty) == 0.0


def test_slice_ranges_group_runs():
    assert slice_ranges([2, 3, 4, 9, 11, 12]) == [(2, 4), (9, 9), (11, 12)]
    assert slice_ranges([]) == []
    assert format_slice_ranges([(2, 4), (9, 9)]) == "z 2-4, 9"
    assert format_slice_ranges([]) == "none"
