"""The command line as a user runs it: real subprocesses, real stores."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import error_line, run_cli

from medsyn_xai.store import StudyStore

PROMPT = "Spiculated 9 mm nodule in the right upper lobe. No pleural effusion."






@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("root")
    config = tmp_path_factory.mktemp("config") / "tiny.toml"
    from conftest import TINY_CONFIG_TOML

    config.write_text(TINY_CONFIG_TOML)
    result = run_cli("generate", PROMPT, "--out", root, "--study-id", "case-1", "--seed", "4", "--config", config, check=True)
    return root, config, Path(result.stdout.strip())


def test_generate_progress_bar_not_redrawn(tmp_path, tiny_config_file):
    result = run_cli("generate", PROMPT, "--out", tmp_path, "--config", tiny_config_file, check=True)
    after_study_log = result.stderr.split("study written", 1)[1]
    assert "sampling" not in after_study_log


def test_generate_writes_store_and_prints_path(generated):
    root, _, path = generated
    assert path == root / "studies" / "case-1.zarr"
    assert (root / "studies" / "case-1.sampled").is_file()

    store = StudyStore.open(path)
    store.validate()
    assert store.prompt == PROMPT
    assert store.ct.dtype == np.int16
    assert store.ct.shape == (16, 16, 16)
    assert store.mask_names == ["lobes", "airway", "vessels", "lesion"]
    maps = store.saliency()
    assert maps.shape == (len(store.tokens), 8, 8, 8)
    assert np.allclose(maps.sum(axis=0), 1.0, atol=1e-5)
    assert store.attrs["seed"] == 4
    assert store.attrs["model"]["weights"] == "random-init"
    assert store.attrs["sampler"]["steps"] == 3
    assert store.attrs["text_encoder"]["hidden_size"] == 384
    assert store.attrs["software_version"]


def test_same_seed_same_ct(generated, tmp_path):
    root, config, path = generated
    result = run_cli("generate", PROMPT, "--out", tmp_path, "--study-id", "again", "--seed", "4", "--config", config, check=True)
    again = StudyStore.open(Path(result.stdout.strip()))
    assert np.array_equal(again.ct, StudyStore.open(path).ct)
    assert np.array_equal(again.saliency(), StudyStore.open(path).saliency())


def test_info_summarises_store(generated):
    _, _, path = generated
    result = run_cli("info", path, "--json", check=True)
    summary = json.loads(result.stdout)
    assert summary["study_id"] == "case-1"
    assert summary["arrays"]["ct"] == {"shape": [16, 16, 16], "dtype": "int16"}
    assert summary["saliency_sum"]["min"] == pytest.approx(1.0, abs=1e-5)
    text = run_cli("info", path, check=True).stdout
    assert "prompt: " + PROMPT in text


def test_export_nifti(generated, tmp_path):
    _, _, path = generated
    result = run_cli("export", path, "--format", "nifti", "--out", tmp_path / "nii", check=True)
    written = [Path(line) for line in result.stdout.splitlines()]
    names = sorted(p.name for p in written)
    assert "ct.nii.gz" in names
    assert "mask_lesion.nii.gz" in names
    ct = nib.load(tmp_path / "nii" / "ct.nii.gz")
    assert ct.shape == (16, 16, 16)
    assert np.allclose(np.diag(ct.affine)[:3], [-6.0, -6.0, 5.0])


def test_existing_study_refused_then_overwritten(generated, tmp_path):
    root, config, _ = generated
    result = run_cli("generate", PROMPT, "--out", root, "--study-id", "case-1", "--config", config)
    assert result.returncode == 2
    assert "--overwrite" in error_line(result)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["", "--study-id", "x"], "prompt is empty"),
        (["   ", "--study-id", "x"], "prompt is empty"),
        ([PROMPT, "--study-id", "../x"], "invalid study id '../x'"),
        ([PROMPT, "--study-id", "/abs"], "invalid study id '/abs'"),
        ([PROMPT, "--study-id", ""], "invalid study id ''"),
        ([PROMPT, "--study-id", "a" * 200], "invalid study id"),
        ([PROMPT, "--steps", "0"], "steps is 0"),
        ([PROMPT, "--steps", "-3"], "steps is -3"),
        ([PROMPT, "--guidance-scale", "-1"], "guidance scale is -1.0"),
        ([PROMPT, "--guidance-scale", "nan"], "guidance scale is nan"),
        ([PROMPT, "--seed", "-1"], "seed is -1"),
    ],
)
def test_bad_generate_input(tmp_path, tiny_config_file, args, fragment):
    result = run_cli("generate", *args, "--out", tmp_path / "root", "--config", tiny_config_file)
    assert result.returncode == 2
    assert fragment in error_line(result)
    assert not (tmp_path / "root" / "studies").exists() or not any((tmp_path / "root" / "studies").iterdir())


def test_bad_config_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[sampler]\nstepz = 4\n")
    result = run_cli("generate", PROMPT, "--out", tmp_path / "root", "--config", config)
    assert result.returncode == 2
    assert "unknown setting 'sampler.stepz'" in error_line(result)


def test_output_folder_not_writable(tmp_path, tiny_config_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("generate", PROMPT, "--out", blocker / "root", "--config", tiny_config_file)
    assert result.returncode == 2
    assert "is not writable" in error_line(result)


@pytest.mark.parametrize("kind", ["missing", "truncated", "other-architecture"])
def test_bad_checkpoint(tmp_path, tiny_config_file, kind):
    import torch

    from medsyn_xai.model.checkpoint import save_safetensors
    from medsyn_xai.model.unet import Unet3D, UnetConfig

    checkpoint = tmp_path / "model.safetensors"
    if kind != "missing":
        other = UnetConfig(dim=8, dim_mults=(1, 2), channels=2, heads=2, dim_head=8, cond_dim=384, text_tokens=24)
        torch.manual_seed(0)
        save_safetensors(Unet3D(other), checkpoint)
        if kind == "truncated":
            checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    config = tmp_path / "with-checkpoint.toml"
    config.write_text(tiny_config_file.read_text().replace('checkpoint = "none"', f"checkpoint = '{checkpoint}'"))

    result = run_cli("generate", PROMPT, "--out", tmp_path / "root", "--study-id", "x", "--config", config)
    assert result.returncode == 2
    line = error_line(result)
    assert str(checkpoint) in line or "channel" in line
    assert not (tmp_path / "root" / "studies" / "x.zarr").exists()


def test_info_refuses_store_without_marker(generated, tmp_path):
    _, _, path = generated
    import shutil

    copy = tmp_path / "studies" / "case-1.zarr"
    shutil.copytree(path, copy)
    result = run_cli("info", copy)
    assert result.returncode == 2
    assert "sampled" in error_line(result)


def test_long_prompt_truncated_and_recorded(tmp_path, tiny_config_file):
    prompt = "Small nodule in the left lower lobe. " * 10
    result = run_cli("generate", prompt, "--out", tmp_path, "--study-id", "long", "--config", tiny_config_file, check=True)
    store = StudyStore.open(Path(result.stdout.strip()))
    assert store.attrs["truncated"] is True
    assert store.attrs["prompt_tokens"] > 24
    assert "prompt truncated" in result.stderr
