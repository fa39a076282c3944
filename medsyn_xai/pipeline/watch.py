"""Watch one folder with watchdog, settle new files, and rescan it on a timer.

A :class:`DirectoryWatcher` turns file-system events into a stream of paths ready
to read:

1. The watchdog handler only enqueues: the path of a created file, or the
   destination of a move, goes into a thread-safe, de-duplicated queue. An
   exception in the handler is logged with the path and never reaches the observer.
2. The daemon's thread drains that queue into the settler. The settler hands out
   a path once its size, mtime and inode have not changed for ``settle_ms``. On
   file systems with file leases (local Linux ones) it also waits until no
   process has the file open for writing.
3. A scan at start and a reconcile scan every ``reconcile_seconds`` feed the same
   queue, so files that arrived while the daemon was down, or whose events were
   lost (NFS, a full inotify queue), are still found.
4. Before each wait the observer and emitter threads are checked; a dead one
   raises :class:`ObserverDiedError`, and the daemon exits non-zero.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

__all__ = [
    "OBSERVER_KINDS",
    "DirectoryWatcher",
    "EnqueueHandler",
    "ObserverDiedError",
    "PathQueue",
    "Settler",
    "is_open_for_writing",
    "make_observer",
]

log = structlog.get_logger(__name__)

ObserverKind = Literal["auto", "inotify", "polling"]
OBSERVER_KINDS: tuple[ObserverKind, ...] = ("auto", "inotify", "polling")

_EVENT_TYPES = [DirCreatedEvent, DirMovedEvent, EventsLostEvent, FileClosedEvent, FileCreatedEvent, FileMovedEvent]
_TICK_SECONDS = 0.05


class ObserverDiedError(RuntimeError):
    """The watchdog observer or one of its emitter threads stopped unexpectedly."""


class PathQueue:
    """A thread-safe FIFO of paths: :meth:`put` skips a path that is already waiting."""

    def __init__(self) -> None:
        self._items: dict[Path, None] = {}
        self._rescan = False
        self._condition = threading.Condition()

    def put(self, path: Path) -> None:
        """Add ``path`` unless it is already waiting."""
        with self._condition:
            if path not in self._items:
                self._items[path] = None
                self._condition.notify_all()

    def request_rescan(self) -> None:
        """Ask the consumer for a full scan, for example after the kernel dropped events."""
        with self._condition:
            self._rescan = True
            self._condition.notify_all()

    def drain(self) -> tuple[list[Path], bool]:
        """Take every waiting path, oldest first, and whether a rescan was requested."""
        with self._condition:
            items, rescan = list(self._items), self._rescan
            self._items.clear()
            self._rescan = False
        return items, rescan

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds until something is added."""
        with self._condition:
            if not self._items and not self._rescan:
                self._condition.wait(timeout)


class EnqueueHandler(FileSystemEventHandler):
    """Watchdog handler that puts created and moved-in paths on a :class:`PathQueue`.

    Args:
        queue: where accepted paths go.
        accept: returns True for paths worth settling; called on the observer
            thread, so it must be quick and must not read the file.
    """

    def __init__(self, queue: PathQueue, accept: Callable[[Path], bool]) -> None:
        super().__init__()
        self.queue = queue
        self.accept = accept

    def dispatch(self, event: FileSystemEvent) -> None:
        """Enqueue the event's path; log and swallow any error so the observer keeps running."""
        try:
            if isinstance(event, EventsLostEvent):
                log.warning("watch_events_lost", path=str(event.src_path))
                self.queue.request_rescan()
                return
            raw = event.dest_path if isinstance(event, (FileMovedEvent, DirMovedEvent)) else event.src_path
            path = Path(os.fsdecode(raw))
            if self.accept(path):
                self.queue.put(path)
        except Exception:  # noqa: BLE001 - a handler error must never stop the observer thread
            log.exception("watch_handler_failed", path=os.fsdecode(event.src_path), event_type=event.event_type)


