"""Benchmark the live pipeline with real daemon processes on a temporary data root.

Run from the repository root:

    python bench/bench_pipeline.py --out bench/results/pipeline.json

Three measurements:

1. claim latency: time from a prompt's rename into ``inbox/`` until it appears in
   ``inbox/.claimed/<worker>/``, for the inotify and the polling observer. One
   sampler runs the tiny model of tests/conftest.py with the default
   ``[pipeline]`` settings (settle_ms 300, poll_seconds 1.0). Each drop comes
   0.6-1.2 s after the previous prompt is done.
2. burst: ``--burst`` prompts written into the inbox at once for two sampler
   workers on the tiny model with one DDIM step. Reported: wall time until every
   prompt is in ``done/``, prompts per second, and counts of lost (not in
   ``done/``), failed and duplicated prompts. A duplicate is a study generated
   more than once according to the workers' logs.
3. end to end: both daemons with the default model settings (no config file); a
   prompt dropped into the inbox until its ``.explained`` marker exists, once per
   bundled example prompt, one after the other.

Daemons run with ``OMP_NUM_THREADS=--threads`` (default 1): on a two-core machine
shared by two or three daemon processes, more threads per process oversubscribe
the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "medsyn_xai" / "examples").glob("*.txt"))

TINY_CONFIG = """
[text]
max_tokens = 24

[model]
dim = 8
dim_mults = [1, 2]
heads = 2
dim_head = 8
text_tokens = 24
depth = 8
height = 16
width = 16

[sampler]
steps = 1
device = "cpu"

