"""Tests of the phantom spec and generator on real arrays at 64^3, 32^3 and 16^3."""

import json
import time

import numpy as np
import pytest
from scipy import ndimage

from medsyn_xai.phantom import (
    CT_RANGE_HU,
    FIELD_OF_VIEW_MM,
    FINDING_KINDS,
    LOBE_LABELS,
    MASK_KEYS,
    AnatomyParams,
    Finding,
    PhantomSpec,
    generate_phantom,
    random_spec,
)

SHAPES = [(64, 64, 64), (32, 32, 32), (16, 16, 16)]
RIGHT_LABELS = (LOBE_LABELS["RUL"], LOBE_LABELS["RML"], LOBE_LABELS["RLL"])
LEFT_LABELS = (LOBE_LABELS["LUL"], LOBE_LABELS["LLL"])

EXAMPLE_FINDINGS = (
    Finding("nodule", lobe="RUL", size_mm=14.0),
    Finding("pleural_effusion", side="left", size="moderate"),
    Finding("ground_glass", lobe="RLL", assertion="uncertain"),
    Finding("pneumothorax", assertion="absent"),
)


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Return the (z, y, x) voxel-index centroid of a non-empty mask."""
    return np.argwhere(mask).mean(axis=0)


def _surroundings(mask: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Return lung voxels within two voxels of ``mask`` but outside it."""
    return ndimage.binary_dilation(mask, iterations=2) & ~mask & lung


def _side_labels(side: str) -> tuple[int, ...]:
    return RIGHT_LABELS if side == "right" else LEFT_LABELS


# Determinism, shapes and dtypes.


def test_generate_same_seed_bit_identical():
    spec = PhantomSpec(seed=5, findings=EXAMPLE_FINDINGS)
    first = generate_phantom(spec, (32, 32, 32))
    second = generate_phantom(spec, (32, 32, 32))
    assert np.array_equal(first.ct, second.ct)
    for key in MASK_KEYS:
        assert np.array_equal(first.masks[key], second.masks[key]), key
    for mask_a, mask_b in zip(first.finding_masks, second.finding_masks):
        assert np.array_equal(mask_a, mask_b)


def test_generate_different_seed_differs():
    first = generate_phantom(PhantomSpec(seed=1, findings=EXAMPLE_FINDINGS), (32, 32, 32))
    second = generate_phantom(PhantomSpec(seed=2, findings=EXAMPLE_FINDINGS), (32, 32, 32))
    assert not np.array_equal(first.ct, second.ct)
    assert not np.array_equal(first.masks["lesion"], second.masks["lesion"])


def test_generate_anatomy_varies_by_seed():
    lung_volumes = {int((generate_phantom(PhantomSpec(seed=seed), (32, 32, 32)).masks["lobes"] > 0).sum())
                    for seed in range(4)}
    assert len(lung_volumes) == 4


@pytest.mark.parametrize("shape", SHAPES)
def test_generate_shapes_and_dtypes(shape):
    phantom = generate_phantom(PhantomSpec(seed=3, findings=EXAMPLE_FINDINGS), shape)
    assert phantom.ct.shape == shape
    assert phantom.ct.dtype == np.int16
    assert phantom.ct.min() >= CT_RANGE_HU[0]
    assert phantom.ct.max() <= CT_RANGE_HU[1]
    assert tuple(phantom.masks) == MASK_KEYS
    for key, mask in phantom.masks.items():
        assert mask.shape == shape, key
        assert mask.dtype == np.uint8, key
    for key in ("airway", "vessels", "lesion"):
        assert set(np.unique(phantom.masks[key])) <= {0, 1}, key
    assert len(phantom.finding_masks) == len(EXAMPLE_FINDINGS)
    for mask in phantom.finding_masks:
        assert mask.dtype == bool
        assert mask.shape == shape
    expected_spacing = tuple(fov / n for fov, n in zip(FIELD_OF_VIEW_MM, shape))
    assert phantom.spacing_mm == pytest.approx(expected_spacing)


def test_generate_default_spacing_is_5_6_6_mm():
    phantom = generate_phantom(PhantomSpec(seed=0))
    assert phantom.ct.shape == (64, 64, 64)
    assert phantom.spacing_mm == pytest.approx((5.0, 6.0, 6.0))


def test_generate_64_cubed_under_one_second():
    spec = random_spec(17, max_findings=4)
    generate_phantom(spec)
    durations = []
    for _ in range(3):
        start = time.perf_counter()
        generate_phantom(spec)
        durations.append(time.perf_counter() - start)
    assert min(durations) < 1.0


# Anatomy.


@pytest.mark.parametrize("shape", SHAPES)
def test_lobes_all_five_labels_present(shape):
    lobes = generate_phantom(PhantomSpec(seed=4), shape).masks["lobes"]
    assert set(np.unique(lobes)) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("shape", SHAPES)
