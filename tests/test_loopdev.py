"""The loop ioctl layer (vdsm_agent/system/loopdev.py) against real loop devices.

A device is bound to an open descriptor and to nothing else: renaming a
symlink over the image's name before the bind changes nothing. Both ways of
binding (``LOOP_CONFIGURE``, and ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` for
kernels before 5.8), a free device taken by somebody else between
``LOOP_CTL_GET_FREE`` and the bind (``EBUSY``: another one is taken), a
read-only descriptor, and a detach that leaves alone a device bound to
another file, and one held open (not detached, and not left to detach itself
later either). Every device is detached at teardown by its backing file's
identity (``tests/loop_support.py``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.loop_support import LoopJanitor, backing_of, devices_bound_to, loop_janitor
from vdsm_agent.system import loopdev

__all__ = ["loop_janitor"]  # fixture, used by name

pytestmark = [pytest.mark.root]

MiB = 1024 * 1024


def image(path: Path, janitor: LoopJanitor, size: int = MiB, fill: bytes = b"") -> Path:
    with open(path, "xb") as stream:
        stream.truncate(size)
        stream.write(fill)
    janitor.track(path)
    return path


def bind(path: Path, *, read_only: bool = False) -> int:
    fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        return loopdev.attach(fd, read_only=read_only, file_name=str(path))
    finally:
        os.close(fd)


def sysfs(number: int, name: str) -> str:
    return Path(f"/sys/block/loop{number}/loop/{name}").read_text().strip()


@pytest.mark.parametrize("configure", [True, False], ids=["LOOP_CONFIGURE", "LOOP_SET_FD"])
def test_the_device_serves_the_descriptor_not_the_name(tmp_path, loop_janitor, monkeypatch,
                                                       configure):
    monkeypatch.setattr(loopdev, "use_loop_configure", configure)
    disk = image(tmp_path / "disk.img", loop_janitor, fill=b"inside")
    victim = image(tmp_path / "victim.img", loop_janitor, fill=b"victim")
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        inside = backing_of(disk)
        (tmp_path / "link").symlink_to(victim)
        os.rename(tmp_path / "link", disk)  # the name now leads outside
        number = loopdev.attach(fd, file_name=str(disk))
    finally:
        os.close(fd)
    status = loopdev.status_of(f"/dev/loop{number}")
    assert status is not None
    assert status.backing == inside
    assert status.backing.identity == f"file:{inside.dev}:{inside.ino}"
    assert not status.read_only
    assert str(disk).startswith(status.file_name)  # lo_file_name: informative, 63 bytes
    assert sysfs(number, "backing_file") == f"{disk} (deleted)"  # the kernel's name for it
    with open(f"/dev/loop{number}", "rb") as device:
        assert device.read(6) == b"inside"
    assert devices_bound_to(backing_of(victim)) == {}
    assert loopdev.bound_to(inside) == [number]
    assert loopdev.detach(number, inside, wait=2)
    assert devices_bound_to(inside) == {}


def test_a_free_device_taken_before_the_bind_is_skipped(tmp_path, loop_janitor, monkeypatch):
    ours = image(tmp_path / "ours.img", loop_janitor)
    theirs = image(tmp_path / "theirs.img", loop_janitor)
    real_path = loopdev.device_path
    taken: list[int] = []

    def device_path(number: int, dev_root: Path = loopdev.DEV) -> Path:
        if not taken:
            # Somebody else binds the free device between LOOP_CTL_GET_FREE and our bind.
            subprocess.run(["losetup", f"/dev/loop{number}", str(theirs)], check=True,
                           capture_output=True, timeout=30)
            taken.append(number)
        return real_path(number, dev_root)

    monkeypatch.setattr(loopdev, "device_path", device_path)
    number = bind(ours)
    assert taken
    assert number != taken[0]
    assert devices_bound_to(backing_of(theirs)) == {taken[0]: backing_of(theirs)}
    assert devices_bound_to(backing_of(ours)) == {number: backing_of(ours)}


def test_a_read_only_descriptor_gives_a_read_only_device(tmp_path, loop_janitor):
    disk = image(tmp_path / "disk.img", loop_janitor)
    number = bind(disk, read_only=True)
    status = loopdev.status_of(f"/dev/loop{number}")
    assert status is not None
    assert status.read_only
    assert sysfs(number, "../ro") == "1"


def test_detach_leaves_a_device_bound_to_another_file_alone(tmp_path, loop_janitor):
    disk = image(tmp_path / "disk.img", loop_janitor)
    other = image(tmp_path / "other.img", loop_janitor)
    number = bind(other)
    # As when our device was detached behind our back and its number reused.
    assert loopdev.detach(number, backing_of(disk), wait=1)
    assert devices_bound_to(backing_of(other)) == {number: backing_of(other)}
    assert loopdev.detach(number + 100000, backing_of(disk), wait=1)  # no such device


def test_a_device_held_open_is_not_detached_now_or_later(tmp_path, loop_janitor):
    disk = image(tmp_path / "disk.img", loop_janitor)
    number = bind(disk)
    backing = backing_of(disk)
    holder = os.open(f"/dev/loop{number}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert not loopdev.detach(number, backing, wait=0.2)
        assert sysfs(number, "autoclear") == "0"  # the deferred detach was cancelled
    finally:
        os.close(holder)
    # The last close does not tear it down: it is still bound, as detach said.
    assert devices_bound_to(backing) == {number: backing}
    assert loopdev.detach(number, backing, wait=2)
    assert devices_bound_to(backing) == {}


def test_names_and_identities():
    assert loopdev.number_of("/dev/loop12") == 12
    assert loopdev.number_of("loop0") == 0
    for bad in ("/dev/loop", "/dev/loop01", "/dev/loop-control", "/dev/sda1", "loop1p1"):
        assert loopdev.number_of(bad) is None, bad
    assert loopdev.Backing.parse("file:2049:12") == loopdev.Backing(2049, 12)
    for bad in ("dev:8:0", "file:1", "file:a:b", "file:1:2:3", ""):
        assert loopdev.Backing.parse(bad) is None, bad
