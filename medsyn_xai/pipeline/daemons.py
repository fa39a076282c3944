"""The two long-running daemons of the live pipeline, their signal handling and status counts.

- :class:`SamplerDaemon` watches ``inbox/``, claims one prompt at a time, generates
  its study with one :class:`StudyGenerator` per process, and moves the prompt to
  ``done/`` (or ``failed/`` with a reason).
- :class:`NerDaemon` watches ``studies/`` for ``.sampled`` markers and writes each
  study's entities and its ``.explained`` marker (or ``.failed`` with stage "explain").

Both stop on SIGTERM or SIGINT and exit with status 0 within a few seconds. The
sampler stops at its next sampling step and returns the claimed prompt to the
inbox. A dead watchdog observer makes either daemon exit with status 1. Entry points (``services/*.py``
and ``medsyn-xai serve``) call :func:`serve`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import structlog

from medsyn_xai.config import ConfigError, Settings, load_settings
from medsyn_xai.pipeline.prompts import PromptError, read_prompt_file
from medsyn_xai.pipeline.queue import Claim, Heartbeat, InboxQueue, default_worker_name, sanitize_worker_name
from medsyn_xai.pipeline.watch import DirectoryWatcher, ObserverDiedError
from medsyn_xai.store import (
    MARKER_KINDS,
    STUDY_ID_PATTERN,
    StudyExistsError,
    list_studies,
    marker_path,
    remove_abandoned_temporaries,
    studies_dir,
    study_path,
    write_failed_marker,
)

if TYPE_CHECKING:
    from medsyn_xai.pipeline.explain import StudyExplainer
    from medsyn_xai.pipeline.generate import GenerationRequest, StudyGenerator

__all__ = [
    "CONFIG_ENV",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_LEVEL_ENV",
    "ROOT_ENV",
    "DaemonKind",
    "NerDaemon",
    "SamplerDaemon",
    "format_status",
    "load_daemon_inputs",
    "pipeline_status",
    "run_daemon",
    "serve",
    "service_main",
]

log = structlog.get_logger(__name__)

ROOT_ENV = "MEDSYN_XAI_ROOT"
CONFIG_ENV = "MEDSYN_XAI_CONFIG"
LOG_LEVEL_ENV = "MEDSYN_XAI_LOG_LEVEL"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DaemonKind = Literal["sampler", "ner"]
DAEMON_KINDS: tuple[DaemonKind, ...] = ("sampler", "ner")

_WAIT_SECONDS = 0.2


class _Interrupted(BaseException):
    """Raised by the signal handler while a daemon loads its model, before it claims any work."""


class _StopSignals:
    """SIGTERM and SIGINT handlers that set a stop flag.

    While ``interruptible`` is True (model loading, when nothing is claimed) the
    handler also raises :class:`_Interrupted`, so a stop request does not wait for
    the load to finish. SIGIO, which a broken file lease would send, is ignored.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.interruptible = False
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        if hasattr(signal, "SIGIO"):
            self._previous[signal.SIGIO] = signal.signal(signal.SIGIO, signal.SIG_IGN)
        try:
            yield self
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)

    @contextlib.contextmanager
    def interruptible_section(self) -> Iterator[None]:
        self.interruptible = True
        try:
            if self.stop.is_set():
                raise _Interrupted
            yield
        finally:
            self.interruptible = False

    def _handle(self, number: int, frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(number).name)
        self.stop.set()
        if self.interruptible:
            self.interruptible = False
            raise _Interrupted


