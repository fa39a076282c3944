"""Placement check of the evaluation: a generated lesion against the stated lobe or side."""

import numpy as np
import pytest

from medsyn_xai.evaluate import _location_correct
from medsyn_xai.phantom import LOBE_LABELS
from medsyn_xai.phantom.spec import Finding


@pytest.fixture
def lobes():
    """A 4^3 lobe map: LUL (4) in the upper half, LLL (5) in the lower half."""
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[2:] = LOBE_LABELS["LUL"]
    labels[:2] = LOBE_LABELS["LLL"]
    return labels


@pytest.mark.parametrize(("lobe", "upper_hit"), [("LUL", True), ("lingula", True), ("LLL", False)])
def test_lesion_in_stated_lobe(lobes, lobe, upper_hit):
    finding = Finding(kind="nodule", lobe=lobe, size_mm=8.0)
    lesion = np.zeros_like(lobes, dtype=bool)
    lesion[3, 1, 1] = True  # inside the LUL half

    assert _location_correct(finding, lesion, lobes) is upper_hit


def test_empty_lesion_is_misplaced(lobes):
    finding = Finding(kind="nodule", lobe="lingula", size_mm=8.0)
    assert _location_correct(finding, np.zeros_like(lobes, dtype=bool), lobes) is False


def test_side_from_lesion_centroid(lobes):
    finding = Finding(kind="pneumothorax", side="left", size="small")
    lesion = np.zeros_like(lobes, dtype=bool)
    lesion[:, :, 3] = True  # x runs from the patient's right to left

    assert _location_correct(finding, lesion, lobes) is True
