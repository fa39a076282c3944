"""Tests of the study store against real Zarr v3 folders and NIfTI files in a temporary root."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from structlog.testing import capture_logs

from medsyn_xai import __version__
from medsyn_xai.store import (
    FORMAT_VERSION,
    InvalidStudyIdError,
    SampledStudy,
    StoreCorruptError,
    StoreError,
    StoreNotReadyError,
    StudyExistsError,
    StudyNotFoundError,
    StudyStore,
    export_nifti,
    list_studies,
    marker_path,
    nifti_affine,
    remove_abandoned_temporaries,
    studies_dir,
    study_path,
    validate_study_id,
    write_entities,
    write_failed_marker,
    write_study,
)

SHAPE_ZYX = (8, 6, 4)
NATIVE_GRID = (4, 3, 2)
SPACING_MM = (2.5, 1.5, 1.0)
WORDS = ["[CLS]", "small", "nodule", "left", "lung", "[SEP]"]


def make_tokens() -> list[dict]:
    tokens = []
    offset = 0
    for index, word in enumerate(WORDS):
        special = word.startswith("[")
        start = 0 if special else offset
        end = 0 if special else offset + len(word)
        offset = end + 1 if not special else offset
        tokens.append({"index": index, "text": word, "start": start, "end": end, "special": special})
    return tokens


def make_study(study_id: str = "study-001", *, seed: int = 7, **overrides) -> SampledStudy:
    rng = np.random.default_rng(seed)
    raw = rng.random((len(WORDS), *NATIVE_GRID)).astype(np.float32)
    saliency = (raw / raw.sum(axis=0, keepdims=True)).astype(np.float32)  # every voxel sums to 1 over T
    lung = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    lung[2:6, 1:5, 1:3] = 1
    airway = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    airway[:, 3, 2] = 1
    fields = {
        "study_id": study_id,
        "prompt": "small nodule left lung",
        "ct": rng.integers(-1000, 1000, size=SHAPE_ZYX, dtype=np.int16),
        "masks": {"lung": lung, "airway": airway},
        "tokens": make_tokens(),
        "saliency": saliency,
        "spacing_mm": SPACING_MM,
        "attrs": {
            "seed": seed,
            "sampler": {"steps": 50, "guidance_scale": 1.0},
            "model": {"name": "tiny-unet3d", "checkpoint_sha256": "ab" * 32, "dim": 8},
            "text_encoder": {"name": "tiny-bert", "max_length": len(WORDS)},
            "truncated": False,
        },
    }
    fields.update(overrides)
    return SampledStudy(**fields)


def make_entities() -> tuple[list[dict], np.ndarray]:
    entities = [
        {"text": "small nodule", "label": "FINDING", "start": 0, "end": 12, "assertion": "present", "tokens": [1, 2]},
        {"text": "left lung", "label": "BODY_PART", "start": 13, "end": 22, "assertion": "present", "tokens": [3, 4]},
    ]
    heatmaps = np.random.default_rng(3).random((2, *SHAPE_ZYX)).astype(np.float32)
    return entities, heatmaps


def hidden_entries(root: Path) -> list[str]:
    return sorted(entry.name for entry in studies_dir(root).iterdir() if entry.name.startswith("."))


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, SampledStudy]:
    study = make_study()
    return write_study(tmp_path, study), study


def test_write_study_round_trips_arrays(written: tuple[Path, SampledStudy]) -> None:
    path, study = written
    store = StudyStore.open(path)

    ct = store.ct
    assert ct.dtype == np.int16
    np.testing.assert_array_equal(ct, study.ct)
    assert store.mask_names == ["lung", "airway"]
    masks = store.masks
    for name, mask in study.masks.items():
        assert masks[name].dtype == np.uint8
        np.testing.assert_array_equal(masks[name], mask)
    saliency = store.saliency()
    assert saliency.dtype == np.float32
    np.testing.assert_array_equal(saliency, study.saliency)
    assert store.saliency_array.chunks == (1, *NATIVE_GRID)


def test_write_study_round_trips_attrs(written: tuple[Path, SampledStudy]) -> None:
    path, study = written
    store = StudyStore.open(path)

    assert store.path == path
    assert store.root == path.parent.parent
    assert store.study_id == "study-001"
    assert store.prompt == study.prompt
    assert store.tokens == study.tokens
    assert store.spacing_mm == SPACING_MM
    assert store.attrs["format_version"] == FORMAT_VERSION
    assert store.attrs["axes"] == "zyx"
    assert store.attrs["seed"] == 7
    assert store.attrs["sampler"] == study.attrs["sampler"]
    assert store.attrs["model"] == study.attrs["model"]
    assert store.attrs["text_encoder"] == study.attrs["text_encoder"]
    assert store.attrs["truncated"] is False
    assert store.attrs["software_version"] == __version__
    assert store.attrs["created_at"].endswith("+00:00")


def test_write_study_keeps_given_provenance(tmp_path: Path) -> None:
    attrs = dict(make_study().attrs, created_at="2024-01-02T03:04:05+00:00", software_version="9.9.9")
    path = write_study(tmp_path, make_study(attrs=attrs))

    store = StudyStore.open(path)
    marker = json.loads(marker_path(tmp_path, "study-001", "sampled").read_text())

    assert store.attrs["created_at"] == "2024-01-02T03:04:05+00:00"
    assert store.attrs["software_version"] == "9.9.9"
    assert marker["created_at"] == "2024-01-02T03:04:05+00:00"
    assert marker["software_version"] == "9.9.9"


def test_write_study_converts_numpy_attrs(tmp_path: Path) -> None:
    attrs = dict(make_study().attrs, seed=np.int64(11), window=np.array([-1000, 400]), shape=(8, 6, 4))
    path = write_study(tmp_path, make_study(attrs=attrs))

    store = StudyStore.open(path)

    assert store.attrs["seed"] == 11
    assert store.attrs["window"] == [-1000, 400]
    assert store.attrs["shape"] == [8, 6, 4]


def test_sampled_marker_contents(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    marker = json.loads(marker_path(tmp_path, "study-001", "sampled").read_text())

    assert marker["study_id"] == "study-001"
    assert marker["path"] == "studies/study-001.zarr"
    assert marker["software_version"] == __version__
    assert marker["created_at"] == StudyStore.open(path).attrs["created_at"]
    assert hidden_entries(tmp_path) == []


def test_write_study_logs_event(tmp_path: Path) -> None:
    with capture_logs() as events:
        write_study(tmp_path, make_study())

    written_events = [event for event in events if event["event"] == "study_written"]
    assert len(written_events) == 1
    assert written_events[0]["study_id"] == "study-001"


def test_open_without_marker_raises(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    marker_path(tmp_path, "study-001", "sampled").unlink()

    with pytest.raises(StoreNotReadyError, match=r"study-001\.sampled"):
        StudyStore.open(path)
    assert StudyStore.open(path, require=None).study_id == "study-001"


def test_open_explained_requires_marker(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written

    with pytest.raises(StoreNotReadyError, match=r"study-001\.explained"):
        StudyStore.open(path, require="explained")


def test_open_missing_folder_raises(tmp_path: Path) -> None:
    path = study_path(tmp_path, "absent")

    with pytest.raises(StudyNotFoundError, match=r"absent\.zarr") as caught:
        StudyStore.open(path)
    assert isinstance(caught.value, StoreNotReadyError)
    assert isinstance(caught.value, FileNotFoundError)


def test_open_rejects_other_folder_names(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a study store"):
        StudyStore.open(tmp_path)


def test_open_rejects_wrong_format_version(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written
    group = zarr.open_group(path, mode="r+")
    group.attrs["format_version"] = 2

    with pytest.raises(StoreCorruptError, match="format_version 2"):
        StudyStore.open(path)


def test_open_rejects_missing_ct(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written
    group = zarr.open_group(path, mode="r+")
    del group["ct"]

    with pytest.raises(StoreCorruptError, match="'ct' is missing"):
        StudyStore.open(path)


INVALID_IDS = ["../x", "/abs", "", "a" * 200, ".hidden", "a/b", ".", "..", "x.zarr", "x.tmp", "a b", "id\n", "ü"]


@pytest.mark.parametrize("study_id", INVALID_IDS)
def test_invalid_study_id_rejected_before_paths(tmp_path: Path, study_id: str) -> None:
    root = tmp_path / "root"

    with pytest.raises(InvalidStudyIdError, match="invalid study id"):
        write_study(root, make_study(study_id))
    with pytest.raises(InvalidStudyIdError):
        study_path(root, study_id)
    with pytest.raises(InvalidStudyIdError):
        marker_path(root, study_id, "sampled")
    with pytest.raises(InvalidStudyIdError):
        write_failed_marker(root, study_id, stage="sample", error="RuntimeError", detail="boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("study_id", ["a", "a" * 128, "CT-001_v2.1", "0abc"])
def test_valid_study_id_accepted(study_id: str) -> None:
    assert validate_study_id(study_id) == study_id


def test_invalid_id_message_text() -> None:
    with pytest.raises(InvalidStudyIdError) as caught:
        validate_study_id("../x")

    message = str(caught.value)
    assert "'../x'" in message
    assert "1-128 characters" in message
    assert "\n" not in message


def test_existing_study_rejected(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    with pytest.raises(StudyExistsError, match="overwrite=True"):
        write_study(tmp_path, make_study())


def test_existing_marker_alone_rejected(tmp_path: Path) -> None:
    write_failed_marker(tmp_path, "study-001", stage="sample", error="RuntimeError", detail="out of memory")

    with pytest.raises(StudyExistsError, match="failed"):
        write_study(tmp_path, make_study())


def test_overwrite_replaces_study(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    entities, heatmaps = make_entities()
    write_entities(path, entities, heatmaps, backend="rules", backend_version="1")
    write_failed_marker(tmp_path, "study-001", stage="explain", error="ValueError", detail="bad span")
    replacement = make_study(seed=99)

    assert write_study(tmp_path, replacement, overwrite=True) == path

    store = StudyStore.open(path)
    np.testing.assert_array_equal(store.ct, replacement.ct)
    assert store.attrs["seed"] == 99
    assert not store.has_entities
    assert "entities" not in zarr.open_group(path, mode="r")
    assert list_studies(tmp_path) == {"study-001": {"zarr", "sampled"}}
    assert hidden_entries(tmp_path) == []


def test_wrong_token_count_rejected_before_writing(tmp_path: Path) -> None:
    study = make_study(tokens=make_tokens()[:-1])

    with pytest.raises(ValueError, match="saliency"):
        write_study(tmp_path, study)
    assert not studies_dir(tmp_path).exists()


def test_wrong_mask_dtype_leaves_nothing(tmp_path: Path) -> None:
    masks = dict(make_study().masks, lesion=np.zeros(SHAPE_ZYX, dtype=np.float32))

    with pytest.raises(ValueError, match="masks/lesion"):
        write_study(tmp_path, make_study(masks=masks))
    assert list_studies(tmp_path) == {}
    assert not studies_dir(tmp_path).exists()


@pytest.mark.parametrize(
    ("overrides", "node"),
    [
        ({"ct": np.zeros(SHAPE_ZYX, dtype=np.float32)}, "ct"),
        ({"ct": np.zeros((8, 6), dtype=np.int16)}, "ct"),
        ({"masks": {"lung": np.zeros((8, 6, 5), dtype=np.uint8)}}, "masks/lung"),
        ({"saliency": np.zeros((len(WORDS), *NATIVE_GRID), dtype=np.float64)}, "saliency"),
        ({"saliency": np.full((len(WORDS), *NATIVE_GRID), np.nan, dtype=np.float32)}, "NaN"),
        ({"saliency": np.full((len(WORDS), *NATIVE_GRID), -1.0, dtype=np.float32)}, "negative"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing_mm"),
        ({"attrs": {"seed": 1}}, "sampler"),
        ({"attrs": dict(make_study().attrs, prompt="x")}, "prompt"),
        ({"masks": {"../lung": np.zeros(SHAPE_ZYX, dtype=np.uint8)}}, "mask name"),
    ],
)
def test_invalid_study_fields_rejected(tmp_path: Path, overrides: dict, node: str) -> None:
    with pytest.raises(ValueError, match=node):
        write_study(tmp_path, make_study(**overrides))
    assert not studies_dir(tmp_path).exists()


def test_failure_while_writing_leaves_nothing(tmp_path: Path) -> None:
    attrs = dict(make_study().attrs, sampler={"callback": object()})

    with pytest.raises(TypeError, match=r"attrs\.sampler\.callback"):
        write_study(tmp_path, make_study(attrs=attrs))
    assert list(studies_dir(tmp_path).iterdir()) == []


def test_failed_overwrite_keeps_old_study(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, study = written
    attrs = dict(study.attrs, sampler={"callback": object()})

    with pytest.raises(TypeError):
        write_study(tmp_path, make_study(attrs=attrs, seed=5), overwrite=True)

    np.testing.assert_array_equal(StudyStore.open(path).ct, study.ct)
    assert hidden_entries(tmp_path) == []


def test_unwritable_root_raises_store_error(tmp_path: Path) -> None:
    root = tmp_path / "a-file"
    root.write_text("not a folder")

    with pytest.raises(StoreError, match=r"is not writable.*--out"):
        write_study(root, make_study())


def test_write_entities_writes_group_and_marker(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    entities, heatmaps = make_entities()

    write_entities(path, entities, heatmaps, backend="rules", backend_version="1.2", extra_attrs={"cache": "abc"})

    store = StudyStore.open(path, require="explained")
    assert store.has_entities
    assert store.entities == entities
    np.testing.assert_array_equal(store.entity_heatmaps, heatmaps)
    assert store.entity_attrs == {"backend": "rules", "backend_version": "1.2", "cache": "abc"}
    assert zarr.open_group(path, mode="r")["entities/heatmaps"].chunks == (1, *SHAPE_ZYX)
    marker = json.loads(marker_path(tmp_path, "study-001", "explained").read_text())
    assert marker["n_entities"] == 2
    assert marker["backend"] == "rules"
    assert hidden_entries(tmp_path) == []


def test_write_entities_replaces_previous(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written
    entities, heatmaps = make_entities()
    write_entities(path, entities, heatmaps, backend="rules", backend_version="1")

    write_entities(path, entities[:1], heatmaps[:1], backend="spacy", backend_version="3.7")

    store = StudyStore.open(path, require="explained")
    assert store.entities == entities[:1]
    assert store.entity_heatmaps.shape == (1, *SHAPE_ZYX)
    assert store.entity_attrs["backend"] == "spacy"


def test_write_entities_accepts_zero(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written

    write_entities(path, [], np.zeros((0, *SHAPE_ZYX), dtype=np.float32), backend="rules", backend_version="1")

    store = StudyStore.open(path, require="explained")
    assert store.entities == []
    assert store.entity_heatmaps.shape == (0, *SHAPE_ZYX)
    store.validate()


def test_write_entities_requires_sampled(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    marker_path(tmp_path, "study-001", "sampled").unlink()
    entities, heatmaps = make_entities()

    with pytest.raises(StoreNotReadyError, match="sampled"):
        write_entities(path, entities, heatmaps, backend="rules", backend_version="1")
    assert not marker_path(tmp_path, "study-001", "explained").exists()


@pytest.mark.parametrize(
    ("heatmaps", "match"),
    [
        (np.zeros((3, *SHAPE_ZYX), dtype=np.float32), "number of entities"),
        (np.zeros((2, *SHAPE_ZYX), dtype=np.float64), "float32"),
        (np.full((2, *SHAPE_ZYX), np.inf, dtype=np.float32), "NaN or infinite"),
    ],
)
def test_write_entities_rejects_bad_heatmaps(
    written: tuple[Path, SampledStudy], tmp_path: Path, heatmaps: np.ndarray, match: str
) -> None:
    path, _ = written
    entities, _ = make_entities()

    with pytest.raises(ValueError, match=match):
        write_entities(path, entities, heatmaps, backend="rules", backend_version="1")
    assert not marker_path(tmp_path, "study-001", "explained").exists()


def test_entities_before_ner_raise(written: tuple[Path, SampledStudy]) -> None:
    store = StudyStore.open(written[0])

    assert not store.has_entities
    with pytest.raises(StoreNotReadyError, match="explained"):
        _ = store.entities


def test_nifti_affine_centres_volume() -> None:
    affine = nifti_affine(SPACING_MM, SHAPE_ZYX)
    centre_xyz = [(SHAPE_ZYX[2] - 1) / 2, (SHAPE_ZYX[1] - 1) / 2, (SHAPE_ZYX[0] - 1) / 2, 1.0]

    np.testing.assert_allclose(np.diag(affine), [-1.0, -1.5, 2.5, 1.0])
    np.testing.assert_allclose(affine @ centre_xyz, [0.0, 0.0, 0.0, 1.0], atol=1e-12)


def test_export_nifti_writes_ct_and_masks(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, study = written
    out_dir = tmp_path / "nifti" / "study-001"

    paths = export_nifti(StudyStore.open(path), out_dir)

    assert [item.name for item in paths] == ["ct.nii.gz", "mask_lung.nii.gz", "mask_airway.nii.gz"]
    ct_image = nib.load(paths[0])
    assert ct_image.shape == (SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0])
    assert ct_image.get_data_dtype() == np.int16
    np.testing.assert_allclose(np.diag(ct_image.affine), [-1.0, -1.5, 2.5, 1.0])
    assert int(ct_image.header["qform_code"]) == 1
    assert int(ct_image.header["sform_code"]) == 1
    assert ct_image.header.get_xyzt_units()[0] == "mm"
    assert nib.aff2axcodes(ct_image.affine) == ("L", "P", "S")
    data = np.asarray(ct_image.dataobj)
    assert data[3, 1, 5] == study.ct[5, 1, 3]
    np.testing.assert_array_equal(data, study.ct.transpose(2, 1, 0))
    lung_image = nib.load(paths[1])
    assert lung_image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(lung_image.dataobj), study.masks["lung"].transpose(2, 1, 0))


def test_export_nifti_voxel_lands_transposed(tmp_path: Path) -> None:
    ct = np.full(SHAPE_ZYX, -1000, dtype=np.int16)
    ct[6, 2, 1] = 500
    path = write_study(tmp_path, make_study(ct=ct))

    paths = export_nifti(StudyStore.open(path), tmp_path / "out")

    data = np.asarray(nib.load(paths[0]).dataobj)
    assert data[1, 2, 6] == 500
    assert int((data == 500).sum()) == 1


def test_export_nifti_writes_entity_heatmaps(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    entities, heatmaps = make_entities()
    entities[1]["text"] = "Left   Lung (upper lobe), " + "x" * 60
    write_entities(path, entities, heatmaps, backend="rules", backend_version="1")

    paths = export_nifti(StudyStore.open(path), tmp_path / "out")

    names = [item.name for item in paths]
    assert names[3] == "entity_00_small_nodule.nii.gz"
    assert names[4] == "entity_01_" + "left_lung_upper_lobe_" + "x" * 19 + ".nii.gz"  # text cut to 40 characters
    image = nib.load(paths[3])
    assert image.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(image.dataobj), heatmaps[0].transpose(2, 1, 0))
    np.testing.assert_allclose(image.affine, nib.load(paths[0]).affine)


def test_export_nifti_scales_coarse_heatmaps(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    entities, _ = make_entities()
    coarse = np.ones((2, 4, 3, 2), dtype=np.float32)
    write_entities(path, entities, coarse, backend="rules", backend_version="1")

    paths = export_nifti(StudyStore.open(path), tmp_path / "out")

    ct_affine = nib.load(paths[0]).affine
    heatmap_image = nib.load(paths[3])
    assert heatmap_image.shape == (2, 3, 4)
    np.testing.assert_allclose(np.diag(heatmap_image.affine), [-2.0, -3.0, 5.0, 1.0])
    ct_extent = np.abs(np.diag(ct_affine)[:3]) * np.array(SHAPE_ZYX[::-1])
    heatmap_extent = np.abs(np.diag(heatmap_image.affine)[:3]) * np.array(heatmap_image.shape)
    np.testing.assert_allclose(heatmap_extent, ct_extent)
    ct_corner = ct_affine @ [-0.5, -0.5, -0.5, 1.0]
    heatmap_corner = heatmap_image.affine @ [-0.5, -0.5, -0.5, 1.0]
    np.testing.assert_allclose(heatmap_corner, ct_corner)


def test_export_nifti_skips_heatmaps_on_request(written: tuple[Path, SampledStudy], tmp_path: Path) -> None:
    path, _ = written
    entities, heatmaps = make_entities()
    write_entities(path, entities, heatmaps, backend="rules", backend_version="1")

    paths = export_nifti(StudyStore.open(path), tmp_path / "out", heatmaps=False)

    assert [item.name for item in paths] == ["ct.nii.gz", "mask_lung.nii.gz", "mask_airway.nii.gz"]


def test_list_studies_reports_parts(tmp_path: Path) -> None:
    assert list_studies(tmp_path) == {}
    first = write_study(tmp_path, make_study("first"))
    write_study(tmp_path, make_study("second"))
    entities, heatmaps = make_entities()
    write_entities(first, entities, heatmaps, backend="rules", backend_version="1")
    write_failed_marker(tmp_path, "third", stage="sample", error="RuntimeError", detail="CUDA out of memory")
    (studies_dir(tmp_path) / ".fourth.zarr.tmp-1-abcd").mkdir()
    (studies_dir(tmp_path) / ".second.sampled.tmp-1-abcd").write_text("{}")
    (studies_dir(tmp_path) / "notes.txt").write_text("not a study")

    assert list_studies(tmp_path) == {
        "first": {"zarr", "sampled", "explained"},
        "second": {"zarr", "sampled"},
        "third": {"failed"},
    }


def test_write_failed_marker_contents(tmp_path: Path) -> None:
    path = write_failed_marker(tmp_path, "study-002", stage="sample", error="RuntimeError", detail="CUDA out of memory")

    payload = json.loads(path.read_text())

    assert path == studies_dir(tmp_path) / "study-002.failed"
    assert payload["stage"] == "sample"
    assert payload["error"] == "RuntimeError"
    assert payload["detail"] == "CUDA out of memory"
    assert payload["study_id"] == "study-002"


def test_validate_accepts_written_store(written: tuple[Path, SampledStudy]) -> None:
    StudyStore.open(written[0]).validate()


@pytest.mark.parametrize(("value", "match"), [(np.nan, "NaN"), (-0.25, "negative")])
def test_validate_rejects_bad_saliency(written: tuple[Path, SampledStudy], value: float, match: str) -> None:
    path, _ = written
    zarr.open_group(path, mode="r+")["saliency/tokens"][2, 1, 1, 1] = value

    with pytest.raises(StoreCorruptError, match=f"saliency/tokens.*{match}.*token map 2"):
        StudyStore.open(path).validate()


def test_validate_rejects_token_count_mismatch(written: tuple[Path, SampledStudy]) -> None:
    path, study = written
    zarr.open_group(path, mode="r+").attrs["tokens"] = study.tokens[:-2]

    with pytest.raises(StoreCorruptError, match=r"6 token maps.*4 tokens"):
        StudyStore.open(path).validate()


def test_validate_rejects_wrong_ct_dtype(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written
    group = zarr.open_group(path, mode="r+")
    del group["ct"]
    group.create_array("ct", data=np.zeros(SHAPE_ZYX, dtype=np.float32))

    with pytest.raises(StoreCorruptError, match="'ct' is float32"):
        StudyStore.open(path).validate()


def test_validate_rejects_heatmap_count_mismatch(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written
    entities, heatmaps = make_entities()
    write_entities(path, entities, heatmaps, backend="rules", backend_version="1")
    zarr.open_group(path, mode="r+")["entities"].attrs["entities"] = entities[:1]

    with pytest.raises(StoreCorruptError, match="entities/heatmaps"):
        StudyStore.open(path).validate()


def test_summary_reports_provenance(written: tuple[Path, SampledStudy]) -> None:
    path, _ = written

    summary = StudyStore.open(path).summary()

    assert summary["study_id"] == "study-001"
    assert summary["prompt"] == "small nodule left lung"
    assert summary["arrays"]["ct"] == {"shape": list(SHAPE_ZYX), "dtype": "int16"}
    assert summary["arrays"]["masks/lung"] == {"shape": list(SHAPE_ZYX), "dtype": "uint8"}
    assert summary["arrays"]["saliency/tokens"] == {"shape": [len(WORDS), *NATIVE_GRID], "dtype": "float32"}
    assert summary["n_tokens"] == 6
    assert summary["n_special"] == 2
    assert summary["truncated"] is False
    assert summary["prompt_tokens"] is None  # this store does not record it
    assert summary["hidden_tokens"] is None
    assert summary["provenance"]["model_name"] == "tiny-unet3d"
    assert summary["provenance"]["checkpoint_sha256"] == "ab" * 32
    assert summary["provenance"]["seed"] == 7
    assert summary["provenance"]["software_version"] == __version__
    assert summary["saliency_sum"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert summary["saliency_sum"]["max"] == pytest.approx(1.0, abs=1e-5)
    assert summary["markers"] == ["sampled"]
    json.dumps(summary)


def test_abandoned_temporaries_removed(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    stale = studies / ".old.zarr.tmp-12-ab12cd34"
    fresh = studies / ".new.zarr.tmp-13-ef56ab78"
    kept_store = studies / "done.zarr"
    for folder in (stale / "ct", fresh / "ct", kept_store):
        folder.mkdir(parents=True)
    (stale / "ct" / "c0").write_bytes(b"partial")
    hour_ago = time.time() - 3600
    for path in (stale / "ct" / "c0", stale / "ct", stale, kept_store):
        os.utime(path, (hour_ago, hour_ago))

    removed = remove_abandoned_temporaries(tmp_path, older_than_seconds=60)

    assert removed == [stale]
    assert not stale.exists()
    assert fresh.is_dir()
    assert kept_store.is_dir()


def test_temporary_with_recent_write_kept(tmp_path: Path) -> None:
    writing = tmp_path / "studies" / ".busy.zarr.tmp-14-0011aabb"
    (writing / "saliency").mkdir(parents=True)
    hour_ago = time.time() - 3600
    os.utime(writing, (hour_ago, hour_ago))
    (writing / "saliency" / "c0").write_bytes(b"new chunk")

    assert remove_abandoned_temporaries(tmp_path, older_than_seconds=60) == []
    assert writing.is_dir()
    assert remove_abandoned_temporaries(tmp_path / "missing", older_than_seconds=60) == []