class SamplerDaemon:
    """Turn prompt files dropped into ``<root>/inbox`` into study stores, one at a time.

    Per prompt (:meth:`process`):

    1. Claim it by renaming it into ``inbox/.claimed/<worker>/``; a heartbeat
       thread refreshes the lease (the file's mtime) until the job ends.
    2. Parse it (:func:`read_prompt_file`); a bad file goes to ``failed/`` with
       ``<name>.error.json``.
    3. A study id that already has a store or a marker is a duplicate, and the
       prompt goes to ``failed/``. The exception is a study generated from this
       very file (same name, bytes and inode), which happens when the claim of a
       finished job came back after a crash. That prompt just moves to ``done/``.
    4. Generate and write the store and its ``.sampled`` marker. The group
       attribute ``source`` records the file, its sha256, the worker and the claim
       time. Errors write ``<id>.failed`` (stage "sample") and move the prompt to
       ``failed/``. A stop request ends sampling at the next step and returns the
       prompt to the inbox.
    5. Move the prompt to ``done/``.

    Args:
        settings: settings of this process; ``settings.pipeline`` drives the queue.
        root: data root holding ``inbox/`` and ``studies/``.
        generator: a ready generator; None builds one from ``settings`` in
            :meth:`run`. Default: None.
    """

    def __init__(self, settings: Settings, root: Path | str, *, generator: StudyGenerator | None = None) -> None:
        pipeline = settings.pipeline
        self.settings = settings
        self.root = Path(root)
        self.worker = sanitize_worker_name(pipeline.worker) if pipeline.worker else default_worker_name()
        self.queue = InboxQueue(self.root, worker=self.worker, lease_seconds=pipeline.lease_seconds)
        self.generator = generator
        self.signals = _StopSignals()
        self._active: Path | None = None
        self.outcomes: dict[str, int] = {}

    def run(self) -> int:
        """Load the model, watch the inbox and process prompts until stopped.

        Returns:
            0 after SIGTERM or SIGINT, 1 when the observer died.
        """
        structlog.contextvars.bind_contextvars(daemon="sampler", worker=self.worker)
        with self.signals.installed():
            try:
                with self.signals.interruptible_section():
                    self.queue.prepare()
                    if self.generator is None:
                        from medsyn_xai.pipeline.generate import StudyGenerator

                        self.generator = StudyGenerator(self.settings)
            except _Interrupted:
                log.info("daemon_stopped", outcomes=self.outcomes, during="model loading")
                return EXIT_OK
            return self._loop()

    def _loop(self) -> int:
        pipeline = self.settings.pipeline
        watcher = DirectoryWatcher(
            self.queue.inbox,
            accept=self.queue.is_candidate,
            scan=self.queue.scan,
            observer=pipeline.observer,
            settle_ms=pipeline.settle_ms,
            reconcile_seconds=pipeline.reconcile_seconds,
            poll_seconds=pipeline.poll_seconds,
            on_reconcile=self._reconcile,
        )
        try:
            with watcher:
                log.info("daemon_ready", root=str(self.root), observer=watcher.observer_kind, path=str(self.queue.inbox))
                while not self.signals.stop.is_set():
                    path = watcher.next_ready(_WAIT_SECONDS)
                    if path is not None and not self.signals.stop.is_set():
                        self.process(path)
        except ObserverDiedError as error:
            log.error("daemon_failed", error=str(error))
            return EXIT_FAILURE
        finally:
            self.queue.remove_own_dir()
        log.info("daemon_stopped", outcomes=self.outcomes)
        return EXIT_OK

    def _reconcile(self) -> None:
        """Return expired claims to the inbox and delete study folders that killed writers left."""
        self.queue.return_expired(active=self._active)
        remove_abandoned_temporaries(self.root, older_than_seconds=self.queue.lease_seconds)

    def process(self, path: Path) -> str:
        """Claim and process one inbox entry; return the outcome.

        Outcomes:

        - "sampled": the study was written.
        - "already_sampled": the study of this very file exists, so the prompt only moved to ``done/``.
        - "rejected": a bad prompt file, moved to ``failed/``.
        - "failed": generation failed, so ``<id>.failed`` was written.
        - "returned": stopped by a signal and put back into the inbox.
        - "lost": another worker took the claim back after the lease expired.
        - "skipped": another worker claimed the file first.
        """
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(path=str(path)):
            try:
                claim = self.queue.claim(path)
            except OSError as error:
                log.warning("claim_failed", error=str(error))
                return "skipped"
            if claim is None:
                return "skipped"
            self._active = claim.path
            try:
                with Heartbeat(self.queue, claim):
                    outcome = self._run_job(claim)
            finally:
                self._active = None
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            log.info("job_finished", outcome=outcome, elapsed_s=round(time.perf_counter() - started, 3))
            return outcome

    def _run_job(self, claim: Claim) -> str:
        try:
            request = read_prompt_file(claim.path, max_bytes=self.settings.pipeline.max_prompt_bytes)
        except PromptError as error:
            return self._reject(claim, error.code, str(error))
        study_id = request.study_id
        if study_id is None:
            raise RuntimeError("read_prompt_file returned a request without study_id")
        try:
            source = self._source(claim)
        except FileNotFoundError:
            log.warning("claim_lost_before_sampling")
            return "lost"
        structlog.contextvars.bind_contextvars(study_id=study_id)
        try:
            return self._generate(claim, request, study_id, source)
        finally:
            structlog.contextvars.unbind_contextvars("study_id")

    def _generate(self, claim: Claim, request: GenerationRequest, study_id: str, source: dict[str, Any]) -> str:
        from medsyn_xai.model.diffusion import SamplingInterrupted

        parts = _study_parts(self.root, study_id)
        same_job = bool(parts) and _recorded_source(self.root, study_id) == _identity(source)
        overwrite = False
        if parts:
            if same_job and "sampled" in parts:
                log.info("study_already_sampled")
                return self._complete(claim, "already_sampled")
            if not (same_job and parts == {"zarr"}):
                return self._reject(claim, "duplicate_study", _duplicate_message(claim.name, study_id, parts))
            overwrite = True  # this file's own store, left without its marker by a crash

        def should_stop() -> bool:
            return self.signals.stop.is_set() or claim.lost.is_set()

        if self.generator is None:
            raise RuntimeError("SamplerDaemon.process needs a generator: call run() or pass generator=")
        try:
            self.generator.generate(
                request, self.root, overwrite=overwrite, should_stop=should_stop, extra_attrs={"source": source}
            )
        except SamplingInterrupted:
            if claim.lost.is_set():
                log.warning("claim_lost_during_sampling")
                return "lost"
            self.queue.release(claim)
            return "returned"
        except StudyExistsError:
            parts = _study_parts(self.root, study_id)
            return self._reject(claim, "duplicate_study", _duplicate_message(claim.name, study_id, parts))
        except Exception as error:  # noqa: BLE001 - any generation error fails this study, not the daemon
            log.exception("generation_failed")
            detail = _first_line(error)
            write_failed_marker(self.root, study_id, stage="sample", error=type(error).__name__, detail=detail)
            message = f"generation of study '{study_id}' failed ({type(error).__name__}: {detail}): see the daemon log"
            return self._reject(claim, "generation_failed", message, outcome="failed")
        return self._complete(claim, "sampled")

    def _source(self, claim: Claim) -> dict[str, Any]:
        info = os.lstat(claim.path)
        return {
            "kind": "inbox",
            "file": claim.name,
            "sha256": _sha256(claim.path),
            "inode": info.st_ino,
            "worker": self.worker,
            "claimed_at": datetime.fromtimestamp(claim.claimed_at, timezone.utc).isoformat(timespec="milliseconds"),
        }

    def _complete(self, claim: Claim, outcome: str) -> str:
        if self.queue.complete(claim) is None:
            log.warning("claim_lost_before_done")
            return "lost"
        return outcome

    def _reject(self, claim: Claim, code: str, detail: str, *, outcome: str = "rejected") -> str:
        if self.queue.reject(claim, error=code, detail=detail) is None:
            log.warning("claim_lost_before_reject", error=code)
            return "lost"
        return outcome


