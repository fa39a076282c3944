"""The live pipeline as a user runs it: real daemon processes, real watchdog observers, real files.

Every daemon runs ``services/<kind>.py`` in a subprocess with ``MEDSYN_XAI_ROOT`` and
``MEDSYN_XAI_CONFIG`` pointing at a temporary data root and a tiny model config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medsyn_xai.store import SampledStudy, StudyStore, list_studies, write_study

REPO = Path(__file__).resolve().parents[2]
PYTHON_BIN = str(Path(sys.executable).parent)

REPORTS = [
    "Spiculated 9 mm nodule in the right upper lobe. No pleural effusion.",
    "Moderate left pleural effusion with compressive atelectasis of the left lower lobe.",
    "Patchy ground-glass opacities in both lower lobes. No pneumothorax.",
]
SLOW_HALVES = ("Large mass in the left upper lobe with mediastinal ", "lymphadenopathy and a small right effusion.")


def tiny_config(folder: Path, **pipeline: object) -> Path:
    """Write the tiny model config of tests/conftest.py plus a [pipeline] table."""
    from conftest import TINY_CONFIG_TOML

    values = {"settle_ms": 150, "reconcile_seconds": 1.0, "poll_seconds": 0.25, **pipeline}
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = folder / "tiny.toml"
    path.write_text(TINY_CONFIG_TOML + "\n[pipeline]\n" + "\n".join(lines) + "\n")
    return path


class Daemon:
    """One daemon subprocess with its JSON log in a file."""

    def __init__(self, kind: str, root: Path, config: Path, log_path: Path, *, steps: int = 2) -> None:
        self.kind = kind
        self.log_path = log_path
        self.env = {
            **os.environ,
            "PATH": PYTHON_BIN + os.pathsep + os.environ.get("PATH", ""),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MEDSYN_XAI_ROOT": str(root),
            "MEDSYN_XAI_CONFIG": str(config),
            "MEDSYN_XAI__SAMPLER__STEPS": str(steps),
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "services" / f"{self.kind}.py")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
            )
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self, name: str | None = None) -> list[dict]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (name is None or record.get("event") == name):
                records.append(record)
        return records

    def wait_ready(self, timeout: float = 90) -> Daemon:
        wait_for(lambda: self.events("daemon_ready"), timeout, f"{self.kind} ready", self)
        return self

    def stop(self, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.kind} did not stop within {timeout} s:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]


def wait_for(predicate, timeout: float, description: str, *daemons: Daemon):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for daemon in daemons:
            if daemon.process.poll() is not None:
                raise AssertionError(f"{daemon.kind} exited with {daemon.process.returncode}:\n{daemon.tail()}")
        time.sleep(0.05)
    logs = "\n".join(daemon.tail() for daemon in daemons)
    raise AssertionError(f"timed out after {timeout} s waiting for {description}\n{logs}")


def files(folder: Path, pattern: str = "*") -> list[str]:
    return sorted(path.name for path in folder.glob(pattern)) if folder.is_dir() else []


def prompt_names(folder: Path) -> list[str]:
    return [name for name in files(folder) if not name.endswith(".error.json")]


# name -> (bytes, expected error code, fragment the detail must contain); a few are built in place.
LIMIT = 4096
BAD_FILES = {
    "empty.txt": (b"", "empty_prompt", "no report text"),
    "blank.txt": (b"  \n\t \n", "empty_prompt", "no report text"),
    "binary.txt": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary", "binary"),
    "latin1.txt": ("Rundherd, größer".encode("latin-1"), "invalid_utf8", "not valid UTF-8"),
    "utf16.txt": (REPORTS[0].encode("utf-16"), "utf16", "UTF-16"),
    "big.txt": (b"a" * (LIMIT + 1), "too_large", "too large"),
    "malformed.json": (b'{"prompt": "nodule",', "invalid_json", "not valid JSON"),
    "list.json": (b'["nodule"]', "not_an_object", "list"),
    "wrong-type.json": (b'{"prompt": "x", "seed": "7"}', "wrong_type", '"seed"'),
    "steps-float.json": (b'{"prompt": "x", "steps": 2.5}', "wrong_type", '"steps"'),
    "prompt-number.json": (b'{"prompt": 42}', "wrong_type", '"prompt"'),
    "unknown.json": (b'{"prompt": "x", "temperature": 0.7}', "unknown_keys", "temperature"),
    "missing.json": (b'{"study_id": "m1"}', "missing_prompt", '"prompt"'),
    "blank-prompt.json": (b'{"prompt": "  "}', "empty_prompt", "no report text"),
    "traversal.json": (b'{"prompt": "x", "study_id": "../../outside"}', "invalid_study_id", "../../outside"),
    "absolute.json": (b'{"prompt": "x", "study_id": "/etc/passwd"}', "invalid_study_id", "/etc/passwd"),
    "bad name.txt": (REPORTS[0].encode(), "invalid_study_id", "file name"),
    "duplicate.json": (b'{"prompt": "x", "study_id": "taken"}', "duplicate_study", "duplicate"),
    "negative-steps.json": (b'{"prompt": "x", "steps": -3}', "invalid_request", "steps is -3"),
    "huge-steps.json": (b'{"prompt": "x", "steps": 99999999}', "invalid_request", "steps is 99999999"),
    "absurd-scale.json": (b'{"prompt": "x", "guidance_scale": 1e12}', "invalid_request", "guidance scale"),
    "negative-seed.json": (b'{"prompt": "x", "seed": -1}', "invalid_request", "seed is -1"),
    "nan.json": (b'{"prompt": "x", "guidance_scale": NaN}', "invalid_json", "NaN"),
    "twice.json": (b'{"prompt": "a", "prompt": "b"}', "invalid_json", "twice"),
    "report.docx": (b"PK\x03\x04", "unsupported_type", ".docx"),
    "symlink.txt": (None, "symlink", "symlink"),
    "folder.txt": (None, "not_a_file", "folder"),
    "pipe.txt": (None, "not_a_file", "not a regular file"),
}


def drop_bad_files(inbox: Path, outside: Path) -> None:
    for name, (data, _, _) in BAD_FILES.items():
        if data is not None:
            (inbox / name).write_bytes(data)
    outside.write_text(REPORTS[0])
    (inbox / "symlink.txt").symlink_to(outside)
    (inbox / "folder.txt").mkdir()
    os.mkfifo(inbox / "pipe.txt")


@pytest.fixture(scope="module", params=["inotify", "polling"])
def ingestion(request, tmp_path_factory):
    """One sampler run per observer kind covering every ingestion path.

    Before start: two prompts and a study "taken". While running: a rename into the
    inbox, a prompt written slowly in two halves, the bad files, then a good file.
    """
    base = tmp_path_factory.mktemp(f"ingest-{request.param}")
    root = base / "data"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    (root / "studies").mkdir()
    (root / "studies" / "taken.sampled").write_text("{}")
    (inbox / "down-1.txt").write_text(REPORTS[0])
    (inbox / "down-2.json").write_text(json.dumps({"prompt": REPORTS[1], "seed": 5}))
    config = tiny_config(base, observer=request.param, max_prompt_bytes=LIMIT)

    daemon = Daemon("sampler", root, config, base / "sampler.log").start()
    try:
        daemon.wait_ready()
        staging = root / "staging"
        staging.mkdir()
        (staging / "renamed.txt").write_text(REPORTS[2])
        os.rename(staging / "renamed.txt", inbox / "renamed.txt")

        with open(inbox / "slow.txt", "w", encoding="utf-8") as handle:
            handle.write(SLOW_HALVES[0])
            handle.flush()
            time.sleep(1.2)  # longer than settle_ms and the polling interval
            handle.write(SLOW_HALVES[1])

        drop_bad_files(inbox, base / "outside.txt")
        wait_for(lambda: len(prompt_names(inbox / "failed")) >= len(BAD_FILES), 60, "bad files in failed/", daemon)
        (inbox / "after-bad.txt").write_text(REPORTS[1])
        expected_done = ["after-bad.txt", "down-1.txt", "down-2.json", "renamed.txt", "slow.txt"]
        wait_for(lambda: files(inbox / "done") == expected_done, 60, "good prompts in done/", daemon)
    finally:
        returncode = daemon.stop()
    return SimpleNamespace(root=root, inbox=inbox, daemon=daemon, returncode=returncode, outside=base / "outside.txt")


def test_files_dropped_while_down_are_processed(ingestion):
    studies = list_studies(ingestion.root)
    assert studies["down-1"] == {"zarr", "sampled"}
    assert studies["down-2"] == {"zarr", "sampled"}
    store = StudyStore.open(ingestion.root / "studies" / "down-2.zarr")
    assert store.prompt == REPORTS[1]
    assert store.attrs["seed"] == 5
    assert store.attrs["sampler"]["steps"] == 2
    assert store.attrs["source"]["file"] == "down-2.json"


def test_slow_writer_is_read_only_when_complete(ingestion):
    store = StudyStore.open(ingestion.root / "studies" / "slow.zarr")
    assert store.prompt == "".join(SLOW_HALVES)
    jobs = [event for event in ingestion.daemon.events("job_finished") if event["path"].endswith("/slow.txt")]
    assert [event["outcome"] for event in jobs] == ["sampled"]


def test_rename_into_inbox_is_ingested_once(ingestion):
    jobs = [event for event in ingestion.daemon.events("job_finished") if event["path"].endswith("/renamed.txt")]
    assert [event["outcome"] for event in jobs] == ["sampled"]
    assert [name for name in files(ingestion.inbox / "done") if name.startswith("renamed")] == ["renamed.txt"]
    assert StudyStore.open(ingestion.root / "studies" / "renamed.zarr").prompt == REPORTS[2]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_ends_in_failed_with_reason(ingestion, name):
    _, code, fragment = BAD_FILES[name]
    failed = ingestion.inbox / "failed"
    assert os.path.lexists(failed / name)
    record = json.loads((failed / f"{name}.error.json").read_text())
    assert record["error"] == code
    assert fragment in record["detail"]
    assert record["worker"]
    assert record["time"]


def test_good_file_after_bad_ones_completes(ingestion):
    studies = list_studies(ingestion.root)
    assert studies["after-bad"] == {"zarr", "sampled"}
    assert set(studies) == {"taken", "down-1", "down-2", "renamed", "slow", "after-bad"}
    assert ingestion.outside.read_text() == REPORTS[0]  # the symlink target was never touched
    assert not (ingestion.root / "outside").exists()
    assert [name for name in files(ingestion.inbox) if not name.startswith(".")] == ["done", "failed"]
    assert ingestion.returncode == 0
    assert not (ingestion.inbox / ".claimed").exists() or not any((ingestion.inbox / ".claimed").iterdir())


def test_sigterm_returns_claim_within_5s(tmp_path):
    root = tmp_path / "data"
    (root / "inbox").mkdir(parents=True)
    daemon = Daemon("sampler", root, tiny_config(tmp_path), tmp_path / "sampler.log", steps=400).start()
    try:
        daemon.wait_ready()
        (root / "inbox" / "long.txt").write_text(REPORTS[0])
        wait_for(lambda: daemon.events("sampling started"), 30, "sampling to start", daemon)
        started = time.monotonic()
        returncode = daemon.stop(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        daemon.kill()
    assert returncode == 0
    assert elapsed < 5, f"stopping took {elapsed:.1f} s"
    assert (root / "inbox" / "long.txt").read_text() == REPORTS[0]
    assert list_studies(root) == {}
    assert not list((root / "inbox" / ".claimed").glob("*/*"))
    assert [event["outcome"] for event in daemon.events("job_finished")] == ["returned"]


def test_sigterm_while_loading_exits_zero(tmp_path):
    root = tmp_path / "data"
    daemon = Daemon("sampler", root, tiny_config(tmp_path), tmp_path / "sampler.log").start()
    try:
        time.sleep(1.5)
        started = time.monotonic()
        returncode = daemon.stop(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        daemon.kill()
    assert returncode == 0, daemon.tail()
    assert elapsed < 5


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_deleted_inbox_exits_nonzero(tmp_path, observer):
    root = tmp_path / "data"
    daemon = Daemon("sampler", root, tiny_config(tmp_path, observer=observer), tmp_path / "sampler.log").start()
    try:
        daemon.wait_ready()
        import shutil

        shutil.rmtree(root / "inbox")
        returncode = daemon.process.wait(15)
    finally:
        daemon.kill()
    assert returncode == 1
    assert daemon.events("daemon_failed")


@pytest.mark.slow
def test_two_samplers_process_each_prompt_once(tmp_path):
    root = tmp_path / "data"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    config = tiny_config(tmp_path)
    workers = [Daemon("sampler", root, config, tmp_path / f"sampler-{index}.log", steps=1) for index in range(2)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
        names = [f"burst-{index:02d}" for index in range(50)]
        for index, name in enumerate(names):
            (inbox / f"{name}.txt").write_text(f"{REPORTS[index % 3]} Case {index}.")
        wait_for(lambda: len(files(inbox / "done")) == 50, 180, "50 prompts in done/", *workers)
    finally:
        returncodes = [worker.stop() for worker in workers]
    assert returncodes == [0, 0]
    assert files(inbox / "done") == [f"{name}.txt" for name in names]
    assert files(inbox / "failed") == []
    studies = list_studies(root)
    assert sorted(studies) == names
    assert all(parts == {"zarr", "sampled"} for parts in studies.values())

    written = Counter(event["study_id"] for worker in workers for event in worker.events("study_written"))
    assert written == Counter({name: 1 for name in names})
    by_worker = {event["study_id"]: event["worker"] for worker in workers for event in worker.events("study_written")}
    for name in names:
        assert StudyStore.open(root / "studies" / f"{name}.zarr").attrs["source"]["worker"] == by_worker[name]
    assert len(set(by_worker.values())) == 2, "both workers should have taken part"


@pytest.mark.slow
def test_killed_sampler_claim_completes_once(tmp_path):
    root = tmp_path / "data"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    config = tiny_config(tmp_path, lease_seconds=2.0, reconcile_seconds=0.5)
    samplers = [Daemon("sampler", root, config, tmp_path / f"sampler-{index}.log", steps=150) for index in range(2)]
    ner = Daemon("ner", root, config, tmp_path / "ner.log")
    try:
        for daemon in (*samplers, ner):
            daemon.start()
        for daemon in (*samplers, ner):
            daemon.wait_ready()
        (inbox / "victim.txt").write_text(REPORTS[0])
        wait_for(lambda: any(s.events("sampling started") for s in samplers), 30, "sampling to start", *samplers)
        killed, survivor = samplers if samplers[0].events("sampling started") else samplers[::-1]
        killed.kill()
        killed_at = time.monotonic()
        assert files(inbox / ".claimed" / killed.events("daemon_ready")[0]["worker"]) == ["victim.txt"]

        wait_for(lambda: files(inbox / "done") == ["victim.txt"], 90, "the prompt in done/", survivor, ner)
        recovered_after = time.monotonic() - killed_at
        wait_for(lambda: (root / "studies" / "victim.explained").exists(), 30, "the explained marker", ner)
    finally:
        codes = [daemon.stop() for daemon in (*samplers, ner)]
    assert sorted(codes) == sorted([0, 0, -signal.SIGKILL])
    assert recovered_after >= 2.0  # not before the lease expired
    assert survivor.events("expired_claim_returned")
    assert not killed.events("study_written")
    assert [event["study_id"] for event in survivor.events("study_written")] == ["victim"]
    store = StudyStore.open(root / "studies" / "victim.zarr", require="explained")
    assert store.attrs["source"]["worker"] == survivor.events("daemon_ready")[0]["worker"]
    assert list_studies(root) == {"victim": {"zarr", "sampled", "explained"}}
    assert [event["outcome"] for event in ner.events("job_finished")] == ["explained"]
    assert not list((inbox / ".claimed").glob("*/*"))


def test_sampler_removes_abandoned_study_folders(tmp_path):
    root = tmp_path / "data"
    (root / "inbox").mkdir(parents=True)
    abandoned = root / "studies" / ".victim.zarr.tmp-4242-deadbeef"
    (abandoned / "ct").mkdir(parents=True)
    (abandoned / "ct" / "c0").write_bytes(b"partial chunk")
    hour_ago = time.time() - 3600
    for path in (abandoned / "ct" / "c0", abandoned / "ct", abandoned):
        os.utime(path, (hour_ago, hour_ago))
    config = tiny_config(tmp_path, lease_seconds=2.0, reconcile_seconds=0.5)
    sampler = Daemon("sampler", root, config, tmp_path / "sampler.log")
    try:
        sampler.start().wait_ready()
        wait_for(lambda: not abandoned.exists(), 30, "the abandoned folder to go", sampler)
    finally:
        code = sampler.stop()
    assert code == 0
    assert [event["path"] for event in sampler.events("abandoned_temporary_removed")] == [str(abandoned)]


def synthetic_study(study_id: str, prompt: str) -> SampledStudy:
    """A valid study without a model: whitespace tokens and uniform token maps."""
    tokens = [{"index": 0, "text": "[CLS]", "start": 0, "end": 0, "special": True}]
    position = 0
    for word in prompt.split():
        start = prompt.index(word, position)
        position = start + len(word)
        tokens.append({"index": len(tokens), "text": word, "start": start, "end": position, "special": False})
    tokens.append({"index": len(tokens), "text": "[SEP]", "start": 0, "end": 0, "special": True})
    saliency = np.full((len(tokens), 2, 4, 4), 1.0 / len(tokens), dtype=np.float32)
    return SampledStudy(
        study_id=study_id,
        prompt=prompt,
        ct=np.zeros((4, 8, 8), dtype=np.int16),
        masks={"lobes": np.zeros((4, 8, 8), dtype=np.uint8)},
        tokens=tokens,
        saliency=saliency,
        spacing_mm=(5.0, 6.0, 6.0),
        attrs={"seed": 0, "sampler": {}, "model": {"name": "synthetic", "checkpoint_sha256": ""}, "text_encoder": {}},
    )


def test_ner_daemon_fails_broken_stores(tmp_path):
    root = tmp_path / "data"
    studies = root / "studies"
    write_study(root, synthetic_study("first-good", REPORTS[0]))

    (studies / "garbage.zarr").mkdir()
    (studies / "garbage.zarr" / "zarr.json").write_text("{ not json")
    (studies / "garbage.sampled").write_text("{}")
    (studies / "no-store.sampled").write_text("{}")
    write_study(root, synthetic_study("no-maps", REPORTS[1]))
    (studies / "no-maps.zarr" / "saliency" / "tokens" / "zarr.json").unlink()
    write_study(root, synthetic_study("already", REPORTS[2]))
    (studies / "already.failed").write_text("{}")

    ner = Daemon("ner", root, tiny_config(tmp_path), tmp_path / "ner.log").start()
    try:
        ner.wait_ready()
        wait_for(lambda: len(ner.events("job_finished")) >= 4, 60, "four explain jobs", ner)
        write_study(root, synthetic_study("later-good", REPORTS[2]))
        wait_for(lambda: (studies / "later-good.explained").exists(), 30, "the later store explained", ner)
    finally:
        returncode = ner.stop()
    assert returncode == 0
    markers = list_studies(root)
    assert markers["first-good"] == {"zarr", "sampled", "explained"}
    assert markers["later-good"] == {"zarr", "sampled", "explained"}
    for study_id in ("garbage", "no-store", "no-maps"):
        assert "failed" in markers[study_id]
        assert "explained" not in markers[study_id]
        record = json.loads((studies / f"{study_id}.failed").read_text())
        assert record["stage"] == "explain"
        assert record["error"]
        assert record["detail"]
    assert json.loads((studies / "already.failed").read_text()) == {}  # skipped, not overwritten
    outcomes = Counter(event["outcome"] for event in ner.events("job_finished"))
    assert outcomes == Counter({"explained": 2, "failed": 3})
    store = StudyStore.open(studies / "later-good.zarr", require="explained")
    assert [entity["text"] for entity in store.entities]


@pytest.mark.slow
def test_honcho_runs_both_daemons_end_to_end(tmp_path):
    root = tmp_path / "data"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    examples = sorted((REPO / "medsyn_xai" / "examples").glob("*.txt"))
    assert len(examples) == 3
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = Daemon("sampler", root, tiny_config(tmp_path), tmp_path / "unused.log").env
    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-f", str(REPO / "Procfile"), "-e", str(env_file), "start"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for example in examples:
            (inbox / example.name).write_bytes(example.read_bytes())
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and len(files(root / "studies", "*.explained")) < 3:
            assert honcho.poll() is None, log_path.read_text()[-4000:]
            time.sleep(0.2)
        assert len(files(root / "studies", "*.explained")) == 3, log_path.read_text()[-4000:]

        status = subprocess.run(
            [sys.executable, "-m", "medsyn_xai.cli", "status", "--root", str(root), "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
    finally:
        honcho.send_signal(signal.SIGTERM)
        try:
            honcho_code = honcho.wait(15)
        finally:
            if honcho.poll() is None:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait()
    assert honcho_code is not None

    for example in examples:
        store = StudyStore.open(root / "studies" / f"{example.stem}.zarr", require="explained")
        store.validate()
        assert store.prompt == example.read_text().strip()
        assert store.ct.dtype == np.int16
        assert store.ct.ndim == 3
        maps = store.saliency()
        assert maps.shape[0] == len(store.tokens)
        assert np.allclose(maps.sum(axis=0), 1.0, atol=1e-4)
        assert store.entities
        assert store.entity_heatmaps.shape[0] == len(store.entities)
        assert store.markers == ["sampled", "explained"]
    counts = json.loads(status.stdout)
    assert counts["prompts"]["done"] == 3
    assert counts["prompts"]["inbox"] == 0
    assert counts["studies"] == {"sampled": 3, "explained": 3, "failed": 0, "waiting": 0}
    output = log_path.read_text()
    assert "sampler.1" in output
    assert "ner.1" in output
    assert '"event": "daemon_stopped"' in output
