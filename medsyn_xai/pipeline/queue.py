"""The inbox queue: claims by rename, leases by mtime, and moves to done/ and failed/.

Layout under the data root::

    inbox/                        prompt files dropped by users
    inbox/.claimed/<worker>/      prompts a worker is processing; each file's mtime is its lease
    inbox/done/                   prompts that produced a study
    inbox/failed/                 rejected prompts, each with <name>.error.json

Every move is a rename (or a hard link followed by an unlink) inside one file
system, so a prompt exists under exactly one name at any time and several workers,
on one host or many, may share one inbox:

- Claim: the prompt is touched (so its lease starts fresh) and renamed into the
  worker's own folder. Of several workers renaming the same file, exactly one
  succeeds; the others get FileNotFoundError and move on.
- Lease: the worker refreshes the claimed file's mtime while it works
  (:class:`Heartbeat`). Any worker's reconcile scan returns a claim whose mtime is
  older than ``lease_seconds`` to the inbox. Hosts sharing an inbox need clocks
  in step (NTP), because the lease compares a file's mtime with local time.
- Done and failed: a name already taken there gets a numbered suffix
  (``case-1-2.txt``); nothing is ever overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from medsyn_xai.pipeline.prompts import PROMPT_SUFFIXES, is_ignored_name

__all__ = [
    "CLAIMED_DIR",
    "Claim",
    "DONE_DIR",
    "ERROR_SUFFIX",
    "FAILED_DIR",
    "Heartbeat",
    "InboxQueue",
    "default_worker_name",
    "sanitize_worker_name",
]

log = structlog.get_logger(__name__)

CLAIMED_DIR = ".claimed"
DONE_DIR = "done"
FAILED_DIR = "failed"
ERROR_SUFFIX = ".error.json"

_WORKER_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_WORKER_LENGTH = 120
_MAX_SUFFIX_TRIES = 10_000
# Errors of os.link on file systems or entries without hard links; the move then falls back to a checked rename.
_NO_HARD_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EACCES, errno.ENOSYS}


def sanitize_worker_name(name: str) -> str:
    """Return ``name`` with every run of characters outside ``A-Z a-z 0-9 . _ -`` replaced by "-".

    Leading dots and dashes are removed and the result is cut to 120 characters.

    Raises:
        ValueError: nothing usable is left.
    """
    cleaned = _WORKER_CHARACTERS.sub("-", name).lstrip(".-")[:_MAX_WORKER_LENGTH]
    if not cleaned:
        raise ValueError(f"invalid worker name {name!r}: use letters, digits, '.', '_' or '-' (pipeline.worker)")
    return cleaned


def default_worker_name() -> str:
    """Return ``<host>-<pid>`` for this process, sanitised for use as a folder name."""
    return sanitize_worker_name(f"{socket.gethostname()}-{os.getpid()}")


@dataclass
class Claim:
    """One prompt held by this worker.

    Attributes:
        path: the prompt's current path, ``inbox/.claimed/<worker>/<name>``.
        name: the file name it had in the inbox (the claimed file keeps it).
        claimed_at: time of the claim, seconds since the epoch.
        lost: set when the claimed file vanished, meaning another worker took it
            back after the lease expired; the job must then stop without writing.
    """

    path: Path
    name: str
    claimed_at: float
    lost: threading.Event = field(default_factory=threading.Event)


class InboxQueue:
    """Claims, leases and moves of prompt files for one worker.

    Args:
        root: data root holding ``inbox/``.
        worker: this worker's name, unique per process; see :func:`default_worker_name`.
        lease_seconds: age in seconds of a claim's mtime after which any worker
            may return it to the inbox.
    """

    def __init__(self, root: Path | str, *, worker: str, lease_seconds: float) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds is {lease_seconds!r}: use a positive number of seconds")
        self.root = Path(root)
        self.worker = sanitize_worker_name(worker)
        self.lease_seconds = float(lease_seconds)
        self.inbox = self.root / "inbox"
        self.claimed_root = self.inbox / CLAIMED_DIR
        self.own_dir = self.claimed_root / self.worker
        self.done_dir = self.inbox / DONE_DIR
        self.failed_dir = self.inbox / FAILED_DIR

    def prepare(self) -> None:
        """Create ``inbox/``, ``done/``, ``failed/`` and this worker's claim folder."""
        for folder in (self.inbox, self.done_dir, self.failed_dir, self.own_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def is_candidate(self, path: Path) -> bool:
        """Return True when ``path`` is an entry of the inbox that a worker should claim.

        Candidates are the inbox's direct entries except ignored names (hidden,
        .tmp, .part, .partial), the ``done`` and ``failed`` folders, and folders
        whose name does not end in .txt or .json. A folder whose name does end so
        is claimed, so that it can be rejected with a reason.
        """
        if path.parent != self.inbox or is_ignored_name(path.name):
            return False
        if path.name in (DONE_DIR, FAILED_DIR):
            return False
        if path.is_dir() and not path.is_symlink():
            return path.name.lower().endswith(PROMPT_SUFFIXES)
        return True

    def scan(self) -> list[Path]:
        """List the inbox's candidates, oldest mtime first."""
        entries = []
        try:
            with os.scandir(self.inbox) as listing:
                for entry in listing:
                    path = Path(entry.path)
                    if self.is_candidate(path):
                        entries.append((_mtime(path), path.name, path))
        except FileNotFoundError:
            return []
        return [path for _, _, path in sorted(entries)]

    def claim(self, path: Path) -> Claim | None:
        """Claim the inbox entry ``path`` for this worker.

        Returns:
            The claim, or None when another worker claimed the file first, it
            disappeared, or this worker has already claimed a file of that name.
        """
        name = path.name
        target = self.own_dir / name
        if os.path.lexists(target):
            return None

        # 1. Touch first: the claimed file keeps its mtime, and an old mtime would
        #    look like an expired lease to other workers' reconcile scans.
        try:
            os.utime(path, follow_symlinks=False)
        except FileNotFoundError:
            return None

        # 2. The rename is the claim; exactly one worker's rename succeeds.
        try:
            os.rename(path, target)
        except FileNotFoundError:
            if self.own_dir.is_dir():
                return None
            self.own_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, target)
            except FileNotFoundError:
                return None
        claim = Claim(path=target, name=name, claimed_at=time.time())
        self.refresh(claim)
        log.debug("prompt_claimed", worker=self.worker, path=str(target))
        return claim

    def refresh(self, claim: Claim) -> bool:
        """Renew the lease of ``claim``; return False (and set ``claim.lost``) when the file is gone."""
        try:
            os.utime(claim.path, follow_symlinks=False)
        except FileNotFoundError:
            claim.lost.set()
            return False
        return True

    def release(self, claim: Claim) -> Path | None:
        """Return a claimed prompt to the inbox under its own name.

        Returns:
            The prompt's path in the inbox, or None when the claim was lost or a
            new file of the same name arrived meanwhile. In the second case the
            prompt stays in this worker's folder, and a later reconcile scan returns it.
        """
        returned = _move_no_clobber(claim.path, self.inbox, claim.name, numbered=False)
        if returned is not None:
            log.info("claim_returned", worker=self.worker, path=str(returned))
        return returned

    def complete(self, claim: Claim) -> Path | None:
        """Move a claimed prompt to ``done/``; return its new path, or None when the claim was lost."""
        return _move_no_clobber(claim.path, self.done_dir, claim.name, numbered=True)

    def reject(self, claim: Claim, *, error: str, detail: str) -> Path | None:
        """Move a claimed prompt to ``failed/`` and write ``<name>.error.json`` next to it.

        Args:
            claim: the prompt.
            error: short reason code, for example "invalid_utf8".
            detail: one-line message naming the problem and the fix.

        Returns:
            The prompt's path in ``failed/``, or None when the claim was lost.
        """
        moved = _move_no_clobber(claim.path, self.failed_dir, claim.name, numbered=True)
        if moved is None:
            return None
        payload = {
            "error": error,
            "detail": detail,
            "worker": self.worker,
            "time": _utc_now(),
            "file": claim.name,
        }
        _write_json_atomic(moved.with_name(moved.name + ERROR_SUFFIX), payload)
        log.info("prompt_rejected", worker=self.worker, path=str(moved), error=error, detail=detail)
        return moved

    def return_expired(self, *, active: Path | None = None) -> list[Path]:
        """Return every claim whose lease expired to the inbox, from any worker's folder.

        Steps per expired file:

        1. Rename it into this worker's folder. Several workers may try; exactly
           one rename succeeds. The winner touches the file at once, so the other
           workers no longer see an expired lease.
        2. Link it into the inbox under its own name and unlink it here. When the
           name is taken by a newer file, it stays here and returns on a later scan.

        Folders of other workers that end up empty are removed, since a worker
        whose lease expired is gone.

        Args:
            active: the claim this worker is processing now, which is skipped.

        Returns:
            Paths of the returned prompts in the inbox.
        """
        returned: list[Path] = []
        now = time.time()
        try:
            folders = [Path(entry.path) for entry in os.scandir(self.claimed_root) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return returned
        for folder in folders:
            expired_here = 0
            try:
                entries = [Path(entry.path) for entry in os.scandir(folder)]
            except FileNotFoundError:
                continue
            for path in entries:
                if path == active or now - _mtime(path) <= self.lease_seconds:
                    continue
                expired_here += 1
                inbox_path = self._return_one(path)
                if inbox_path is not None:
                    returned.append(inbox_path)
            if folder != self.own_dir and 0 < expired_here == len(entries):
                # The folder is not empty when a claim stayed because its inbox name was taken.
                with contextlib.suppress(OSError):
                    folder.rmdir()
        return returned

    def _return_one(self, path: Path) -> Path | None:
        if path.parent == self.own_dir:
            staged = path
        else:
            staged = self.own_dir / path.name
            if os.path.lexists(staged):
                return None
            self.own_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, staged)
            except FileNotFoundError:
                return None
        try:
            os.utime(staged, follow_symlinks=False)
        except FileNotFoundError:
            return None
        returned = _move_no_clobber(staged, self.inbox, path.name, numbered=False)
        if returned is None:
            log.warning("claim_return_blocked", worker=self.worker, path=str(staged), reason="name taken in inbox")
        else:
            log.info("expired_claim_returned", worker=self.worker, path=str(returned), previous_worker=path.parent.name)
        return returned

    def remove_own_dir(self) -> None:
        """Remove this worker's claim folder when it is empty (at shutdown)."""
        # The folder is not empty when it still contains a claim, which a reconcile scan returns later.
        with contextlib.suppress(OSError):
            self.own_dir.rmdir()

    def counts(self) -> dict[str, int]:
        """Count prompts: inbox (waiting), claimed (held, with expired leases counted apart), done and failed."""
        now = time.time()
        claimed = expired = 0
        if self.claimed_root.is_dir():
            for folder in self.claimed_root.iterdir():
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    claimed += 1
                    expired += now - _mtime(path) > self.lease_seconds
        return {
            "inbox": len(self.scan()),
            "claimed": claimed,
            "claimed_expired": expired,
            "done": _count_entries(self.done_dir),
            "failed": _count_entries(self.failed_dir, skip_suffix=ERROR_SUFFIX),
        }


