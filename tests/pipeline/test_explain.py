"""The explain job against real Zarr stores written by write_study, with the rules backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from medsyn_xai.ner import get_backend
from medsyn_xai.pipeline.explain import (
    StudyExplainer,
    check_grid,
    entity_file_stems,
    explain_study,
    export_entity_npy,
    write_explain_failure,
)
from medsyn_xai.pipeline.generate import GenerationRequest, StudyGenerator
from medsyn_xai.store import (
    SampledStudy,
    StoreCorruptError,
    StoreNotReadyError,
    StudyStore,
    marker_path,
    write_study,
)

NATIVE_GRID = (4, 3, 3)
CT_SHAPE = (8, 12, 12)
PROMPT = "Spiculated nodule in the right upper lobe. No pleural effusion. Possible pneumothorax."


@pytest.fixture(scope="module")
def backend():
    return get_backend("rules")


@pytest.fixture(scope="module")
def explainer(backend):
    return StudyExplainer(backend)


def write_prompt_study(
    root: Path,
    text_encoder,
    prompt: str,
    *,
    study_id: str = "case",
    seed: int = 0,
    extra_attrs: dict | None = None,
) -> Path:
    """Write a study whose tokens come from the real tokenizer and whose maps are random."""
    records, _, truncated, n_prompt_tokens = text_encoder.tokenize(prompt)
    rng = np.random.default_rng(seed)
    raw = rng.random((len(records), *NATIVE_GRID)).astype(np.float32)
    saliency = (raw / raw.sum(axis=0, keepdims=True)).astype(np.float32)
    study = SampledStudy(
        study_id=study_id,
        prompt=prompt,
        ct=rng.integers(-1000, 400, size=CT_SHAPE, dtype=np.int16),
        masks={"lesion": np.zeros(CT_SHAPE, dtype=np.uint8)},
        tokens=[record.to_dict() for record in records],
        saliency=saliency,
        spacing_mm=(5.0, 6.0, 6.0),
        attrs={
            "seed": seed,
            "sampler": {"method": "test"},
            "model": {"name": "none", "checkpoint_sha256": None},
            "text_encoder": {"name": "all-MiniLM-L6-v2"},
            "truncated": truncated,
            "prompt_tokens": n_prompt_tokens,
            **(extra_attrs or {}),
        },
    )
    return write_study(root, study)


def direct_heatmap(token_maps: np.ndarray, token_indices, grid) -> np.ndarray:
    """Resize each token map on its own, then average: the reference the job must match."""
    resized = [
        F.interpolate(
            torch.from_numpy(token_maps[index])[None, None], size=grid, mode="trilinear", align_corners=False
        )[0, 0].numpy()
        for index in token_indices
    ]
    return np.mean(resized, axis=0)


def test_heatmap_equals_resized_token_mean(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    result = explainer.explain(path)

    token_maps = StudyStore.open(path).saliency()
    assert result.heatmaps.dtype == np.float32
    assert result.heatmaps.shape == (len(result.entities), *CT_SHAPE)
    assert result.grid == CT_SHAPE
    for entity, heatmap in zip(result.entities, result.heatmaps):
        assert entity.covered
        expected = direct_heatmap(token_maps, entity.token_indices, CT_SHAPE)
        np.testing.assert_allclose(heatmap, expected, rtol=1e-5, atol=1e-7)


def test_explain_writes_store_and_marker(tmp_path, text_encoder, explainer, backend):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    result = explainer.explain(path)

    assert marker_path(tmp_path, "case", "explained").is_file()
    store = StudyStore.open(path, require="explained")
    store.validate()
    assert np.array_equal(store.entity_heatmaps, result.heatmaps)
    assert store.entities == [entity.to_dict() for entity in result.entities]
    assert store.entity_attrs["backend"] == "rules"
    assert store.entity_attrs["backend_version"] == backend.version
    assert store.entity_attrs["grid"] == list(CT_SHAPE)
    first = store.entities[0]
    assert set(first) >= {"text", "label", "start", "end", "assertion", "token_indices", "covered"}
    assert first["text"] == PROMPT[first["start"] : first["end"]]


def test_repeated_word_gives_two_entities(tmp_path, text_encoder, explainer):
    prompt = "Nodule in the right upper lobe and nodule in the left lower lobe."
    path = write_prompt_study(tmp_path, text_encoder, prompt)
    result = explainer.explain(path)

    nodules = [(index, entity) for index, entity in enumerate(result.entities) if entity.text.lower() == "nodule"]
    assert len(nodules) == 2
    (first_index, first), (second_index, second) = nodules
    assert first.start != second.start
    assert set(first.token_indices).isdisjoint(second.token_indices)
    assert not np.allclose(result.heatmaps[first_index], result.heatmaps[second_index])


def test_absent_and_uncertain_entities_kept(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, "No pleural effusion. Possible pneumothorax.")
    result = explainer.explain(path)

    assertions = {entity.text: entity.assertion for entity in result.entities}
    assert assertions == {"pleural effusion": "absent", "pneumothorax": "uncertain"}
    stored = StudyStore.open(path, require="explained").entities
    assert [entity["assertion"] for entity in stored] == ["absent", "uncertain"]
    assert all(heatmap.max() > 0 for heatmap in result.heatmaps)


def test_prompt_without_entities(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, "The weather is fine today.")
    result = explainer.explain(path)

    assert result.entities == ()
    assert result.heatmaps.shape == (0, *CT_SHAPE)
    store = StudyStore.open(path, require="explained")
    assert store.entities == []
    assert store.entity_heatmaps.shape == (0, *CT_SHAPE)


def test_store_without_marker_rejected(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    marker_path(tmp_path, "case", "sampled").unlink()

    with pytest.raises(StoreNotReadyError, match=r"case\.sampled"):
        explainer.explain(path)
    assert not marker_path(tmp_path, "case", "explained").exists()
    assert "entities" not in zarr.open_group(path, mode="r")


def test_token_count_mismatch_rejected(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    group = zarr.open_group(path, mode="r+")
    group.attrs["tokens"] = list(group.attrs["tokens"])[:-1]

    with pytest.raises(StoreCorruptError) as caught:
        explainer.explain(path)
    message = str(caught.value)
    assert str(path) in message
    assert "tokens attribute lists 23 tokens" in message
    assert "\n" not in message


@pytest.mark.parametrize(("value", "fragment"), [(np.nan, "NaN or infinite"), (-0.5, "negative values")])
def test_invalid_token_maps_rejected(tmp_path, text_encoder, explainer, value, fragment):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    saliency = zarr.open_array(path / "saliency" / "tokens", mode="r+")
    token_map = np.asarray(saliency[3])
    token_map[0, 1, 2] = value
    saliency[3] = token_map

    with pytest.raises(StoreCorruptError) as caught:
        explainer.explain(path)
    assert str(path) in str(caught.value)
    assert f"token map 3 contains {fragment}" in str(caught.value)
    assert not marker_path(tmp_path, "case", "explained").exists()


def test_damaged_token_map_shard_rejected(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    saliency = zarr.open_array(path / "saliency" / "tokens", mode="r")
    shard = path / "saliency" / "tokens" / saliency.metadata.encode_chunk_key((0, 0, 0, 0))
    data = bytearray(shard.read_bytes())
    data[-12] ^= 0xFF  # a byte of the shard index, which ends with a 4-byte CRC32C
    shard.write_bytes(bytes(data))

    with pytest.raises(StoreCorruptError) as caught:
        explainer.explain(path)
    message = str(caught.value)
    assert str(path) in message
    assert "fails its CRC32C" in message
    assert "--overwrite" in message
    assert "\n" not in message
    assert not marker_path(tmp_path, "case", "explained").exists()


def test_bad_map_outside_entities_ignored(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    store = StudyStore.open(path)
    used = {index for entity in explainer.explain(path).entities for index in entity.token_indices}
    unused = max(set(range(len(store.tokens))) - used)
    saliency = zarr.open_array(path / "saliency" / "tokens", mode="r+")
    token_map = np.asarray(saliency[unused])
    token_map[0, 0, 0] = np.nan
    saliency[unused] = token_map

    result = explainer.explain(path)
    assert np.isfinite(result.heatmaps).all()
    assert marker_path(tmp_path, "case", "explained").exists()


def test_emoji_and_greek_prompt(tmp_path, text_encoder, explainer):
    prompt = "Ground-glass opacity 😀 in the right lower lobe; αβγ nodule near the Ω carina."
    path = write_prompt_study(tmp_path, text_encoder, prompt)
    result = explainer.explain(path)

    texts = [entity.text for entity in result.entities]
    assert texts == ["Ground-glass opacity", "right lower lobe", "nodule", "carina"]
    for entity in result.entities:
        assert prompt[entity.start : entity.end] == entity.text
        assert entity.covered
    tokens = StudyStore.open(path).tokens
    nodule = result.entities[2]
    assert [tokens[index]["text"] for index in nodule.token_indices] == ["nod", "##ule"]


def test_long_prompt_far_entities_uncovered(tmp_path, text_encoder, explainer):
    sentence = "Small nodule in the right upper lobe. "
    prompt = (sentence * (10_000 // len(sentence) + 1))[:10_000]
    path = write_prompt_study(tmp_path, text_encoder, prompt)
    result = explainer.explain(path)

    assert len(prompt) == 10_000
    assert StudyStore.open(path).attrs["truncated"] is True
    covered = [entity.covered for entity in result.entities]
    assert covered[0] is True
    assert covered[-1] is False
    assert covered == sorted(covered, reverse=True)
    for entity, heatmap in zip(result.entities, result.heatmaps):
        if entity.covered:
            assert heatmap.max() > 0
        else:
            assert entity.token_indices == ()
            assert not heatmap.any()
    assert result.n_uncovered == covered.count(False)


def test_rerun_gives_same_result(tmp_path, text_encoder, explainer):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    first = explainer.explain(path)
    second = explainer.explain(path)

    assert first.entities == second.entities
    assert np.array_equal(first.heatmaps, second.heatmaps)
    store = StudyStore.open(path, require="explained")
    assert np.array_equal(store.entity_heatmaps, first.heatmaps)
    assert len(store.entities) == len(first.entities)


def sentinel_cache(prompt: str, version: str) -> dict:
    start = prompt.index("weather")
    entity = {"text": "weather", "label": "FINDING", "start": start, "end": start + 7, "assertion": "present"}
    return {"ner": {"backend": "rules", "version": version, "entities": [entity]}}


def test_ner_cache_reused_when_version_matches(tmp_path, text_encoder, explainer, backend):
    prompt = "The weather is fine today."
    path = write_prompt_study(tmp_path, text_encoder, prompt, extra_attrs=sentinel_cache(prompt, backend.version))
    result = explainer.explain(path)

    assert result.ner_from_cache
    assert [entity.text for entity in result.entities] == ["weather"]
    assert result.entities[0].covered
    assert result.entities[0].backend_version == backend.version


def test_ner_cache_ignored_for_other_version(tmp_path, text_encoder, explainer):
    prompt = "The weather is fine today."
    path = write_prompt_study(tmp_path, text_encoder, prompt, extra_attrs=sentinel_cache(prompt, "0.0+stale"))
    result = explainer.explain(path)

    assert not result.ner_from_cache
    assert result.entities == ()


def test_ner_cache_ignored_when_offsets_wrong(tmp_path, text_encoder, explainer, backend):
    prompt = "The weather is fine today."
    cache = sentinel_cache(prompt, backend.version)
    cache["ner"]["entities"][0]["start"] += 1
    path = write_prompt_study(tmp_path, text_encoder, prompt, extra_attrs=cache)
    result = explainer.explain(path)

    assert not result.ner_from_cache
    assert result.entities == ()


def test_reuse_ner_false_runs_backend(tmp_path, text_encoder, explainer, backend):
    prompt = "The weather is fine today."
    path = write_prompt_study(tmp_path, text_encoder, prompt, extra_attrs=sentinel_cache(prompt, backend.version))
    result = explainer.explain(path, reuse_ner=False)

    assert not result.ner_from_cache
    assert result.entities == ()


def test_generator_caches_ner_for_explain(tmp_path, tiny_settings, text_encoder, backend, explainer):
    generator = StudyGenerator(tiny_settings, text_encoder=text_encoder, ner_backend=backend)
    path = generator.generate(GenerationRequest(prompt=PROMPT, study_id="generated", seed=1), tmp_path)

    cache = StudyStore.open(path).attrs["ner"]
    assert cache["backend"] == "rules"
    assert cache["version"] == backend.version
    assert [entity["text"] for entity in cache["entities"]] == [entity.text for entity in backend.extract(PROMPT)]
    result = explainer.explain(path)
    assert result.ner_from_cache
    assert result.grid == tiny_settings.output.grid
    assert [entity.text for entity in result.entities] == [entity["text"] for entity in cache["entities"]]


def test_grid_override(tmp_path, text_encoder, backend):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    result = explain_study(path, backend=backend, grid=(6, 5, 4))

    assert result.heatmaps.shape == (len(result.entities), 6, 5, 4)
    token_maps = StudyStore.open(path).saliency()
    expected = direct_heatmap(token_maps, result.entities[0].token_indices, (6, 5, 4))
    np.testing.assert_allclose(result.heatmaps[0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grid", [(0, 4, 4), (4, -1, 4), (4, 4), (4.0, 4, 4), (True, 4, 4), (4096, 4096, 4096)])
def test_invalid_grid_rejected(grid):
    with pytest.raises(ValueError, match="invalid grid"):
        check_grid(grid)


def test_failure_marker_names_stage(tmp_path, text_encoder):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    marker = write_explain_failure(path, StoreCorruptError("token map 3 contains NaN\nsecond line"))

    assert marker == marker_path(tmp_path, "case", "failed")
    payload = json.loads(marker.read_text())
    assert payload["stage"] == "explain"
    assert payload["error"] == "StoreCorruptError"
    assert payload["detail"] == "token map 3 contains NaN"


def test_entity_file_stems_unique():
    stems = entity_file_stems(["Nodule", "right upper lobe", "nodule", "9 mm", "😀", "Ground-glass opacity"])
    assert stems == ["nodule_0", "right_upper_lobe", "nodule_2", "9_mm", "entity", "ground_glass_opacity"]


def test_npy_export_names_and_shapes(tmp_path, text_encoder, explainer):
    prompt = "Nodule in the right upper lobe and nodule in the left lower lobe."
    path = write_prompt_study(tmp_path, text_encoder, prompt)
    result = explainer.explain(path, grid=(64, 64, 64))

    written = export_entity_npy(StudyStore.open(path, require="explained"), tmp_path / "npy")
    names = [file.name for file in written]
    assert names == [
        "nodule_0_heatmap.npy",
        "right_upper_lobe_heatmap.npy",
        "nodule_2_heatmap.npy",
        "left_lower_lobe_heatmap.npy",
    ]
    for file, heatmap in zip(written, result.heatmaps):
        array = np.load(file)
        assert array.dtype == np.float32
        assert array.shape == (64, 64, 64)
        assert np.array_equal(array, heatmap)


def test_npy_export_needs_entities(tmp_path, text_encoder):
    path = write_prompt_study(tmp_path, text_encoder, PROMPT)
    with pytest.raises(StoreNotReadyError, match="run the NER step first"):
        export_entity_npy(StudyStore.open(path), tmp_path / "npy")