class NerDaemon:
    """Add entities and entity heatmaps to every sampled study under ``<root>/studies``.

    A study is processed when its ``.sampled`` marker exists and neither
    ``.explained`` nor ``.failed`` does. A store that cannot be explained (corrupt,
    incomplete, missing) gets ``<id>.failed`` with stage "explain", and the daemon
    goes on with the next study.

    Args:
        settings: settings of this process; ``settings.ner`` picks the backend.
        root: data root holding ``studies/``.
        explainer: a ready explainer; None builds one from ``settings.ner`` in
            :meth:`run`. Default: None.
    """

    def __init__(self, settings: Settings, root: Path | str, *, explainer: StudyExplainer | None = None) -> None:
        self.settings = settings
        self.root = Path(root)
        self.folder = studies_dir(self.root)
        self.explainer = explainer
        self.signals = _StopSignals()
        self.outcomes: dict[str, int] = {}

    def run(self) -> int:
        """Load the NER backend, watch ``studies/`` and explain studies until stopped.

        Returns:
            0 after SIGTERM or SIGINT, 1 when the observer died.
        """
        structlog.contextvars.bind_contextvars(daemon="ner", worker=default_worker_name())
        with self.signals.installed():
            try:
                with self.signals.interruptible_section():
                    self.folder.mkdir(parents=True, exist_ok=True)
                    if self.explainer is None:
                        from medsyn_xai.pipeline.explain import StudyExplainer

                        self.explainer = StudyExplainer.from_settings(self.settings.ner)
            except _Interrupted:
                log.info("daemon_stopped", outcomes=self.outcomes, during="model loading")
                return EXIT_OK
            return self._loop()

    def _loop(self) -> int:
        pipeline = self.settings.pipeline
        watcher = DirectoryWatcher(
            self.folder,
            accept=_is_sampled_marker,
            scan=self.pending,
            observer=pipeline.observer,
            settle_ms=0,
            reconcile_seconds=pipeline.reconcile_seconds,
            poll_seconds=pipeline.poll_seconds,
        )
        try:
            with watcher:
                log.info("daemon_ready", root=str(self.root), observer=watcher.observer_kind, path=str(self.folder))
                while not self.signals.stop.is_set():
                    marker = watcher.next_ready(_WAIT_SECONDS)
                    if marker is not None:
                        self.process(marker.name.removesuffix(".sampled"))
        except ObserverDiedError as error:
            log.error("daemon_failed", error=str(error))
            return EXIT_FAILURE
        log.info("daemon_stopped", outcomes=self.outcomes)
        return EXIT_OK

    def pending(self) -> list[Path]:
        """Return the ``.sampled`` markers of studies that are neither explained nor failed."""
        return [
            marker_path(self.root, study_id, "sampled")
            for study_id, parts in list_studies(self.root).items()
            if "sampled" in parts and not parts & {"explained", "failed"}
        ]

    def process(self, study_id: str) -> str:
        """Explain one study; return "explained", "failed" or "skipped" (already done or not sampled)."""
        started = time.perf_counter()
        path = study_path(self.root, study_id)
        with structlog.contextvars.bound_contextvars(study_id=study_id, path=str(path)):
            parts = _study_parts(self.root, study_id)
            if "sampled" not in parts or parts & {"explained", "failed"}:
                return "skipped"
            if self.explainer is None:
                raise RuntimeError("NerDaemon.process needs an explainer: call run() or pass explainer=")
            try:
                self.explainer.explain(path)
                outcome = "explained"
            except Exception as error:  # noqa: BLE001 - a bad store fails that study, not the daemon
                log.exception("explain_failed")
                from medsyn_xai.pipeline.explain import write_explain_failure

                write_explain_failure(path, error)
                outcome = "failed"
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            log.info("job_finished", outcome=outcome, elapsed_s=round(time.perf_counter() - started, 3))
            return outcome


