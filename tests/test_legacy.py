"""Import of Medsyn_XAI per-token .npy folders into study stores, then the explain job on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsyn_xai.legacy import LegacyImportError, import_legacy, scan_legacy_folder
from medsyn_xai.ner import get_backend
from medsyn_xai.pipeline.explain import StudyExplainer
from medsyn_xai.store import InvalidStudyIdError, StudyExistsError, StudyStore, marker_path

PROMPT = "Spiculated nodule in the right upper lobe. No pleural effusion."
LEGACY_SHAPE = (64, 8, 8)


def legacy_name(index: int, token: str, *, study: str = "ct_001", sample: int = 0) -> str:
    return f"{study}_sample_{sample}_token_{index}_{token}_heatmaps.npy"


def write_legacy_folder(folder: Path, text_encoder, *, seed: int = 0) -> dict[int, np.ndarray]:
    """Write one map per non-special token of PROMPT, as the original scripts did, and return them by index."""
    folder.mkdir(parents=True, exist_ok=True)
    records = text_encoder.tokenize(PROMPT)[0]
    rng = np.random.default_rng(seed)
    maps = {}
    for record in records:
        if record.special:
            continue
        token_map = rng.random(LEGACY_SHAPE).astype(np.float32)
        np.save(folder / legacy_name(record.index, record.text), token_map)
        maps[record.index] = token_map
    return maps


def test_import_round_trip(tmp_path, text_encoder):
    maps = write_legacy_folder(tmp_path / "legacy", text_encoder)
    path = import_legacy(tmp_path / "legacy", PROMPT, tmp_path / "root", text_encoder=text_encoder)

    assert path == tmp_path / "root" / "studies" / "ct_001.zarr"
    assert marker_path(tmp_path / "root", "ct_001", "sampled").is_file()
    store = StudyStore.open(path)
    store.validate()
    assert store.prompt == PROMPT
    assert store.tokens == [record.to_dict() for record in text_encoder.tokenize(PROMPT)[0]]

    saliency = store.saliency()
    assert saliency.shape == (text_encoder.max_tokens, *LEGACY_SHAPE)
    for index in range(saliency.shape[0]):
        if index in maps:
            assert np.array_equal(saliency[index], maps[index])
        else:
            assert not saliency[index].any()

    ct = store.ct
    assert ct.dtype == np.int16
    assert ct.shape == (64, 64, 64)
    assert not ct.any()
    assert store.masks == {}
    assert store.attrs["ct_source"] == "none (legacy import)"
    assert store.attrs["saliency"]["method"] == "legacy_import"
    legacy = store.attrs["legacy"]
    assert legacy["study"] == "ct_001"
    assert legacy["sample"] == 0
    assert legacy["n_files"] == len(maps)
    assert legacy["token_mismatches"] == []
    assert legacy["missing_token_indices"] == [index for index in range(text_encoder.max_tokens) if index not in maps]


def test_imported_store_explains(tmp_path, text_encoder):
    maps = write_legacy_folder(tmp_path / "legacy", text_encoder)
    path = import_legacy(tmp_path / "legacy", PROMPT, tmp_path / "root", text_encoder=text_encoder)
    result = StudyExplainer(get_backend("rules")).explain(path)

    texts = [entity.text for entity in result.entities]
    assert texts == ["Spiculated", "nodule", "right upper lobe", "pleural effusion"]
    assert result.heatmaps.shape == (4, 64, 64, 64)
    nodule = result.entities[1]
    resized = [
        F.interpolate(torch.from_numpy(maps[index])[None, None], size=(64, 64, 64), mode="trilinear")[0, 0].numpy()
        for index in nodule.token_indices
    ]
    np.testing.assert_allclose(result.heatmaps[1], np.mean(resized, axis=0), rtol=1e-5, atol=1e-7)
    assert StudyStore.open(path, require="explained").has_entities


def test_study_id_override(tmp_path, text_encoder):
    write_legacy_folder(tmp_path / "legacy", text_encoder)
    path = import_legacy(tmp_path / "legacy", PROMPT, tmp_path / "root", text_encoder=text_encoder, study_id="other")

    assert path.name == "other.zarr"
    with pytest.raises(StudyExistsError):
        import_legacy(tmp_path / "legacy", PROMPT, tmp_path / "root", text_encoder=text_encoder, study_id="other")
    again = import_legacy(
        tmp_path / "legacy", PROMPT, tmp_path / "root", text_encoder=text_encoder, study_id="other", overwrite=True
    )
    assert again == path


def test_token_mismatch_recorded(tmp_path, text_encoder):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / legacy_name(1, "wrong"), np.ones(LEGACY_SHAPE, dtype=np.float32))
    path = import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)

    mismatches = StudyStore.open(path).attrs["legacy"]["token_mismatches"]
    token = text_encoder.tokenize(PROMPT)[0][1].text
    assert token != "wrong"
    assert mismatches == [{"index": 1, "file_token": "wrong", "token": token}]


def test_other_files_skipped(tmp_path, text_encoder):
    maps = write_legacy_folder(tmp_path / "legacy", text_encoder)
    np.save(tmp_path / "legacy" / "nodule_heatmap.npy", np.ones((64, 64, 64), dtype=np.float32))
    (tmp_path / "legacy" / "notes.txt").write_text("not a map")

    assert len(scan_legacy_folder(tmp_path / "legacy")) == len(maps)


def test_float64_maps_cast(tmp_path, text_encoder):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / legacy_name(2, "nod"), np.full(LEGACY_SHAPE, 0.25, dtype=np.float64))
    path = import_legacy(folder, "nodule", tmp_path / "root", text_encoder=text_encoder)

    saliency = StudyStore.open(path).saliency()
    assert saliency.dtype == np.float32
    assert np.all(saliency[2] == 0.25)


def assert_one_line_naming(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_folder_rejected(tmp_path, text_encoder):
    with pytest.raises(LegacyImportError) as caught:
        import_legacy(tmp_path / "absent", PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, "absent", "not found")


def test_folder_without_maps_rejected(tmp_path, text_encoder):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / "nodule_heatmap.npy", np.ones((4, 4, 4), dtype=np.float32))

    with pytest.raises(LegacyImportError) as caught:
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, "no legacy token maps", "_heatmaps.npy")
    assert not (tmp_path / "root" / "studies").exists()


def test_inconsistent_shapes_rejected(tmp_path, text_encoder):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / legacy_name(1, "spiculated"), np.ones(LEGACY_SHAPE, dtype=np.float32))
    np.save(folder / legacy_name(2, "nod"), np.ones((64, 8, 4), dtype=np.float32))

    with pytest.raises(LegacyImportError) as caught:
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, legacy_name(2, "nod"), "(64, 8, 4)")


def test_token_index_past_encoder_rejected(tmp_path, text_encoder):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / legacy_name(1, "spiculated"), np.ones(LEGACY_SHAPE, dtype=np.float32))
    np.save(folder / legacy_name(150, "x"), np.ones(LEGACY_SHAPE, dtype=np.float32))

    with pytest.raises(LegacyImportError) as caught:
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, legacy_name(150, "x"), "token index 150", "text.max_tokens")


@pytest.mark.parametrize(
    ("second", "fragment"),
    [
        (legacy_name(2, "nod", study="ct_002"), "study 'ct_002'"),
        (legacy_name(2, "nod", sample=3), "sample 3"),
        (legacy_name(1, "other"), "repeats token index 1"),
    ],
)
def test_mixed_folder_rejected(tmp_path, text_encoder, second, fragment):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / legacy_name(1, "spiculated"), np.ones(LEGACY_SHAPE, dtype=np.float32))
    np.save(folder / second, np.ones(LEGACY_SHAPE, dtype=np.float32))

    with pytest.raises(LegacyImportError) as caught:
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, fragment)


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.full(LEGACY_SHAPE, np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full(LEGACY_SHAPE, -1.0, dtype=np.float32), "negative values"),
        (np.ones(LEGACY_SHAPE, dtype=np.int32), "dtype int32"),
        (np.ones((8, 8), dtype=np.float32), "shape (8, 8)"),
        (np.ones((0, 8, 8), dtype=np.float32), "shape (0, 8, 8)"),
    ],
)
def test_invalid_map_rejected(tmp_path, text_encoder, array, fragment):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / legacy_name(1, "spiculated"), array)

    with pytest.raises(LegacyImportError) as caught:
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, legacy_name(1, "spiculated"), fragment)


def test_unreadable_file_rejected(tmp_path, text_encoder):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / legacy_name(1, "spiculated")).write_bytes(b"not numpy")

    with pytest.raises(LegacyImportError) as caught:
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, legacy_name(1, "spiculated"), "not a readable .npy array")
    assert "allow_pickle" not in str(caught.value)


def test_invalid_study_name_needs_study_id(tmp_path, text_encoder):
    folder = tmp_path / "legacy"
    folder.mkdir()
    np.save(folder / legacy_name(1, "spiculated", study="ct 001"), np.ones(LEGACY_SHAPE, dtype=np.float32))

    with pytest.raises(LegacyImportError) as caught:
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder)
    assert_one_line_naming(caught, "'ct 001'", "--study-id")
    with pytest.raises(InvalidStudyIdError):
        import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder, study_id="../x")
    path = import_legacy(folder, PROMPT, tmp_path / "root", text_encoder=text_encoder, study_id="ct-001")
    assert path.name == "ct-001.zarr"


def test_invalid_grid_rejected(tmp_path, text_encoder):
    write_legacy_folder(tmp_path / "legacy", text_encoder)
    with pytest.raises(LegacyImportError, match=r"invalid grid \(0, 64, 64\)"):
        import_legacy(tmp_path / "legacy", PROMPT, tmp_path / "root", text_encoder=text_encoder, grid=(0, 64, 64))
