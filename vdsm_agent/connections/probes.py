"""Health probes: what a probe reports, the threads probes run on, and the I/O.

Probes touch storage, and storage can hang (a frozen NFS server, a stopped
FUSE daemon): a ``statvfs`` may block in the kernel for as long as the
server's timeout, and a thread blocked in a system call cannot be cancelled.
So probes run on their own small pool of daemon threads (``ProbePool``), never
on the event loop, the default executor or the DB thread. The monitor waits
for a probe with a timeout and abandons a hung one; the hung thread keeps its
slot until the system call returns, and the monitor starts no second probe
for that connection meanwhile, so a hung target costs at most one thread.
Daemon threads (not ``ThreadPoolExecutor``, whose exit hook joins every
worker) so that a probe stuck in the kernel cannot hold up the agent's exit.

What a mount probe does (``probe_directory``): ``statvfs`` of the directory,
which goes to the server for network filesystems, then a 4 KiB ``O_DIRECT``
read of the first regular file found at the top of the directory, so the page
cache cannot answer for a dead server. When the directory holds no regular
file, ``statvfs`` alone is the probe (VDSM reads the domain metadata file; we
know no file in a generic export). Filesystems that refuse ``O_DIRECT``
(EINVAL) get a plain read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from vdsm_agent.metrics.counters import ConnectionStats

T = TypeVar("T")

PROBE_READ_SIZE = 4096
# How many directory entries to look at for a file to read: enough to find one
# in a normal export, few enough that a huge directory costs nothing.
SCAN_LIMIT = 64


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe.

    ``broken`` means the attachment itself is gone or dead (not mounted any
    more, FUSE daemon died, loop device detached, session gone, stale NFS
    handle): the monitor repairs it (reconnects) rather than waiting for the
    storage to come back by itself.
    """

    ok: bool
    code: str = ""
    message: str = ""
    broken: bool = False
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def success(cls, **info: Any) -> ProbeResult:
        return cls(True, info=info)

    @classmethod
    def failure(cls, code: str, message: str, *, broken: bool = False) -> ProbeResult:
        return cls(False, code, message, broken)

    @classmethod
    def from_oserror(cls, exc: OSError, what: str, *, broken: bool = False) -> ProbeResult:
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        return cls(False, code, f"{what}: {exc.strerror or exc}", broken)


# -- the pool ------------------------------------------------------------------


class ProbePool:
    """A bounded pool of daemon threads for blocking probes.

    Threads are started on demand up to ``max_workers`` and reused when idle.
    ``busy`` counts threads inside a probe (hung ones included), which the
    monitor reports so an operator can see a pile of stuck workers.
    """

    def __init__(self, max_workers: int, name: str = "vdsm-probe") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._closed = False
        # Of the monitors that probe here (one manager's): probe durations and
        # reconnect attempts, for GET /metrics (docs/metrics.md).
        self.stats = ConnectionStats()

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the probe pool is closed")
            self._queue.put((future, fn))
            self._add_thread_if_needed()
        return future

    def _add_thread_if_needed(self) -> None:
        if self._idle.acquire(blocking=False):
            return  # an idle thread will take the item
        if len(self._threads) < self.max_workers:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{self._name}-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if future.set_running_or_notify_cancel():
                with self._lock:
                    self._busy += 1
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the waiter, never lost
                    future.set_exception(exc)
                finally:
                    with self._lock:
                        self._busy -= 1
            self._idle.release()

    def close(self) -> None:
        """Stop idle threads; hung ones end when their system call returns."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)


# -- probe I/O ---------------------------------------------------------------------

_buffers = threading.local()


def _aligned_buffer() -> mmap.mmap:
    # O_DIRECT needs an aligned buffer; an anonymous mapping is page aligned.
    buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = mmap.mmap(-1, PROBE_READ_SIZE)
        _buffers.buffer = buffer
    return buffer


def read_direct(path: str) -> str:
    """Read the first 4 KiB of ``path`` bypassing the page cache.

    Returns how it was read: "direct", or "buffered" where the filesystem
    refuses O_DIRECT. Raises OSError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_NONBLOCK)
        mode = "direct"
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        mode = "buffered"
    try:
        os.preadv(fd, [_aligned_buffer()], 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL or mode != "direct":
            raise
        # Some filesystems accept O_DIRECT at open and refuse the read.
        os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        os.pread(fd, PROBE_READ_SIZE, 0)
        mode = "buffered"
    finally:
        os.close(fd)
    return mode


def first_regular_file(directory: str) -> str | None:
    """A regular file at the top of ``directory`` (looking at a few entries)."""
    with os.scandir(directory) as entries:
        for count, entry in enumerate(entries):
            if count >= SCAN_LIMIT:
                break
            if entry.is_file(follow_symlinks=False):
                return entry.path
    return None


class FileChoice:
    """Which file each directory's probe reads, remembered between probes.

    Looking for a file means listing the directory; it is done again only when
    the remembered file disappears, or every ``rescan_every`` probes while the
    directory has no file.
    """

    def __init__(self, rescan_every: int = 6) -> None:
        self._rescan_every = rescan_every
        self._chosen: dict[str, str | None] = {}
        self._misses: dict[str, int] = {}

    def get(self, directory: str) -> str | None:
        if directory in self._chosen:
            chosen = self._chosen[directory]
            if chosen is not None:
                return chosen
            misses = self._misses.get(directory, 0) + 1
            self._misses[directory] = misses
            if misses % self._rescan_every:
                return None
        chosen = first_regular_file(directory)
        self._chosen[directory] = chosen
        return chosen

    def forget(self, directory: str) -> None:
        self._chosen.pop(directory, None)
        self._misses.pop(directory, None)


def probe_directory(directory: str, files: FileChoice) -> ProbeResult:
    """statvfs plus a direct read of a file in ``directory`` (see module doc)."""
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        return ProbeResult.from_oserror(exc, f"statvfs {directory}")
    info: dict[str, Any] = {
        "capacity": {"totalBytes": stats.f_frsize * stats.f_blocks,
                     "freeBytes": stats.f_frsize * stats.f_bavail},
    }
    try:
        path = files.get(directory)
        if path is None:
            info["probeRead"] = "statvfs"
            return ProbeResult.success(**info)
        try:
            info["probeRead"] = read_direct(path)
        except FileNotFoundError:
            files.forget(directory)  # the file went away: pick another next time
            info["probeRead"] = "statvfs"
    except OSError as exc:
        return ProbeResult.from_oserror(exc, f"read {directory}")
    return ProbeResult.success(**info)