class Heartbeat:
    """Refresh a claim's lease from a background thread while a job runs.

    Use as a context manager around the job. The lease is renewed every
    ``interval`` seconds. When the claimed file has vanished, ``claim.lost`` is set,
    so the job can stop at its next sampling step.

    Args:
        queue: the worker's queue.
        claim: the claim to keep alive.
        interval: seconds between renewals, a quarter of the lease by default.
    """

    def __init__(self, queue: InboxQueue, claim: Claim, *, interval: float | None = None) -> None:
        self.queue = queue
        self.claim = claim
        self.interval = interval if interval is not None else queue.lease_seconds / 4
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.name}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.queue.refresh(self.claim):
                log.warning("claim_lost", worker=self.queue.worker, path=str(self.claim.path))
                return


def _move_no_clobber(source: Path, folder: Path, name: str, *, numbered: bool) -> Path | None:
    """Move ``source`` into ``folder`` without replacing any entry there.

    The move is a hard link followed by an unlink, so it fails instead of
    overwriting when the target name exists. Folders and file systems without
    hard links fall back to a rename after an existence check.

    Args:
        source: the entry to move, claimed by this worker alone.
        folder: destination folder on the same file system.
        name: preferred name in ``folder``.
        numbered: on a name clash try ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, ...;
            otherwise give up and return None.

    Returns:
        The new path, or None when ``source`` vanished or (without ``numbered``) the name was taken.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, _MAX_SUFFIX_TRIES + 1):
        target = folder / _numbered_name(name, attempt)
        if attempt > 1 and not numbered:
            return None
        if numbered and os.path.lexists(target.with_name(target.name + ERROR_SUFFIX)):
            continue
        try:
            moved = _link_or_rename(source, target)
        except FileNotFoundError:
            return None
        if moved:
            return target
    raise OSError(f"no free name for '{name}' in '{folder}' after {_MAX_SUFFIX_TRIES} tries: empty that folder")


def _link_or_rename(source: Path, target: Path) -> bool:
    """Move ``source`` to ``target`` when ``target`` does not exist; return False when it does."""
    if not source.is_dir() or source.is_symlink():
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in _NO_HARD_LINK:
                raise
        else:
            source.unlink()
            return True
    if os.path.lexists(target):
        return False
    os.rename(source, target)
    return True


def _numbered_name(name: str, attempt: int) -> str:
    if attempt == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        return f"{name}-{attempt}"
    return f"{stem}-{attempt}.{suffix}"


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return time.time()


def _count_entries(folder: Path, *, skip_suffix: str | None = None) -> int:
    if not folder.is_dir():
        return 0
    return sum(
        1
        for path in folder.iterdir()
        if not path.name.startswith(".") and not (skip_suffix and path.name.endswith(skip_suffix))
    )


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
