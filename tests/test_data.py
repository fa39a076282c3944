"""Training datasets: phantoms and a user folder of NIfTI files."""

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from medsyn_xai.data import DataError, NiftiFolderDataset, PhantomDataset, TextEmbeddingCache, downsample_case
from medsyn_xai.phantom import generate_phantom, random_spec
from medsyn_xai.store import nifti_affine

CHANNELS = ("ct", "lobes", "airway", "vessels", "lesion")


@pytest.fixture()
def cache(text_encoder) -> TextEmbeddingCache:
    return TextEmbeddingCache(lambda text: text_encoder.encode(text).embeddings, key="test")


def test_phantom_dataset_items(cache):
    dataset = PhantomDataset(range(3), text_cache=cache, channel_names=CHANNELS, native_shape=(8, 8, 8),
                             phantom_shape=(16, 16, 16))
    item = dataset[0]
    assert item["image"].shape == (5, 8, 8, 8)
    assert item["image"].dtype == torch.float32
    assert item["image"].min() >= -1
    assert item["image"].max() <= 1
    assert item["text"].shape == (24, 384)
    assert item["text"].dtype == torch.float32
    assert len(cache) == 3
    again = PhantomDataset(range(3), text_cache=cache, channel_names=CHANNELS, native_shape=(8, 8, 8),
                           phantom_shape=(16, 16, 16))
    assert torch.equal(again[2]["image"], dataset[2]["image"])
    assert len(cache) == 3


def test_downsample_keeps_small_lesions():
    channels = -np.ones((5, 16, 16, 16), dtype=np.float32)
    channels[4, 5, 5, 5] = 1.0  # a single lesion voxel
    small = downsample_case(channels, CHANNELS, (4, 4, 4))
    assert small.shape == (5, 4, 4, 4)
    assert small[4].max() == 1.0
    assert (small[4] > 0).sum() == 1


def write_nifti(path, volume_zyx, spacing=(5.0, 6.0, 6.0)):
    image = nib.Nifti1Image(volume_zyx.transpose(2, 1, 0), nifti_affine(spacing, volume_zyx.shape))
    nib.save(image, str(path))


def make_folder(tmp_path, rows, *, masks=True):
    phantom = generate_phantom(random_spec(3), shape=(16, 16, 16))
    with (tmp_path / "reports.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "report"])
        for study_id, report in rows:
            writer.writerow([study_id, report])
            write_nifti(tmp_path / f"{study_id}.nii.gz", phantom.ct.astype(np.int16))
            if masks:
                write_nifti(tmp_path / f"{study_id}_lesion.nii.gz", phantom.masks["lesion"])
    return phantom


def test_nifti_folder_round_trip(tmp_path, cache):
    phantom = make_folder(tmp_path, [("a", "Nodule in the RUL."), ("b", "Normal chest.")])
    dataset = NiftiFolderDataset(tmp_path, text_cache=cache, channel_names=CHANNELS, native_shape=(16, 16, 16))
    item = dataset[0]
    assert item["image"].shape == (5, 16, 16, 16)
    expected_ct = (np.clip(phantom.ct, -1024, 600) + 1024) / 1624 * 2 - 1
    assert np.allclose(item["image"][0].numpy(), expected_ct, atol=1e-5)
    assert np.array_equal(item["image"][4].numpy() > 0, phantom.masks["lesion"] > 0)
    assert (item["image"][1] == -1).all()  # no lobe file: empty channel
    assert item["report"] == "Nodule in the RUL."


def test_nifti_folder_resizes(tmp_path, cache):
    make_folder(tmp_path, [("a", "Clear lungs.")])
    dataset = NiftiFolderDataset(tmp_path, text_cache=cache, channel_names=CHANNELS, native_shape=(8, 8, 8))
    assert dataset[0]["image"].shape == (5, 8, 8, 8)


def test_nifti_folder_missing_file_names_row(tmp_path, cache):
    make_folder(tmp_path, [("a", "Clear lungs."), ("b", "Effusion.")])
    (tmp_path / "b.nii.gz").unlink()
    with pytest.raises(DataError, match=r"row 3 .*b\.nii\.gz' not found"):
        NiftiFolderDataset(tmp_path, text_cache=cache, channel_names=CHANNELS, native_shape=(8, 8, 8))


def test_nifti_folder_unreadable_file_names_row(tmp_path, cache):
    make_folder(tmp_path, [("a", "Clear lungs.")])
    (tmp_path / "a.nii.gz").write_bytes(b"not a nifti file")
    dataset = NiftiFolderDataset(tmp_path, text_cache=cache, channel_names=CHANNELS, native_shape=(8, 8, 8))
    with pytest.raises(DataError, match=r"row 2: file .*a\.nii\.gz' could not be read"):
        dataset[0]


def test_nifti_folder_bad_table(tmp_path, cache):
    with pytest.raises(DataError, match="reports.csv' not found"):
        NiftiFolderDataset(tmp_path, text_cache=cache, channel_names=CHANNELS, native_shape=(8, 8, 8))
    (tmp_path / "reports.csv").write_text("id,text\nx,y\n")
    with pytest.raises(DataError, match="lacks column"):
        NiftiFolderDataset(tmp_path, text_cache=cache, channel_names=CHANNELS, native_shape=(8, 8, 8))


def test_prefetch_matches_single_encoding(text_encoder):
    single = TextEmbeddingCache(lambda text: text_encoder.encode(text).embeddings, key="k", dtype=torch.float32)
    batched = TextEmbeddingCache(
        lambda text: text_encoder.encode(text).embeddings, key="k", dtype=torch.float32,
        encode_batch=text_encoder.encode_batch,
    )
    texts = ["Nodule in the RUL.", "No pleural effusion.", "Nodule in the RUL."]
    batched.prefetch(texts)
    assert len(batched) == 2
    for text in texts:
        assert torch.allclose(batched.get(text), single.get(text), atol=1e-4)
