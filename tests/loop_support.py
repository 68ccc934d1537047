"""Loop devices in tests, found and cleaned up by their backing file's identity.

``LoopJanitor`` remembers the files a test creates (an ``O_PATH`` descriptor
of each: the inode stays alive, so its st_dev/st_ino cannot be reused by
another test's file) and, at teardown, detaches every loop device the kernel
reports bound to one of them (``LOOP_GET_STATUS64``), whoever bound it and
whatever the file is called by then. Names are no use here: the tests rename
and unlink the images under the devices.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdsm_agent.system import loopdev


def backing_of(path: Path | str) -> loopdev.Backing:
    return loopdev.Backing.of(os.stat(path, follow_symlinks=False))


def devices_bound_to(*backings: loopdev.Backing) -> dict[int, loopdev.Backing]:
    """Every loop device bound to one of ``backings`` (by the kernel), and to which."""
    wanted = set(backings)
    found = {}
    for number in loopdev.bound_numbers():
        status = loopdev.status_of(loopdev.device_path(number))
        if status is not None and status.backing in wanted:
            found[number] = status.backing
    return found


class LoopJanitor:
    def __init__(self) -> None:
        self._held: dict[loopdev.Backing, int] = {}

    def track(self, path: Path | str) -> loopdev.Backing:
        """Remember the file at ``path`` now (not a symlink); its identity."""
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        backing = loopdev.Backing.of(os.fstat(fd))
        if backing in self._held:
            os.close(fd)
        else:
            self._held[backing] = fd
        return backing

    def track_fd(self, fd: int) -> loopdev.Backing:
        return self.track(f"/proc/self/fd/{fd}")

    @property
    def tracked(self) -> set[loopdev.Backing]:
        return set(self._held)

    def bound(self) -> dict[int, loopdev.Backing]:
        return devices_bound_to(*self._held)

    def cleanup(self) -> list[str]:
        """Detach every device bound to a tracked file; what could not be detached."""
        failures = []
        for number, backing in self.bound().items():
            try:
                if loopdev.detach(number, backing, wait=5):
                    continue
            except OSError as exc:
                failures.append(f"loop{number}: {exc}")
                continue
            result = subprocess.run(["losetup", "-d", f"/dev/loop{number}"], check=False,
                                    capture_output=True, text=True, timeout=30)
            failures.append(f"loop{number} held open; losetup -d: {result.returncode} "
                            f"{result.stderr.strip()}")
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
        return failures


@pytest.fixture
def loop_janitor() -> Iterator[LoopJanitor]:
    """Detaches, at teardown, every loop device bound to a file the test tracked.

    Request it before the fixtures that start agents, so that it is torn down
    after them (a running agent would bind its connections again).
    """
    janitor = LoopJanitor()
    try:
        yield janitor
    finally:
        failures = janitor.cleanup()
        assert not failures, failures