def load_daemon_inputs(
    *,
    root: Path | str | None = None,
    config: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, Path]:
    """Resolve the settings and data root of a daemon.

    The settings file is ``config``, else ``$MEDSYN_XAI_CONFIG``, else none (built-in
    defaults). The root is ``root``, else ``$MEDSYN_XAI_ROOT``, else ``pipeline.root``.

    Raises:
        ConfigError: the settings file is missing or invalid.
    """
    environ = os.environ if environ is None else environ
    config = config if config is not None else (environ.get(CONFIG_ENV) or None)
    settings = load_settings(config, environ=environ)
    chosen = root if root is not None else (environ.get(ROOT_ENV) or settings.pipeline.root)
    return settings, Path(chosen).expanduser()


def run_daemon(kind: DaemonKind, settings: Settings, root: Path | str) -> int:
    """Run the ``kind`` daemon ("sampler" or "ner") until stopped and return its exit status.

    Logging must be configured by the caller.
    """
    if kind == "sampler":
        return SamplerDaemon(settings, root).run()
    if kind == "ner":
        return NerDaemon(settings, root).run()
    raise ValueError(f"invalid daemon {kind!r}: use one of {', '.join(DAEMON_KINDS)}")


def serve(
    kind: DaemonKind,
    *,
    root: Path | str | None = None,
    config: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Resolve settings and root (see :func:`load_daemon_inputs`) and run the ``kind`` daemon.

    Logging must be configured by the caller. A bad settings file is logged and
    gives status 2.
    """
    try:
        settings, data_root = load_daemon_inputs(root=root, config=config, environ=environ)
    except ConfigError as error:
        log.error("daemon_config_invalid", error=str(error))
        return EXIT_USAGE
    return run_daemon(kind, settings, data_root)


def service_main(kind: DaemonKind) -> int:
    """Entry point of ``services/<kind>.py``: JSON logs, settings from the environment, run until stopped.

    Reads ``MEDSYN_XAI_CONFIG`` and ``MEDSYN_XAI_ROOT`` (see :func:`load_daemon_inputs`)
    and ``MEDSYN_XAI_LOG_LEVEL`` (default INFO).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from medsyn_xai.logs import configure_logging

    level = os.environ.get(LOG_LEVEL_ENV) or "INFO"
    try:
        configure_logging(level, renderer="json")
    except ValueError as error:
        configure_logging("INFO", renderer="json")
        log.error("daemon_config_invalid", error=f"{LOG_LEVEL_ENV}={level!r}: {error}")
        return EXIT_USAGE
    return serve(kind)


def pipeline_status(root: Path | str, *, lease_seconds: float = 30.0) -> dict[str, dict[str, int]]:
    """Count prompts and studies under ``root``.

    Returns:
        {"prompts": {inbox, claimed, claimed_expired, done, failed},
        "studies": {sampled, explained, failed, waiting}}, where "waiting" counts
        sampled studies that are neither explained nor failed yet.
    """
    queue = InboxQueue(root, worker="status", lease_seconds=lease_seconds)
    studies = list_studies(root)
    return {
        "prompts": queue.counts(),
        "studies": {
            "sampled": sum("sampled" in parts for parts in studies.values()),
            "explained": sum("explained" in parts for parts in studies.values()),
            "failed": sum("failed" in parts for parts in studies.values()),
            "waiting": sum(
                "sampled" in parts and not parts & {"explained", "failed"} for parts in studies.values()
            ),
        },
    }


def format_status(status: Mapping[str, Mapping[str, int]]) -> str:
    """Render :func:`pipeline_status` as a plain three-column table: kind, state, count."""
    rows = [("kind", "state", "count")]
    rows += [(group, name, str(count)) for group, counts in status.items() for name, count in counts.items()]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        f"{kind.ljust(widths[0])}  {state.ljust(widths[1])}  {count.rjust(widths[2])}" for kind, state, count in rows
    )