def make_observer(kind: ObserverKind, *, poll_seconds: float = 1.0) -> tuple[BaseObserver, str]:
    """Build an unstarted watchdog observer.

    Args:
        kind: "inotify" (Linux only), "polling" (lists the folder every
            ``poll_seconds`` and works on NFS) or "auto" (inotify when this
            platform has it, else the platform's native observer).
        poll_seconds: listing interval of the polling observer in seconds. Default: 1.0.

    Returns:
        The observer and the name of the kind actually built.

    Raises:
        ValueError: an unknown kind, or "inotify" where it is not available.
    """
    if kind == "polling":
        from watchdog.observers.polling import PollingObserver

        return PollingObserver(timeout=poll_seconds), "polling"
    if kind == "inotify":
        try:
            from watchdog.observers.inotify import InotifyObserver
        except ImportError:
            message = "observer 'inotify' is not available on this platform: set pipeline.observer to auto or polling"
            raise ValueError(message) from None
        return InotifyObserver(), "inotify"
    if kind == "auto":
        from watchdog.observers import Observer

        return Observer(), Observer.__name__.removesuffix("Observer").lower() or "native"
    raise ValueError(f"invalid observer {kind!r}: use one of {', '.join(OBSERVER_KINDS)}")


def is_open_for_writing(path: Path) -> bool | None:
    """Check whether any process has the regular file ``path`` open for writing.

    Uses a Linux read lease (``F_SETLEASE``), which the kernel refuses while a
    writer has the file open; the lease is dropped at once. The daemon ignores
    SIGIO, the signal a lease break would send.

    Returns:
        True or False, or None when the file system or platform cannot tell
        (NFS, macOS, a file owned by another user). Settling then relies on
        size and mtime alone.
    """
    set_lease = getattr(fcntl, "F_SETLEASE", None)
    if set_lease is None:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return None
    try:
        fcntl.fcntl(descriptor, set_lease, fcntl.F_RDLCK)
    except OSError as error:
        return True if error.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(descriptor, set_lease, fcntl.F_UNLCK)
        return False
    finally:
        os.close(descriptor)


