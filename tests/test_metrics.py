"""Explanation metrics on hand-made maps with known expected values."""

import math

import numpy as np
import pytest

from medsyn_xai.metrics import auroc, mass_in_mask, pointing_game


@pytest.fixture()
def mask() -> np.ndarray:
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[2:4, 2:4, 2:4] = True
    return mask


def test_peak_inside_mask_is_hit(mask):
    heatmap = np.zeros(mask.shape)
    heatmap[3, 3, 3] = 1.0
    assert pointing_game(heatmap, mask)
    assert mass_in_mask(heatmap, mask) == 1.0
    # One positive beats all 504 negatives; the other 7 positives tie with them.
    assert auroc(heatmap, mask) == pytest.approx((1 + 7 * 0.5) / 8)


def test_peak_outside_mask_is_miss(mask):
    heatmap = np.zeros(mask.shape)
    heatmap[6, 6, 6] = 1.0
    assert not pointing_game(heatmap, mask)
    assert mass_in_mask(heatmap, mask) == 0.0


def test_tolerance_dilates_mask(mask):
    heatmap = np.zeros(mask.shape)
    heatmap[4, 3, 3] = 1.0
    assert not pointing_game(heatmap, mask)
    assert pointing_game(heatmap, mask, tolerance=1)


def test_mass_split(mask):
    heatmap = np.zeros(mask.shape)
    heatmap[2, 2, 2] = 3.0
    heatmap[7, 7, 7] = 1.0
    assert mass_in_mask(heatmap, mask) == pytest.approx(0.75)


def test_auroc_perfect_and_inverse(mask):
    perfect = mask.astype(float)
    assert auroc(perfect, mask) == pytest.approx(1.0)
    assert auroc(1 - perfect, mask) == pytest.approx(0.0)
    assert auroc(np.ones(mask.shape), mask) == pytest.approx(0.5)


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.random(50)
    labels = rng.random(50) > 0.7
    positives, negatives = scores[labels], scores[~labels]
    expected = np.mean([[float(p > n) + 0.5 * float(p == n) for n in negatives] for p in positives])
    assert auroc(scores, labels) == pytest.approx(expected)


def test_degenerate_masks():
    heatmap = np.ones((4, 4))
    assert math.isnan(auroc(heatmap, np.zeros((4, 4))))
    assert math.isnan(auroc(heatmap, np.ones((4, 4))))
    assert not pointing_game(heatmap, np.zeros((4, 4)))
    assert mass_in_mask(np.zeros((4, 4)), np.ones((4, 4))) == 0.0


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="differs from mask shape"):
        mass_in_mask(np.zeros((4, 4)), np.zeros((4, 5)))