def test_lobes_located_by_side_and_height(shape):
    lobes = generate_phantom(PhantomSpec(seed=6), shape).masks["lobes"]
    centre_x = shape[2] / 2
    centroids = {name: _centroid(lobes == label) for name, label in LOBE_LABELS.items()}
    for name in ("RUL", "RML", "RLL"):
        assert centroids[name][2] < centre_x, name
    for name in ("LUL", "LLL"):
        assert centroids[name][2] > centre_x, name
    assert centroids["RUL"][0] > centroids["RLL"][0]
    assert centroids["LUL"][0] > centroids["LLL"][0]
    assert centroids["RUL"][0] > centroids["RML"][0]
    assert centroids["RML"][1] < centroids["RLL"][1]
    assert centroids["LLL"][1] > centroids["LUL"][1]


def test_tissue_hu_values():
    phantom = generate_phantom(PhantomSpec(seed=8))
    ct = phantom.ct.astype(np.float32)
    lung = phantom.masks["lobes"] > 0
    assert ct[:, :3, :3].mean() < -950
    assert -900 < ct[lung].mean() < -750
    assert ct[phantom.masks["airway"] > 0].mean() < -850
    assert ct[phantom.masks["vessels"] > 0].mean() > ct[lung].mean() + 150
    assert ct.max() > 500
    lung_fraction = lung.mean()
    assert 0.04 < lung_fraction < 0.2


def test_anatomy_params_widen_body():
    narrow = generate_phantom(PhantomSpec(seed=2, anatomy=AnatomyParams(body_width=0.9)), (32, 32, 32))
    wide = generate_phantom(PhantomSpec(seed=2, anatomy=AnatomyParams(body_width=1.1)), (32, 32, 32))
    assert (wide.ct > -500).sum() > (narrow.ct > -500).sum()


# Findings.


def test_absent_findings_draw_nothing():
    absent = tuple(Finding(kind, assertion="absent") for kind in FINDING_KINDS)
    negated = generate_phantom(PhantomSpec(seed=9, findings=absent), (32, 32, 32))
    normal = generate_phantom(PhantomSpec(seed=9), (32, 32, 32))
    assert negated.masks["lesion"].sum() == 0
    assert all(not mask.any() for mask in negated.finding_masks)
    assert np.array_equal(negated.ct, normal.ct)


def test_uncertain_finding_is_drawn():
    spec = PhantomSpec(seed=2, findings=(Finding("consolidation", lobe="LLL", assertion="uncertain"),))
    phantom = generate_phantom(spec, (32, 32, 32))
    assert phantom.finding_masks[0].any()
    assert phantom.masks["lesion"].sum() == phantom.finding_masks[0].sum()


@pytest.mark.parametrize(
    ("finding", "min_contrast_hu"),
    [
        (Finding("nodule", lobe="RLL", size_mm=12.0), 300.0),
        (Finding("mass", lobe="LUL", size_mm=45.0), 300.0),
        (Finding("consolidation", lobe="RLL"), 300.0),
        (Finding("ground_glass", lobe="LLL"), 100.0),
        (Finding("atelectasis", lobe="RUL"), 300.0),
        (Finding("pleural_effusion", side="right", size="small"), 300.0),
        (Finding("pericardial_effusion", size="moderate"), 300.0),
        (Finding("cardiomegaly"), 300.0),
        (Finding("pneumothorax", side="left", size="moderate"), -120.0),
        (Finding("emphysema", extent="moderate", zone="diffuse"), -80.0),
    ],
    ids=lambda value: value.kind if isinstance(value, Finding) else str(value),
)
@pytest.mark.parametrize("shape", [(64, 64, 64), (32, 32, 32)])
def test_lesion_hu_differs_from_surrounding_lung(finding, min_contrast_hu, shape):
    for seed in range(3):
        phantom = generate_phantom(PhantomSpec(seed=seed, findings=(finding,)), shape)
        mask = phantom.finding_masks[0]
        surroundings = _surroundings(mask, phantom.masks["lobes"] > 0)
        assert mask.any()
        assert surroundings.any()
        contrast = phantom.ct[mask].mean() - phantom.ct[surroundings].mean()
        if min_contrast_hu > 0:
            assert contrast > min_contrast_hu, (seed, contrast)
        else:
            assert contrast < min_contrast_hu, (seed, contrast)


