"""``medsyn-xai serve`` and ``medsyn-xai status`` as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from medsyn_xai.pipeline.daemons import format_status, load_daemon_inputs, pipeline_status


def run_cli(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medsyn_xai.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=120,
    )


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for folder in ("inbox/done", "inbox/failed", "inbox/.claimed/host-1", "studies"):
        (root / folder).mkdir(parents=True)
    (root / "inbox" / "waiting.txt").write_text("nodule")
    (root / "inbox" / ".hidden.txt").write_text("ignored")
    (root / "inbox" / ".claimed" / "host-1" / "busy.txt").write_text("nodule")
    (root / "inbox" / "done" / "a.txt").write_text("nodule")
    (root / "inbox" / "failed" / "b.json").write_text("{")
    (root / "inbox" / "failed" / "b.json.error.json").write_text("{}")
    for name in ("s1.sampled", "s1.explained", "s2.sampled", "s3.sampled", "s3.failed"):
        (root / "studies" / name).write_text("{}")
    return root


def test_status_counts_prompts_and_studies(tmp_path):
    status = pipeline_status(make_root(tmp_path))
    assert status["prompts"] == {"inbox": 1, "claimed": 1, "claimed_expired": 0, "done": 1, "failed": 1}
    assert status["studies"] == {"sampled": 3, "explained": 1, "failed": 1, "waiting": 1}


def test_status_table_is_aligned():
    table = format_status({"prompts": {"inbox": 12, "done": 3}})
    assert table.splitlines() == [
        "kind     state  count",
        "prompts  inbox     12",
        "prompts  done       3",
    ]


def test_status_command_json_and_table(tmp_path):
    root = make_root(tmp_path)
    result = run_cli("status", "--root", root, "--json")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["root"] == str(root)
    assert counts["studies"]["waiting"] == 1

    table = run_cli("status", env={"MEDSYN_XAI_ROOT": str(root)})
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == f"root: {root}"
    assert "prompts  claimed" in table.stdout


def test_status_missing_root_is_usage_error(tmp_path):
    result = run_cli("status", "--root", tmp_path / "nowhere")
    assert result.returncode == 2
    assert "data root" in result.stderr
    assert "not found" in result.stderr


def test_serve_bad_config_is_usage_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[pipeline]\nobserver = 'fanotify'\n")
    result = run_cli("serve", "sampler", "--root", tmp_path, "--config", config)
    assert result.returncode == 2
    assert "'pipeline.observer' is 'fanotify'" in result.stderr


def test_daemon_inputs_precedence(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[pipeline]\nroot = 'from-config'\nsettle_ms = 50\n")
    environ = {"MEDSYN_XAI_CONFIG": str(config), "MEDSYN_XAI_ROOT": "from-env"}
    settings, root = load_daemon_inputs(environ=environ)
    assert settings.pipeline.settle_ms == 50
    assert root == Path("from-env")
    assert load_daemon_inputs(root=tmp_path, environ=environ)[1] == tmp_path
    assert load_daemon_inputs(environ={"MEDSYN_XAI_CONFIG": str(config)})[1] == Path("from-config")
    assert load_daemon_inputs(environ={})[1] == Path("data")


def test_serve_ner_runs_until_sigint(tmp_path):
    root = tmp_path / "data"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "medsyn_xai.cli", "serve", "ner", "--root", str(root)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while "daemon_ready" not in log_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.1)
        assert (root / "studies").is_dir()
        process.send_signal(signal.SIGINT)
        returncode = process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 0, log_path.read_text()
    assert "daemon_stopped" in log_path.read_text()
