"""Real block devices for tests: loop devices, partitions, filesystems, mounts, swap, dm.

Everything a ``DeviceLab`` sets up is undone at teardown, in reverse order,
even when the test failed half-way: swapoff, umount, dmsetup remove, partx -d,
losetup -d (only the exact device it attached, and only while that device
still points at the lab's own image), and removal of the image files. A
cleanup step that fails does not stop the others; the failures are reported
together at the end.

Note for this VM: the kernel has no partition-table parsers, so ``losetup -P``
makes no partitions; ``partition()`` runs ``partx -a`` (BLKPG) instead.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MiB = 1024 * 1024
COMMAND_TIMEOUT = 60


def sh(*argv: str, input: str | None = None) -> str:
    """Run a command (argument list, no shell); fail with its stderr."""
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}: "
                             f"{result.stderr.strip()}")
    return result.stdout


def dm_available() -> bool:
    """Whether this kernel has device-mapper (without creating /dev/mapper/control)."""
    try:
        with open("/proc/misc", encoding="ascii") as misc:
            return any(line.split()[1:] == ["device-mapper"] for line in misc)
    except OSError:
        return False


def root_devnum() -> tuple[int, int]:
    """major:minor of the filesystem mounted at / (independent of the code under test)."""
    devnum = None
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == "/":
                major, minor = fields[2].split(":")
                devnum = int(major), int(minor)
    assert devnum is not None, "no mount at /"
    return devnum


class DeviceLab:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._undo: list[tuple[str, Callable[[], None]]] = []

    # -- bookkeeping ---------------------------------------------------------

    def _on_cleanup(self, what: str, action: Callable[[], None]) -> None:
        self._undo.append((what, action))

    def cleanup(self) -> None:
        failures: list[str] = []
        while self._undo:
            what, action = self._undo.pop()
            try:
                action()
            except Exception as exc:
                failures.append(f"{what}: {exc}")
        if failures:
            raise AssertionError("device lab cleanup failed:\n" + "\n".join(failures))

    # -- images and loop devices ---------------------------------------------

    def image(self, name: str = "disk.img", size: int = 64 * MiB,
              directory: Path | None = None) -> Path:
        """A sparse image file."""
        path = (directory or self.workdir) / name
        with open(path, "xb") as file:
            file.truncate(size)
        self._on_cleanup(f"rm {path}", lambda: path.unlink(missing_ok=True))
        return path

    def attach(self, backing: Path | str, read_only: bool = False) -> str:
        """A new loop device on ``backing``; returns its node (/dev/loopN)."""
        mode = ["--read-only"] if read_only else []
        device = sh("losetup", "--find", "--show", *mode, "--", str(backing)).strip()
        assert device.startswith("/dev/loop"), device
        # The kernel gives every attach a new disk sequence number: it tells,
        # at teardown, whether the device is still the one attached here.
        diskseq = self._diskseq(device)
        self._on_cleanup(f"losetup -d {device}", lambda: self._detach(device, diskseq))
        return device

    @staticmethod
    def _diskseq(device: str) -> str | None:
        name = os.path.basename(device)
        if not os.path.exists(f"/sys/block/{name}/loop/backing_file"):
            return None  # not attached
        with open(f"/sys/block/{name}/diskseq", encoding="ascii") as file:
            return file.read().strip()

    def _detach(self, device: str, diskseq: str | None) -> None:
        current = self._diskseq(device)
        if current is None or current != diskseq:
            return  # already detached (and maybe reused by someone else)
        sh("losetup", "--detach", device)

    def loop(self, size: int = 64 * MiB, name: str | None = None) -> str:
        """A loop device on a fresh sparse image."""
        return self.attach(self.image(name or f"disk-{uuid.uuid4().hex[:8]}.img", size))

    # -- partitions, filesystems, mounts, swap -------------------------------

    def partition(self, device: str, script: str) -> list[str]:
        """Write a partition table (sfdisk script) and make the kernel create the nodes."""
        sh("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", device, input=script)
        sh("partx", "--add", device)
        self._on_cleanup(f"partx -d {device}", lambda: self._remove_partitions(device))
        name = os.path.basename(device)
        partitions = sorted(entry for entry in os.listdir(f"/sys/block/{name}")
                            if entry.startswith(name + "p"))
        assert partitions, f"partx created no partitions on {device}"
        return ["/dev/" + entry for entry in partitions]

    @staticmethod
    def _remove_partitions(device: str) -> None:
        name = os.path.basename(device)
        if any(entry.startswith(name + "p") for entry in os.listdir(f"/sys/block/{name}")):
            sh("partx", "--delete", device)

    def mkfs_ext4(self, device: str, label: str | None = None,
                  fs_uuid: str | None = None) -> None:
        argv = ["mkfs.ext4", "-q", "-F"]
        if label is not None:
            argv += ["-L", label]
        if fs_uuid is not None:
            argv += ["-U", fs_uuid]
        sh(*argv, device)

    def mount(self, device: str, name: str = "mnt") -> Path:
        target = self.workdir / name
        target.mkdir(exist_ok=True)
        sh("mount", "--", device, str(target))
        self._on_cleanup(f"umount {target}", lambda: self._umount(target))
        return target

    @staticmethod
    def _umount(target: Path) -> None:
        for _ in range(20):
            if not os.path.ismount(target):
                return  # e.g. the test unmounted it (lazily) itself
            result = subprocess.run(["umount", "--", str(target)], capture_output=True,
                                    text=True, timeout=COMMAND_TIMEOUT, check=False)
            if result.returncode == 0:
                return
            time.sleep(0.1)
        sh("umount", "--lazy", "--", str(target))

    def umount(self, target: Path, lazy: bool = False) -> None:
        """Unmount now (the registered cleanup then has nothing left to do)."""
        sh("umount", *(["--lazy"] if lazy else []), "--", str(target))

    def swapon(self, device: str) -> None:
        sh("mkswap", device)
        sh("swapon", device)
        self._on_cleanup(f"swapoff {device}", lambda: self._swapoff(device))

    @staticmethod
    def _swapoff(device: str) -> None:
        with open("/proc/swaps", encoding="utf-8") as swaps:
            active = [line.split()[0] for line in swaps.readlines()[1:]]
        if device in active:
            sh("swapoff", device)

    def dm_linear(self, device: str, sectors: int) -> str:
        """A device-mapper linear map over ``device``; returns its kernel name (dm-N)."""
        name = f"vdsm-agent-test-{uuid.uuid4().hex[:8]}"
        # No udevd here: libdevmapper must create the node itself and not wait for udev.
        env = {**os.environ, "DM_DISABLE_UDEV": "1"}
        subprocess.run(["dmsetup", "create", "--noudevsync", name, "--table",
                        f"0 {sectors} linear {device} 0"], env=env, check=True,
                       capture_output=True, text=True, timeout=COMMAND_TIMEOUT)

        def remove() -> None:
            subprocess.run(["dmsetup", "remove", "--noudevsync", "--retry", name], env=env,
                           check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)

        self._on_cleanup(f"dmsetup remove {name}", remove)
        # A dm device's kernel name is always dm-<minor>.
        minor = sh("dmsetup", "info", "-c", "--noheadings", "-o", "minor", name).strip()
        return f"dm-{int(minor)}"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DeviceLab]:
    """A device lab in tmp_path, torn down whatever the test did."""
    devices = DeviceLab(tmp_path)
    try:
        yield devices
    finally:
        devices.cleanup()


@contextlib.contextmanager
def exclusive_open(device: str) -> Iterator[int]:
    """Hold a device open with O_EXCL, as mkfs or a mount in another namespace would."""
    fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    try:
        yield fd
    finally:
        os.close(fd)
