"""`medsyn-xai train` and `medsyn-xai evaluate` run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN_TOML = """
[text]
max_tokens = 24

[model]
dim = 8
dim_mults = [1, 2]
heads = 2
dim_head = 8
text_tokens = 24
depth = 8
height = 8
width = 8

[sampler]
steps = 2
device = "cpu"

[output]
grid = [16, 16, 16]

[train]
out_dir = "{out_dir}"
cases = 6
batch_size = 2
steps = 3
checkpoint_every = 2
log_every = 1
phantom_shape = [16, 16, 16]
"""


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medsyn_xai.cli", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("train")
    config = folder / "train.toml"
    config.write_text(TRAIN_TOML.format(out_dir=folder / "run"))
    result = run_cli("train", "--config", config, "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    return config, Path(result.stdout.strip())


def test_train_writes_checkpoints_and_export(trained):
    config, exported = trained
    run = exported.parent
    assert exported.name == "model.safetensors"
    assert exported.is_file()
    assert (run / "latest.pt").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002.pt", "step-000003.pt"]


def test_train_resume_continues(trained, tmp_path):
    config, exported = trained
    longer = tmp_path / "longer.toml"
    longer.write_text(config.read_text().replace("steps = 3", "steps = 4"))
    result = run_cli("train", "--config", longer, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"training resumed"' in result.stderr or "training resumed" in result.stderr
    assert (exported.parent / "checkpoints" / "step-000004.pt").is_file()


def test_evaluate_json_keys(trained):
    config, exported = trained
    result = run_cli("evaluate", "--config", config, "--checkpoint", exported, "--n", "4", "--json", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    for key in ("lesion_location_accuracy", "negated_absent_rate", "normal_clean_rate",
                "pointing_game", "mass_in_mask", "auroc"):
        assert key in report
    assert set(report["baseline_last_layer_last_step"]) == {"pointing_game", "mass_in_mask", "auroc"}
    assert report["counts"]["cases"] == 4

    rows = report["cases"]
    assert [row["kind"] for row in rows] == ["located", "located", "negated", "normal"]
    located = [row["location_correct"] for row in rows if row["kind"] == "located"]
    assert report["lesion_location_accuracy"] == pytest.approx(sum(located) / len(located))
    negated = [row for row in rows if row["kind"] == "negated"]
    assert negated[0]["lesion_clean"] == bool(report["negated_absent_rate"])
    assert all(row["report"] for row in rows)


def test_train_bad_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nsteps = -1\n")
    result = run_cli("train", "--config", config)
    assert result.returncode == 2
    assert "train.steps is -1" in result.stderr


def test_evaluate_rejects_zero_cases():
    result = run_cli("evaluate", "--n", "0")
    assert result.returncode == 2
    assert "--n is 0" in result.stderr