[output]
grid = [16, 16, 16]
"""


class Daemon:
    """One ``services/<kind>.py`` subprocess logging JSON lines to a file."""

    def __init__(self, kind: str, root: Path, config: Path | None, log_path: Path, threads: int) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MEDSYN_XAI_ROOT": str(root)}
        env.pop("MEDSYN_XAI_CONFIG", None)
        if config is not None:
            env["MEDSYN_XAI_CONFIG"] = str(config)
        self.kind = kind
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "services" / f"{kind}.py")], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.started = time.perf_counter()

    def events(self, name: str) -> list[dict]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                records.append(record)
        return records

    def wait_ready(self, timeout: float = 300) -> float:
        """Wait for the daemon_ready event; return seconds since start."""
        wait_until(lambda: self.events("daemon_ready"), timeout, f"{self.kind} ready", self)
        return time.perf_counter() - self.started

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def wait_until(predicate, timeout: float, description: str, *daemons: Daemon, interval: float = 0.01):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = predicate()
        if value:
            return value
        for daemon in daemons:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"{daemon.kind} exited with {daemon.process.returncode}: see {daemon.log_path}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {description}")


def summarise(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "n": len(ordered),
        "median_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


def claim_latency(base: Path, observer: str, repeats: int, threads: int) -> dict:
    root = base / f"latency-{observer}"
    (root / "inbox").mkdir(parents=True)
    staging = root / "staging"
    staging.mkdir()
    config = base / f"latency-{observer}.toml"
    config.write_text(TINY_CONFIG + f'\n[pipeline]\nobserver = "{observer}"\n')
    daemon = Daemon("sampler", root, config, base / f"latency-{observer}.log", threads)
    try:
        daemon.wait_ready()
        worker = daemon.events("daemon_ready")[0]["worker"]
        claimed_dir = root / "inbox" / ".claimed" / worker
        done = root / "inbox" / "done"
        latencies = []
        pauses = random.Random(0)
        for index in range(repeats):
            name = f"latency-{index:03d}.txt"
            (staging / name).write_text(f"Small nodule in the right upper lobe, case {index}.")
            start = time.perf_counter()
            os.rename(staging / name, root / "inbox" / name)
            wait_until(lambda: (claimed_dir / name).exists() or (done / name).exists(), 30, name, daemon, interval=0.0005)
            latencies.append(time.perf_counter() - start)
            wait_until(lambda: (done / name).exists(), 30, f"{name} done", daemon)
            # Random gaps spread the drops over the polling interval and keep them clear of
            # watchdog's 0.5 s hold of the previous claim's rename-away event.
            time.sleep(pauses.uniform(0.6, 1.2))
    finally:
        daemon.stop()
    return {"observer": observer, "settle_ms": 300, "poll_seconds": 1.0, **summarise(latencies)}


def burst(base: Path, count: int, threads: int) -> dict:
    root = base / "burst"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    config = base / "burst.toml"
    config.write_text(TINY_CONFIG)
    workers = [Daemon("sampler", root, config, base / f"burst-{index}.log", threads) for index in range(2)]
    try:
        for worker in workers:
            worker.wait_ready()
        start = time.perf_counter()
        for index in range(count):
            (inbox / f"burst-{index:04d}.txt").write_text(f"Ground-glass opacity in the left lower lobe, case {index}.")
        dropped = time.perf_counter() - start
        done = inbox / "done"
        failed = inbox / "failed"

        def finished() -> bool:
            failed_count = sum(1 for path in failed.iterdir() if not path.name.endswith(".error.json"))
            return len(os.listdir(done)) + failed_count >= count

        wait_until(finished, 3600, "the burst", *workers, interval=0.1)
        elapsed = time.perf_counter() - start
    finally:
        codes = [worker.stop() for worker in workers]
    written = Counter(event["study_id"] for worker in workers for event in worker.events("study_written"))
    per_worker = [len(worker.events("study_written")) for worker in workers]
    done_names = set(os.listdir(inbox / "done"))
    return {
        "prompts": count,
        "workers": 2,
        "steps": 1,
        "write_s": round(dropped, 2),
        "elapsed_s": round(elapsed, 1),
        "prompts_per_s": round(count / elapsed, 2),
        "done": len(done_names),
        "lost": sum(1 for index in range(count) if f"burst-{index:04d}.txt" not in done_names),
        "failed": sum(1 for path in (inbox / "failed").iterdir() if not path.name.endswith(".error.json")),
        "duplicated": sum(1 for times in written.values() if times > 1),
        "studies_per_worker": per_worker,
        "exit_codes": codes,
    }


def end_to_end(base: Path, threads: int) -> dict:
    root = base / "e2e"
    (root / "inbox").mkdir(parents=True)
    sampler = Daemon("sampler", root, None, base / "e2e-sampler.log", threads)
    ner = Daemon("ner", root, None, base / "e2e-ner.log", threads)
    try:
        ready = {"sampler_s": round(sampler.wait_ready(), 1), "ner_s": round(ner.wait_ready(), 1)}
        times = []
        for example in EXAMPLES:
            marker = root / "studies" / f"{example.stem}.explained"
            start = time.perf_counter()
            (root / "inbox" / example.name).write_bytes(example.read_bytes())
            wait_until(marker.exists, 900, marker.name, sampler, ner, interval=0.02)
            times.append(time.perf_counter() - start)
    finally:
        codes = [sampler.stop(), ner.stop()]
    steps = sampler.events("sampling started")[0]["steps"]
    return {
        "settings": "defaults (no config file)",
        "steps": steps,
        "startup_to_ready": ready,
        "prompt_to_explained_s": [round(value, 1) for value in times],
        "median_s": round(statistics.median(times), 1),
        "exit_codes": codes,
    }


def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    training = subprocess.run(["pgrep", "-f", "run_train"], capture_output=True, text=True).stdout.split()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "background_training_pids": training,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["latency", "burst", "e2e"], action="append", help="run only these parts")
    parser.add_argument("--latency-repeats", type=int, default=20, help="prompts per observer (default: 20)")
    parser.add_argument("--burst", type=int, default=1000, help="prompts in the burst (default: 1000)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each daemon (default: 1)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    parts = args.only or ["latency", "burst", "e2e"]

    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads_per_daemon": args.threads,
    }
    base = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        if "latency" in parts:
            results["claim_latency"] = [
                claim_latency(base, observer, args.latency_repeats, args.threads) for observer in ("inotify", "polling")
            ]
        if "burst" in parts:
            results["burst"] = burst(base, args.burst, args.threads)
        if "e2e" in parts:
            results["end_to_end"] = end_to_end(base, args.threads)
        results["machine"]["background_training_pids_after"] = machine()["background_training_pids"]

        text = json.dumps(results, indent=2)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        print(text, flush=True)
    finally:
        # A burst leaves tens of thousands of chunk files, so removing them takes a while.
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