@pytest.mark.parametrize("lobe", ["RUL", "RML", "RLL", "LUL", "LLL", "lingula"])
@pytest.mark.parametrize("shape", [(64, 64, 64), (32, 32, 32)])
def test_nodule_inside_stated_lobe(lobe, shape):
    expected_label = LOBE_LABELS["LUL"] if lobe == "lingula" else LOBE_LABELS[lobe]
    for seed in range(4):
        spec = PhantomSpec(seed=seed, findings=(Finding("nodule", lobe=lobe, size_mm=20.0),))
        phantom = generate_phantom(spec, shape)
        mask = phantom.finding_masks[0]
        inside = (phantom.masks["lobes"][mask] == expected_label).mean()
        assert inside >= 0.8, (seed, inside)


def test_mass_larger_than_nodule():
    nodule = generate_phantom(PhantomSpec(seed=1, findings=(Finding("nodule", lobe="RLL", size_mm=12.0),)))
    mass = generate_phantom(PhantomSpec(seed=1, findings=(Finding("mass", lobe="RLL", size_mm=50.0),)))
    assert mass.finding_masks[0].sum() > 10 * nodule.finding_masks[0].sum()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", SHAPES)
def test_effusion_dependent_and_on_stated_side(side, shape):
    spec = PhantomSpec(seed=3, findings=(Finding("pleural_effusion", side=side, size="moderate"),))
    phantom = generate_phantom(spec, shape)
    fluid = phantom.finding_masks[0]
    normal_lobes = generate_phantom(PhantomSpec(seed=3), shape).masks["lobes"]
    side_lung = np.isin(normal_lobes, _side_labels(side))
    columns = np.argwhere(fluid)[:, 2]
    if side == "right":
        assert columns.max() < shape[2] / 2
    else:
        assert columns.min() >= shape[2] / 2
    assert _centroid(fluid)[1] > _centroid(side_lung)[1]
    assert _centroid(fluid)[0] < _centroid(side_lung)[0]
    assert not (phantom.masks["lobes"][fluid] > 0).any()
    assert (phantom.masks["lobes"] > 0).sum() < (normal_lobes > 0).sum()


def test_bilateral_effusion_covers_both_sides():
    spec = PhantomSpec(seed=4, findings=(Finding("pleural_effusion", side="bilateral", size="small"),))
    fluid = generate_phantom(spec, (32, 32, 32)).finding_masks[0]
    columns = np.argwhere(fluid)[:, 2]
    assert columns.min() < 16
    assert columns.max() >= 16


@pytest.mark.parametrize("side", ["right", "left"])
def test_pneumothorax_anterior_and_on_stated_side(side):
    spec = PhantomSpec(seed=5, findings=(Finding("pneumothorax", side=side, size="small"),))
    phantom = generate_phantom(spec, (64, 64, 64))
    air = phantom.finding_masks[0]
    normal_lobes = generate_phantom(PhantomSpec(seed=5)).masks["lobes"]
    side_lung = np.isin(normal_lobes, _side_labels(side))
    assert air.any()
    assert _centroid(air)[1] < _centroid(side_lung)[1]
    if side == "right":
        assert np.argwhere(air)[:, 2].max() < 32
    else:
        assert np.argwhere(air)[:, 2].min() >= 32
    assert phantom.ct[air].mean() < -900
    assert not (phantom.masks["lobes"][air] > 0).any()


@pytest.mark.parametrize(("zone", "higher"), [("upper", True), ("lower", False)])
def test_emphysema_follows_zone(zone, higher):
    spec = PhantomSpec(seed=6, findings=(Finding("emphysema", extent="moderate", zone=zone),))
    phantom = generate_phantom(spec, (32, 32, 32))
    lung = (phantom.masks["lobes"] > 0) | phantom.finding_masks[0]
    above = _centroid(phantom.finding_masks[0])[0] > _centroid(lung)[0]
    assert above == higher


def test_emphysema_extent_orders_volume():
    volumes = []
    for extent in ("mild", "moderate", "severe"):
        spec = PhantomSpec(seed=7, findings=(Finding("emphysema", extent=extent, zone="diffuse"),))
        volumes.append(int(generate_phantom(spec, (32, 32, 32)).finding_masks[0].sum()))
    assert volumes[0] < volumes[1] < volumes[2]


def test_cardiomegaly_enlarges_heart_into_lung():
    normal = generate_phantom(PhantomSpec(seed=3))
    enlarged = generate_phantom(PhantomSpec(seed=3, findings=(Finding("cardiomegaly"),)))
    added = enlarged.finding_masks[0]
    assert added.sum() > 500
    assert enlarged.ct[added].mean() > normal.ct[added].mean() + 300
    assert (enlarged.masks["lobes"] > 0).sum() < (normal.masks["lobes"] > 0).sum()


def test_pericardial_effusion_is_fluid_rim():
    spec = PhantomSpec(seed=3, findings=(Finding("pericardial_effusion", size="moderate"),))
    rim = generate_phantom(spec).finding_masks[0]
    phantom = generate_phantom(spec)
    assert -60 < phantom.ct[rim].mean() < 60
    assert not ndimage.binary_erosion(rim, iterations=3).any()