def _study_parts(root: Path, study_id: str) -> set[str]:
    """Return the parts of one study that exist: "zarr" and the marker kinds, as in :func:`list_studies`."""
    parts = {"zarr"} if study_path(root, study_id).is_dir() else set()
    return parts | {kind for kind in MARKER_KINDS if marker_path(root, study_id, kind).is_file()}


def _is_sampled_marker(path: Path) -> bool:
    stem, dot, suffix = path.name.rpartition(".")
    return bool(dot) and suffix == "sampled" and STUDY_ID_PATTERN.fullmatch(stem) is not None


def _identity(source: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    if not isinstance(source, Mapping):
        return None
    return (source.get("file"), source.get("sha256"), source.get("inode"))


def _recorded_source(root: Path, study_id: str) -> tuple[Any, ...] | None:
    """Return the identity of the prompt file a study was generated from, or None when unknown."""
    metadata = study_path(root, study_id) / "zarr.json"
    try:
        attributes = json.loads(metadata.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    return _identity(attributes.get("source"))


def _duplicate_message(name: str, study_id: str, parts: set[str]) -> str:
    found = ", ".join(sorted(parts)) or "a store written meanwhile"
    return (
        f"prompt file '{name}': study id '{study_id}' is a duplicate, the study already exists ({found}): "
        "choose another study id (file name or \"study_id\"), or remove studies/"
        f"{study_id}.* to generate it again"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