class Settler:
    """Candidate paths waiting until they stop changing.

    A path is ready when its (size, mtime, inode) signature has been the same for
    ``settle_ms`` milliseconds and no process has it open for writing. Paths
    that disappear are dropped.

    Args:
        settle_ms: quiet time in milliseconds before a path is ready; 0 hands a
            path out at its first check.
    """

    def __init__(self, settle_ms: int) -> None:
        self.settle_seconds = settle_ms / 1000.0
        self._pending: dict[Path, tuple[tuple[int, int, int] | None, float]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def offer(self, path: Path) -> None:
        """Start watching ``path`` unless it is already pending."""
        if path not in self._pending:
            self._pending[path] = (None, time.monotonic())

    def pop_ready(self) -> Path | None:
        """Return the oldest pending path that has settled, removing it, or None."""
        now = time.monotonic()
        for path, (seen, since) in list(self._pending.items()):
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                del self._pending[path]
                continue
            signature = (info.st_size, info.st_mtime_ns, info.st_ino)
            if signature != seen:
                self._pending[path] = (signature, now)
                if self.settle_seconds > 0:
                    continue
            elif now - since < self.settle_seconds:
                continue
            if stat.S_ISREG(info.st_mode) and is_open_for_writing(path):
                self._pending[path] = (signature, now)
                continue
            del self._pending[path]
            return path
        return None


class DirectoryWatcher:
    """Watch one folder and hand out settled paths, one per call of :meth:`next_ready`.

    Args:
        folder: the folder to watch (not recursive); it must exist.
        accept: returns True for paths to settle (quick, on the observer thread).
        scan: lists the folder's current candidates; called at start and every
            ``reconcile_seconds``.
        observer: "auto", "inotify" or "polling". Default: "auto".
        settle_ms: quiet time in milliseconds before a path is handed out. Default: 300.
        reconcile_seconds: seconds between scans. Default: 3.0.
        poll_seconds: listing interval of the polling observer in seconds. Default: 1.0.
        on_reconcile: called before each scan, for example to return expired
            claims. Default: None.
    """

    def __init__(
        self,
        folder: Path,
        *,
        accept: Callable[[Path], bool],
        scan: Callable[[], Iterable[Path]],
        observer: ObserverKind = "auto",
        settle_ms: int = 300,
        reconcile_seconds: float = 3.0,
        poll_seconds: float = 1.0,
        on_reconcile: Callable[[], Any] | None = None,
    ) -> None:
        if observer not in OBSERVER_KINDS:
            raise ValueError(f"invalid observer {observer!r}: use one of {', '.join(OBSERVER_KINDS)}")
        self.folder = Path(folder)
        self.accept = accept
        self.scan = scan
        self.observer_setting = observer
        self.reconcile_seconds = reconcile_seconds
        self.poll_seconds = poll_seconds
        self.on_reconcile = on_reconcile
        self.queue = PathQueue()
        self.settler = Settler(settle_ms)
        self.observer_kind = ""
        self._observer: BaseObserver | None = None
        self._next_reconcile = 0.0

    def start(self) -> DirectoryWatcher:
        """Start the observer; the first :meth:`next_ready` call runs the start scan."""
        observer, kind = make_observer(self.observer_setting, poll_seconds=self.poll_seconds)
        handler = EnqueueHandler(self.queue, self.accept)
        try:
            observer.schedule(handler, str(self.folder), recursive=False, event_filter=_EVENT_TYPES)
            observer.start()
        except OSError as error:
            if self.observer_setting != "auto":
                raise
            log.warning("watch_observer_fallback", path=str(self.folder), observer=kind, error=str(error))
            observer, kind = make_observer("polling", poll_seconds=self.poll_seconds)
            observer.schedule(handler, str(self.folder), recursive=False, event_filter=_EVENT_TYPES)
            observer.start()
        self._observer, self.observer_kind = observer, kind
        self._next_reconcile = 0.0
        log.info("watch_started", path=str(self.folder), observer=kind)
        return self

    def stop(self) -> None:
        """Stop and join the observer (at most a few seconds)."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=3.0)
            self._observer = None

    def __enter__(self) -> DirectoryWatcher:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def check_alive(self) -> None:
        """Raise ObserverDiedError when the observer or an emitter thread is no longer running."""
        observer = self._observer
        if observer is None:
            raise ObserverDiedError(f"the watcher of '{self.folder}' is not started: call start() first")
        dead = [] if observer.is_alive() else ["observer"]
        dead += [type(emitter).__name__ for emitter in observer.emitters if not emitter.is_alive()]
        if dead:
            message = (
                f"watcher of '{self.folder}' lost its {', '.join(dead)} thread: "
                "restart the daemon, and check that the folder still exists"
            )
            raise ObserverDiedError(message)

    def reconcile(self) -> None:
        """Run ``on_reconcile`` and the scan now, and queue what the scan finds."""
        if self.on_reconcile is not None:
            self.on_reconcile()
        for path in self.scan():
            self.queue.put(path)
        self._next_reconcile = time.monotonic() + self.reconcile_seconds

    def next_ready(self, timeout: float) -> Path | None:
        """Wait up to ``timeout`` seconds for a settled path.

        Each round checks the observer, runs a due reconcile scan, moves queued
        paths into the settler and takes the first ready path from it.

        Raises:
            ObserverDiedError: the observer stopped.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            paths, rescan = self.queue.drain()
            if rescan or time.monotonic() >= self._next_reconcile:
                self.reconcile()
                more, _ = self.queue.drain()
                paths += more
            for path in paths:
                self.settler.offer(path)
            ready = self.settler.pop_ready()
            if ready is not None:
                return ready
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if len(self.settler):
                time.sleep(min(_TICK_SECONDS, remaining))
            else:
                self.queue.wait(min(remaining, max(0.0, self._next_reconcile - time.monotonic()) + 0.001))