def test_lesion_mask_is_union_of_finding_masks():
    phantom = generate_phantom(PhantomSpec(seed=12, findings=EXAMPLE_FINDINGS), (32, 32, 32))
    union = np.logical_or.reduce(phantom.finding_masks)
    assert np.array_equal(phantom.masks["lesion"].astype(bool), union)


def test_adding_finding_keeps_other_placements():
    nodule = Finding("nodule", lobe="RUL", size_mm=16.0)
    alone = generate_phantom(PhantomSpec(seed=10, findings=(nodule,)), (32, 32, 32))
    together = generate_phantom(
        PhantomSpec(seed=10, findings=(nodule, Finding("ground_glass", lobe="LLL"))), (32, 32, 32)
    )
    assert np.array_equal(alone.finding_masks[0], together.finding_masks[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_random_specs_draw_every_drawn_finding(shape):
    for seed in range(25):
        spec = random_spec(seed, max_findings=4)
        phantom = generate_phantom(spec, shape)
        lesion_voxels = int(phantom.masks["lesion"].sum())
        if spec.is_normal:
            assert lesion_voxels == 0, seed
        for finding, mask in zip(spec.findings, phantom.finding_masks):
            assert mask.any() == finding.drawn, (seed, finding)


# Spec.


def test_random_spec_deterministic():
    assert random_spec(21) == random_spec(21)


def test_random_spec_variety():
    specs = [random_spec(seed) for seed in range(300)]
    normal_share = np.mean([spec.is_normal for spec in specs])
    assertions = {finding.assertion for spec in specs for finding in spec.findings}
    kinds = {finding.kind for spec in specs for finding in spec.findings if finding.drawn}
    counts = {sum(finding.drawn for finding in spec.findings) for spec in specs}
    assert 0.08 < normal_share < 0.3
    assert assertions == {"present", "absent", "uncertain"}
    assert kinds == set(FINDING_KINDS)
    assert {0, 1, 2, 3} <= counts
    assert any(spec.findings and all(not f.drawn for f in spec.findings) for spec in specs)


def test_random_spec_respects_kinds():
    for seed in range(40):
        spec = random_spec(seed, kinds=("nodule", "mass"))
        assert {finding.kind for finding in spec.findings} <= {"nodule", "mass"}


def test_spec_dict_round_trip_through_json():
    for seed in range(30):
        spec = random_spec(seed, max_findings=5)
        assert PhantomSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    explicit = PhantomSpec(seed=1, findings=EXAMPLE_FINDINGS, anatomy=AnatomyParams(heart_size=1.1))
    assert PhantomSpec.from_dict(json.loads(json.dumps(explicit.to_dict()))) == explicit


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Finding("nodule", lobe="RUM", size_mm=8.0), "unknown lobe 'RUM'"),
        (lambda: Finding("tumour", lobe="RUL"), "unknown finding kind 'tumour'"),
        (lambda: Finding("nodule", lobe="RUL", size_mm=-3.0), "positive.*-3.0"),
        (lambda: Finding("nodule", lobe="RUL", size_mm=45.0), "use kind='mass'"),
        (lambda: Finding("mass", lobe="RUL", size_mm=20.0), "use kind='nodule'"),
        (lambda: Finding("nodule", size_mm=8.0), "needs lobe"),
        (lambda: Finding("nodule", lobe="RUL", size_mm=8.0, side="right"), "does not take side"),
        (lambda: Finding("pneumothorax", side="bilateral"), "invalid side 'bilateral'"),
        (lambda: Finding("pleural_effusion", side="left", size="huge"), "invalid size 'huge'"),
        (lambda: Finding("emphysema", extent="mild", zone="apical"), "invalid zone 'apical'"),
        (lambda: Finding("cardiomegaly", assertion="maybe"), "unknown assertion 'maybe'"),
        (lambda: PhantomSpec(seed=-1), "non-negative"),
        (lambda: AnatomyParams(body_width=2.0), "body_width"),
        (lambda: Finding.from_dict({"kind": "nodule", "lobe": "RUL", "size_mm": 5, "colour": "red"}),
         "unknown finding field 'colour'"),
        (lambda: random_spec(0, kinds=("nodule", "tumour")), "unknown finding kind 'tumour'"),
        (lambda: generate_phantom(PhantomSpec(seed=0), (4, 64, 64)), "at least 8"),
    ],
)
def test_invalid_input_raises_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_absent_finding_needs_no_location():
    finding = Finding("nodule", assertion="absent")
    assert not finding.drawn
    assert finding.body_side is None
    assert Finding("nodule", lobe="lingula", size_mm=6.0).body_side == "left"
