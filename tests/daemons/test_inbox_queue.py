"""The inbox queue and the watcher, in-process: claims, leases, moves, settling, handler errors."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from medsyn_xai.pipeline.queue import InboxQueue, default_worker_name, sanitize_worker_name
from medsyn_xai.pipeline.watch import DirectoryWatcher, ObserverDiedError, Settler, is_open_for_writing


def make_queue(root: Path, worker: str, lease_seconds: float = 30.0) -> InboxQueue:
    queue = InboxQueue(root, worker=worker, lease_seconds=lease_seconds)
    queue.prepare()
    return queue


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)


def test_worker_names_are_sanitised():
    assert sanitize_worker_name("gpu node/7:123") == "gpu-node-7-123"
    assert sanitize_worker_name("..hidden") == "hidden"
    assert default_worker_name().endswith(f"-{os.getpid()}")
    with pytest.raises(ValueError, match="invalid worker name"):
        sanitize_worker_name("///")


def test_scan_lists_candidates_and_skips_ignored(tmp_path):
    queue = make_queue(tmp_path, "w1")
    for name in ("a.txt", "b.json", "notes.md", ".hidden.txt", "c.txt.tmp", "d.json.part", "e.txt.partial"):
        (queue.inbox / name).write_text("x")
    (queue.inbox / "folder.txt").mkdir()
    (queue.inbox / "plain-folder").mkdir()
    names = sorted(path.name for path in queue.scan())
    assert names == ["a.txt", "b.json", "folder.txt", "notes.md"]


def test_claim_moves_file_and_starts_fresh_lease(tmp_path):
    queue = make_queue(tmp_path, "w1", lease_seconds=5)
    prompt = queue.inbox / "case.txt"
    prompt.write_text("nodule")
    age(prompt, 3600)
    claim = queue.claim(prompt)
    assert claim is not None
    assert claim.path == queue.own_dir / "case.txt"
    assert not prompt.exists()
    assert time.time() - claim.path.stat().st_mtime < 2
    assert queue.claim(prompt) is None


def test_concurrent_claims_have_one_winner(tmp_path):
    queues = [make_queue(tmp_path, f"w{index}") for index in range(8)]
    names = [f"p{index:03d}.txt" for index in range(60)]
    for name in names:
        (tmp_path / "inbox" / name).write_text(name)
    won: dict[str, list[str]] = {name: [] for name in names}
    barrier = threading.Barrier(len(queues))

    def worker(queue: InboxQueue) -> None:
        barrier.wait()
        for name in names:
            claim = queue.claim(queue.inbox / name)
            if claim is not None:
                won[name].append(queue.worker)

    threads = [threading.Thread(target=worker, args=(queue,)) for queue in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(winners) == 1 for winners in won.values()), won
    claimed = sorted(path.name for path in (tmp_path / "inbox" / ".claimed").glob("*/*"))
    assert claimed == names


def test_expired_claim_returns_to_inbox_once(tmp_path):
    dead = make_queue(tmp_path, "dead-worker", lease_seconds=2)
    (dead.inbox / "case.txt").write_text("nodule")
    claim = dead.claim(dead.inbox / "case.txt")
    assert claim is not None
    living = [make_queue(tmp_path, f"alive{index}", lease_seconds=2) for index in range(4)]

    assert all(queue.return_expired() == [] for queue in living)  # lease still fresh
    age(claim.path, 10)
    returned = [path for queue in living for path in queue.return_expired()]
    assert returned == [dead.inbox / "case.txt"]
    assert (dead.inbox / "case.txt").read_text() == "nodule"
    assert not dead.own_dir.exists()  # the dead worker's empty folder is removed
    assert list((tmp_path / "inbox" / ".claimed").glob("*/*")) == []


def test_expired_claim_does_not_overwrite_newer_inbox_file(tmp_path):
    dead = make_queue(tmp_path, "dead", lease_seconds=1)
    (dead.inbox / "case.txt").write_text("old")
    claim = dead.claim(dead.inbox / "case.txt")
    (dead.inbox / "case.txt").write_text("new")
    age(claim.path, 10)
    alive = make_queue(tmp_path, "alive", lease_seconds=1)
    assert alive.return_expired() == []
    assert (dead.inbox / "case.txt").read_text() == "new"
    assert (alive.own_dir / "case.txt").read_text() == "old"  # returns on a later scan


def test_heartbeat_keeps_lease_and_detects_loss(tmp_path):
    from medsyn_xai.pipeline.queue import Heartbeat

    queue = make_queue(tmp_path, "w1", lease_seconds=0.4)
    (queue.inbox / "case.txt").write_text("x")
    claim = queue.claim(queue.inbox / "case.txt")
    other = make_queue(tmp_path, "w2", lease_seconds=0.4)
    with Heartbeat(queue, claim):
        time.sleep(1.0)
        assert other.return_expired() == []
        claim.path.unlink()
        time.sleep(0.3)
        assert claim.lost.is_set()


def test_done_and_failed_never_overwrite(tmp_path):
    queue = make_queue(tmp_path, "w1")
    moved = []
    for content in ("first", "second", "third"):
        (queue.inbox / "case.txt").write_text(content)
        claim = queue.claim(queue.inbox / "case.txt")
        moved.append(queue.complete(claim).name)
    assert moved == ["case.txt", "case-2.txt", "case-3.txt"]
    assert (queue.done_dir / "case-3.txt").read_text() == "third"

    rejected = []
    for _ in range(2):
        (queue.inbox / "bad.json").write_text("{")
        claim = queue.claim(queue.inbox / "bad.json")
        rejected.append(queue.reject(claim, error="invalid_json", detail="it is broken").name)
    assert rejected == ["bad.json", "bad-2.json"]
    record = json.loads((queue.failed_dir / "bad-2.json.error.json").read_text())
    assert record["error"] == "invalid_json"
    assert record["detail"] == "it is broken"
    assert record["worker"] == "w1"
    assert record["time"].endswith("Z")
    assert queue.counts() == {"inbox": 0, "claimed": 0, "claimed_expired": 0, "done": 3, "failed": 2}


def test_symlink_and_folder_move_as_entries(tmp_path):
    queue = make_queue(tmp_path, "w1")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (queue.inbox / "link.txt").symlink_to(outside)
    (queue.inbox / "folder.txt").mkdir()
    for name in ("link.txt", "folder.txt"):
        claim = queue.claim(queue.inbox / name)
        queue.reject(claim, error="x", detail="y")
    assert (queue.failed_dir / "link.txt").is_symlink()
    assert (queue.failed_dir / "folder.txt").is_dir()
    assert outside.read_text() == "secret"


def test_release_returns_claim_under_its_name(tmp_path):
    queue = make_queue(tmp_path, "w1")
    (queue.inbox / "case.txt").write_text("x")
    claim = queue.claim(queue.inbox / "case.txt")
    assert queue.release(claim) == queue.inbox / "case.txt"
    assert list(queue.own_dir.iterdir()) == []


def test_open_for_writing_is_detected(tmp_path):
    path = tmp_path / "slow.txt"
    with open(path, "w") as handle:
        handle.write("half")
        handle.flush()
        assert is_open_for_writing(path) is True
    assert is_open_for_writing(path) is False


def test_settler_waits_for_quiet_file(tmp_path):
    path = tmp_path / "slow.txt"
    settler = Settler(settle_ms=150)
    with open(path, "w") as handle:
        handle.write("first half ")
        handle.flush()
        settler.offer(path)
        deadline = time.monotonic() + 0.6  # well past settle_ms while the writer pauses
        while time.monotonic() < deadline:
            assert settler.pop_ready() is None
            time.sleep(0.02)
        handle.write("second half")
    assert settler.pop_ready() is None  # the last write restarts the quiet time
    time.sleep(0.2)
    assert settler.pop_ready() == path
    assert len(settler) == 0


def test_settler_drops_vanished_paths(tmp_path):
    settler = Settler(settle_ms=0)
    settler.offer(tmp_path / "gone.txt")
    assert settler.pop_ready() is None
    assert len(settler) == 0


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_handler_error_is_logged_and_observer_survives(tmp_path, observer):
    def accept(path: Path) -> bool:
        if path.name == "boom.txt":
            raise RuntimeError("accept failed")
        return path.suffix == ".txt"

    watcher = DirectoryWatcher(
        tmp_path, accept=accept, scan=lambda: [], observer=observer, settle_ms=50, reconcile_seconds=60, poll_seconds=0.1
    )
    with capture_logs() as logs, watcher:
        watcher.next_ready(0.05)  # runs the start scan
        (tmp_path / "boom.txt").write_text("x")
        time.sleep(0.3)
        (tmp_path / "ok.txt").write_text("y")
        ready = watcher.next_ready(5.0)
        watcher.check_alive()
    assert ready == tmp_path / "ok.txt"
    failures = [entry for entry in logs if entry["event"] == "watch_handler_failed"]
    assert failures
    assert failures[0]["path"].endswith("boom.txt")


def test_reconcile_finds_files_without_events(tmp_path):
    folder = tmp_path / "watched"
    folder.mkdir()
    hidden_from_events = folder / "late.txt"
    found: list[Path] = []

    def scan() -> list[Path]:
        return [path for path in folder.glob("*.txt")]

    watcher = DirectoryWatcher(
        folder, accept=lambda path: False, scan=scan, observer="inotify", settle_ms=0, reconcile_seconds=0.3
    )
    with watcher:
        assert watcher.next_ready(0.1) is None
        hidden_from_events.write_text("x")
        deadline = time.monotonic() + 3
        while not found and time.monotonic() < deadline:
            ready = watcher.next_ready(0.2)
            if ready is not None:
                found.append(ready)
    assert found == [hidden_from_events]


def test_dead_observer_is_reported(tmp_path):
    watcher = DirectoryWatcher(tmp_path, accept=lambda path: True, scan=lambda: [], observer="polling", poll_seconds=0.1)
    watcher.start()
    try:
        watcher.check_alive()
        watcher._observer.stop()
        watcher._observer.join(2)
        with pytest.raises(ObserverDiedError, match="lost its observer"):
            watcher.next_ready(0.1)
    finally:
        watcher.stop()
