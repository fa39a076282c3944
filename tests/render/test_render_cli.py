"""The render and report sub-commands as a user runs them: real subprocesses on real stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from test_render_stores import ENTITIES, write_render_study


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "medsyn_xai.cli", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=240, cwd=cwd,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("medsyn-xai: error:")]
    assert len(lines) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return write_render_study(tmp_path_factory.mktemp("root")).path


def test_render_cli_all_entities(store_path, tmp_path):
    result = run_cli("render", store_path, "--out", tmp_path / "png", "--window", "mediastinum")
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert len(paths) == len(ENTITIES) + 1
    assert paths[0].name == "case_entity_00_nodule.png"
    assert paths[2].name == "case_entity_02_pleural_effusion.png"
    assert paths[-1].name == "case_tokens.png"
    for path in paths[:-1]:
        assert matplotlib.image.imread(path).shape == (520, 1500, 4)
    assert matplotlib.image.imread(paths[-1]).shape == (600, 1500, 4)


def test_render_cli_one_entity(store_path, tmp_path):
    result = run_cli("render", store_path, "--entity", "Right Upper Lobe", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    names = [Path(line).name for line in result.stdout.splitlines()]
    assert names == ["case_entity_01_right_upper_lobe.png", "case_tokens.png"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--entity", "pneumothorax"], ["'pneumothorax' is not in study 'case'", "'nodule'", "'left lower lobe'"]),
        (["--window", "bone"], ["invalid window 'bone'", "lung, mediastinum"]),
        (["--joint", "nodule", "atelectasis"], ["'atelectasis' is not in study 'case'"]),
        (["--joint", "nodule", "lobe", "--entity", "nodule"], ["--entity and --joint cannot be combined"]),
    ],
)
def test_render_cli_bad_input(store_path, tmp_path, args, fragments):
    result = run_cli("render", store_path, *args, "--out", tmp_path / "png")
    assert result.returncode == 2
    line = error_line(result)
    assert all(fragment in line for fragment in fragments), line
    assert not (tmp_path / "png").exists() or not any((tmp_path / "png").iterdir())


def test_render_cli_joint(store_path, tmp_path):
    result = run_cli("render", store_path, "--joint", "nodule", "nodule", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    path_line, summary = result.stdout.splitlines()
    assert Path(path_line).name == "case_joint_00_00_nodule_nodule.png"
    assert matplotlib.image.imread(path_line).shape == (520, 1500, 4)
    assert summary.startswith("dice 1.000 (top 10%), overlap on axial slices z ")


def test_render_cli_without_entities(tmp_path):
    path = write_render_study(tmp_path / "root", specs=[]).path
    result = run_cli("render", path, "--out", tmp_path / "png")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert Path(lines[0]).name == "case_tokens.png"
    assert "no entities in study 'case'" in lines[1]
    assert "token chart only" in lines[1]


def test_render_cli_missing_store(tmp_path):
    result = run_cli("render", tmp_path / "studies" / "nothing.zarr")
    assert result.returncode == 2
    assert "not found" in error_line(result)


def test_report_cli_writes_html(store_path, tmp_path):
    result = run_cli("report", store_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "case_report.html"
    page = (tmp_path / "case_report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert 'id="pair-table"' in page

    out = tmp_path / "reports" / "study.html"
    result = run_cli("report", store_path, "--out", out)
    assert result.returncode == 0
    assert Path(result.stdout.strip()) == out
    assert out.is_file()


def test_report_cli_unwritable_out(store_path, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("report", store_path, "--out", blocker / "report.html")
    assert result.returncode == 2
    assert "choose another --out" in error_line(result)
