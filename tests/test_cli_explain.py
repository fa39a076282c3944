"""The ner, ner-eval, explain, import-legacy and export --format npy commands, run as subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import error_line, run_cli

from medsyn_xai.store import StudyStore, marker_path

PROMPT = "Spiculated 9 mm nodule in the right upper lobe. No pleural effusion."






@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path, Path]:
    from conftest import TINY_CONFIG_TOML

    root = tmp_path_factory.mktemp("root")
    config = tmp_path_factory.mktemp("config") / "tiny.toml"
    config.write_text(TINY_CONFIG_TOML)
    result = run_cli(
        "generate", PROMPT, "--out", root, "--study-id", "case-1", "--seed", "2", "--config", config, check=True
    )
    return root, config, Path(result.stdout.strip())


def test_ner_json_keys():
    result = run_cli("ner", PROMPT, "--json", check=True)
    entities = json.loads(result.stdout)

    texts = [entity["text"] for entity in entities]
    assert texts == ["Spiculated", "9 mm", "nodule", "right upper lobe", "pleural effusion"]
    for entity in entities:
        assert set(entity) == {"text", "label", "start", "end", "assertion"}
        assert PROMPT[entity["start"] : entity["end"]] == entity["text"]
    assert entities[-1]["assertion"] == "absent"


def test_ner_table_aligned():
    result = run_cli("ner", PROMPT, check=True)
    lines = result.stdout.splitlines()

    assert lines[0].split() == ["text", "label", "start", "end", "assertion"]
    assert len(lines) == 6
    label_column = lines[0].index("label")
    assert all(line[label_column:].split()[0] in {"label", "FINDING", "BODY_PART", "MODIFIER"} for line in lines)
    assert lines[-1].split()[-1] == "absent"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--backend", "spacy"], "unknown NER backend 'spacy'"),
        (["--backend", "transformer"], "ner.model_folder is empty"),
        (["--backend", "transformer", "--model-folder", "/nonexistent/model"], "'/nonexistent/model' not found"),
        (["--model-folder", "/nonexistent/model"], "--model-folder is read only by the transformer backend"),
    ],
)
def test_ner_bad_backend_exits_2(args, fragment):
    result = run_cli("ner", PROMPT, *args)
    assert result.returncode == 2
    assert fragment in error_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize("text", ["", "   "])
def test_ner_empty_prompt_exits_2(text):
    result = run_cli("ner", text)
    assert result.returncode == 2
    assert "prompt is empty" in error_line(result)
    assert result.stdout == ""


def test_ner_eval_default_gold():
    result = run_cli("ner-eval", check=True)
    lines = result.stdout.splitlines()

    assert lines[0].startswith("backend rules ")
    assert [line.split()[0] for line in lines[3:7]] == ["FINDING", "BODY_PART", "MODIFIER", "micro"]
    assert lines[-1].startswith("assertion accuracy ")


def test_ner_eval_without_gold_exits_2(tmp_path):
    result = run_cli("ner-eval", cwd=tmp_path)
    assert result.returncode == 2
    assert "pass --gold FILE" in error_line(result)


def test_explain_end_to_end(generated, tmp_path):
    root, _, path = generated
    result = run_cli("explain", path, check=True)
    lines = result.stdout.splitlines()

    assert lines[0] == str(path)
    assert lines[1].startswith("5 entities (5 covered by tokens, 0 without), heatmaps 16x16x16, NER rules ")
    assert marker_path(root, "case-1", "explained").is_file()
    store = StudyStore.open(path, require="explained")
    store.validate()
    assert store.entity_heatmaps.shape == (5, 16, 16, 16)
    assert [entity["text"] for entity in store.entities][-1] == "pleural effusion"

    again = run_cli("explain", path, check=True)
    assert again.stdout == result.stdout
    assert np.array_equal(StudyStore.open(path, require="explained").entity_heatmaps, store.entity_heatmaps)

    exported = run_cli("export", path, "--format", "npy", "--out", tmp_path / "npy", check=True)
    files = [Path(line) for line in exported.stdout.splitlines()]
    assert [file.name for file in files] == [
        "spiculated_heatmap.npy",
        "9_mm_heatmap.npy",
        "nodule_heatmap.npy",
        "right_upper_lobe_heatmap.npy",
        "pleural_effusion_heatmap.npy",
    ]
    assert np.load(files[2]).shape == (16, 16, 16)
    assert np.load(files[2]).dtype == np.float32


def test_explain_grid_option(generated, tmp_path):
    root, config, _ = generated
    result = run_cli("generate", PROMPT, "--out", tmp_path, "--study-id", "grid", "--config", config, check=True)
    path = Path(result.stdout.strip())

    run_cli("explain", path, "--grid", "8", "4", "2", check=True)
    assert StudyStore.open(path, require="explained").entity_heatmaps.shape == (5, 8, 4, 2)


@pytest.mark.parametrize("grid", [["0", "64", "64"], ["64", "-2", "64"], ["a", "64", "64"]])
def test_explain_bad_grid_exits_2(generated, grid):
    _, _, path = generated
    result = run_cli("explain", path, "--grid", *grid)
    assert result.returncode == 2
    assert f"invalid --grid {' '.join(grid)}" in error_line(result)


def test_explain_without_marker_exits_2(generated, tmp_path):
    _, config, _ = generated
    result = run_cli("generate", PROMPT, "--out", tmp_path, "--study-id", "half", "--config", config, check=True)
    marker_path(tmp_path, "half", "sampled").unlink()

    failed = run_cli("explain", Path(result.stdout.strip()))
    assert failed.returncode == 2
    assert "marker 'half.sampled' is missing" in error_line(failed)
    assert not marker_path(tmp_path, "half", "explained").exists()


def test_export_npy_before_explain_exits_2(generated, tmp_path):
    _, config, _ = generated
    result = run_cli("generate", PROMPT, "--out", tmp_path, "--study-id", "fresh", "--config", config, check=True)

    failed = run_cli("export", Path(result.stdout.strip()), "--format", "npy", "--out", tmp_path / "npy")
    assert failed.returncode == 2
    assert "run the NER step first" in error_line(failed)


def test_import_legacy_then_explain(generated, tmp_path):
    _, config, _ = generated
    folder = tmp_path / "legacy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, token in [(1, "sp"), (5, "nod"), (6, "##ule")]:
        token_map = rng.random((64, 8, 8)).astype(np.float32)
        np.save(folder / f"scan7_sample_0_token_{index}_{token}_heatmaps.npy", token_map)

    result = run_cli(
        "import-legacy", folder, "--prompt", PROMPT, "--out", tmp_path / "root", "--config", config, check=True
    )
    path = Path(result.stdout.strip())
    assert path == tmp_path / "root" / "studies" / "scan7.zarr"
    store = StudyStore.open(path)
    assert store.attrs["saliency"]["method"] == "legacy_import"
    assert store.ct.shape == (16, 16, 16)

    explained = run_cli("explain", path, check=True)
    assert explained.stdout.splitlines()[0] == str(path)
    assert StudyStore.open(path, require="explained").entity_heatmaps.shape[1:] == (16, 16, 16)


def test_import_legacy_empty_folder_exits_2(tmp_path):
    (tmp_path / "legacy").mkdir()
    result = run_cli("import-legacy", tmp_path / "legacy", "--prompt", PROMPT, "--out", tmp_path / "root")
    assert result.returncode == 2
    assert "no legacy token maps" in error_line(result)
