"""Room on the state directory's filesystem: knowing it is full, and a reserve.

Everything the agent must write to stay consistent lives in the state
directory: the store, each task's spec, status, output and outcome. When that
filesystem fills up, the agent

* says so: every write that fails for lack of space (``ENOSPC``, ``EDQUOT``,
  sqlite's "database or disk is full") is the named error ``StorageFull``;
* starts no new work: ``startTask`` answers ``StorageFull`` and queued tasks
  wait, until the filesystem has room again (checked every second);
* keeps the room to record what ends meanwhile: a *reserve* file of allocated
  blocks, kept in the state directory while there is room and deleted the
  moment the filesystem is found full, so that the final states of the tasks
  that end (failing for lack of space, most of them) can still be committed.
  It is made again once the filesystem has room.

``StateSpace`` is shared by the threads that write (the DB thread, worker
threads of the task manager): its methods block (``statvfs``, ``unlink``,
``posix_fallocate``) and take a lock. This module imports nothing heavy: the
task process uses ``is_no_space`` too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
RESERVE_NAME = "space.reserve"
MiB = 1024 * 1024
# The agent's reserve: enough for hundreds of final states (a few pages of
# sqlite's write-ahead log each) and the store's -shm/-wal files at a start.
DEFAULT_RESERVE = 1 * MiB
# Below this much room (for the agent's user) the state directory counts as
# full: new work would fail at its first write.
LOW_WATER = 1 * MiB
# Room needed, beyond the reserve, to count as not full again (above LOW_WATER,
# so that making the reserve again does not make it full at once).
RESUME_ROOM = 2 * MiB


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is an OS error for lack of space or quota."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


class StateSpace:
    """The state directory's room: ``full``, ``note_full``, ``check``."""

    def __init__(self, directory: Path, reserve_bytes: int = 0) -> None:
        self.directory = directory
        self.reserve_bytes = reserve_bytes
        self.reserve_path = directory / RESERVE_NAME
        self._full = False
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        """Whether the agent treats the state directory as full (new work is refused)."""
        return self._full

    def available(self) -> int:
        """Bytes the agent may still write there. As root it may use the blocks
        ext4 keeps for root, so those count; the task processes run as root too.
        No free inode left (where the filesystem counts them) is no room at all:
        every new file would fail."""
        stats = os.statvfs(self.directory)
        root = os.geteuid() == 0
        if stats.f_files and not (stats.f_ffree if root else stats.f_favail):
            return 0
        blocks = stats.f_bfree if root else stats.f_bavail
        return int(blocks * stats.f_frsize)

    def note_full(self, why: str) -> None:
        """Blocking: a write failed for lack of space (``why``). Treat the directory
        as full and give the reserve back, so that ends can still be recorded."""
        with self._lock:
            if self._full:
                return
            self._full = True
            freed = self._release_reserve()
        log.error("state directory %s is full (%s): no new task starts until it has "
                  "room again%s", self.directory, why,
                  f"; released the {freed}-byte reserve to record the ends of tasks"
                  if freed else "")

    def check(self) -> bool:
        """Blocking: look at the room now; whether the directory is (still) full.

        Not full: full once under LOW_WATER (the reserve is given back then);
        else the reserve is made if it is missing and fits above LOW_WATER.
        Full: not full any more once the reserve fits with RESUME_ROOM to
        spare, and is made again."""
        try:
            room = self.available()
        except OSError as exc:
            log.warning("cannot see the room left in %s: %s", self.directory, exc)
            return self._full
        if not self._full and room < LOW_WATER:
            self.note_full(f"{room} bytes left")
            return True
        with self._lock:
            missing = self._missing_reserve()
            if not self._full:
                if missing and room >= missing + LOW_WATER:
                    self._make_reserve()
            elif room >= missing + RESUME_ROOM and self._make_reserve():
                self._full = False
                log.warning("state directory %s has room again (%d bytes): tasks start "
                            "again", self.directory, room)
            return self._full

    def _missing_reserve(self) -> int:
        """How much of the reserve is to be made (0 when it is in place)."""
        try:
            size = self.reserve_path.stat().st_size
        except OSError:
            size = 0
        return max(self.reserve_bytes - size, 0)

    def _make_reserve(self) -> bool:
        """Make the reserve file (allocated blocks, not a sparse file) if it is
        missing; whether it is in place. Lock held."""
        if self._missing_reserve() == 0:
            return True
        partial = self.reserve_path.with_name(RESERVE_NAME + ".tmp")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
            os.replace(partial, self.reserve_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            if not is_no_space(exc):
                log.warning("cannot make the space reserve %s: %s", self.reserve_path, exc)
            return False
        return True

    def _release_reserve(self) -> int:
        """Delete the reserve; the bytes it held. Lock held."""
        try:
            size = self.reserve_path.stat().st_size
            self.reserve_path.unlink()
        except OSError:
            return 0
        return size
