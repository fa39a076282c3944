"""The token chart: saliency mass per token inside the body, and its PNG size."""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest
from test_render_stores import ENTITIES, PROVENANCE, torso_ct, word_tokens, write_render_study

from medsyn_xai.render import TOKEN_CHART_SIZE_PX, render_token_chart, token_mass
from medsyn_xai.store import SampledStudy, StudyStore, write_study


def decode(png: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def write_two_token_study(tmp_path, ct: np.ndarray) -> StudyStore:
    """Write a study whose token 1 has all attention in the upper half of z and token 0 in the lower half.

The saliency grid is half the CT grid along each axis.
"""
    tokens = word_tokens("nodule", n_padding=0)[:2]  # [CLS], nodule
    tokens[0]["special"] = False
    saliency = np.zeros((2, 4, 4, 4), np.float32)
    saliency[0, :2] = 1.0
    saliency[1, 2:] = 1.0
    study = SampledStudy(
        study_id="two", prompt="nodule", ct=ct, masks={}, tokens=tokens, saliency=saliency,
        spacing_mm=(1.0, 1.0, 1.0), attrs=dict(PROVENANCE),
    )
    return StudyStore.open(write_study(tmp_path, study))


def test_token_mass_body_voxels_only(tmp_path):
    ct = np.full((8, 8, 8), -1000, np.int16)
    ct[4:, :, :] = 40  # body only in the upper half, where all attention goes to token 1
    result = token_mass(write_two_token_study(tmp_path, ct))
    assert result.mass.tolist() == pytest.approx([0.0, 1.0])
    assert result.body_voxels == 4 * 8 * 8
    assert not result.whole_volume


def test_token_mass_empty_body(tmp_path):
    result = token_mass(write_two_token_study(tmp_path, np.full((8, 8, 8), -1000, np.int16)))
    assert result.mass.tolist() == pytest.approx([0.5, 0.5])
    assert result.whole_volume
    assert result.body_voxels == 0


def test_token_mass_sums_to_one(tmp_path):
    store = write_render_study(tmp_path)
    result = token_mass(store)
    assert result.mass.shape == (len(store.tokens),)
    assert result.mass.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.body_voxels == int((torso_ct((32, 32, 32)) > -500).sum())


@pytest.mark.parametrize("n_entities", [0, 1, len(ENTITIES)])
def test_token_chart_png_size(tmp_path, n_entities):
    store = write_render_study(tmp_path, specs=ENTITIES[:n_entities])
    image = decode(render_token_chart(store))
    width, height = TOKEN_CHART_SIZE_PX
    assert image.shape == (height, width, 4) == (600, 1500, 4)


def test_token_chart_without_tokens(tmp_path):
    study = SampledStudy(
        study_id="empty", prompt="", ct=torso_ct((8, 8, 8)), masks={}, tokens=[],
        saliency=np.zeros((0, 4, 4, 4), np.float32), spacing_mm=(1.0, 1.0, 1.0), attrs=dict(PROVENANCE),
    )
    store = StudyStore.open(write_study(tmp_path, study))
    assert decode(render_token_chart(store)).shape == (600, 1500, 4)
