"""The safety matrix of the destructive kinds: nothing is ever lost by mistake.

Every refusal is checked twice: the error (name, code, reasons) and the data
itself (sha256 of the target before and after). The in-use checks run at
submit and again when the work starts in the task's process; the latter is
tested with a task that waits in the queue while its device gets mounted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import devices_fixtures
from tests.device_ops_support import Agent, MiB, agent, agents, digest, fill
from tests.devices_fixtures import DeviceLab, exclusive_open, root_devnum, sh
from vdsm_agent import errors
from vdsm_agent.tasks.kinds import paths, safety

lab = devices_fixtures.lab
__all__ = ["agent", "agents", "lab"]  # fixtures, used by name

pytestmark = [pytest.mark.root, pytest.mark.tool("losetup")]

IN_USE = 301


def codes(failure: Any) -> set[str]:
    return {reason["code"] for reason in failure.data["reasons"]}


def small_ext4(device: str, size: str = "16M") -> None:
    """An ext4 that leaves the end of the device alone and writes nothing lazily later."""
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", device, size)


def mount_ro(lab: DeviceLab, device: str, name: str = "mnt") -> Path:
    target = lab.mount(device, name)
    sh("mount", "-o", "remount,ro", "--", str(target))
    return target


async def all_refused(agent: Agent, device: str, *codes_wanted: str) -> None:
    """Every destructive kind refuses ``device`` with DeviceInUse and these reasons."""
    source = agent.images / "source.img"
    if not source.exists():
        fill(source, MiB)
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("wipe", {"device": device}),
        ("wipe", {"device": device, "method": "discard", "offset": 4096, "length": 4096}),
        ("format", {"device": device, "fstype": "ext4", "force": True}),
        ("fsck", {"device": device, "repair": True}),
        ("copy", {"source": str(source), "destination": device}),
    ]
    for kind, params in attempts:
        failure = await agent.refused(kind, **params)
        assert failure.name == "DeviceInUse", (kind, failure.data)
        assert failure.code == IN_USE
        assert failure.data["path"] == os.path.realpath(device)
        assert set(codes_wanted) <= codes(failure), (kind, failure.data["reasons"])
        assert all(reason["message"] for reason in failure.data["reasons"])


# -- in use -------------------------------------------------------------------------------------


@pytest.mark.tool("mkfs.ext4")
async def test_a_mounted_device_is_refused_whatever_the_kind_or_force(
        agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(32 * MiB)
    small_ext4(device)
    mount_ro(lab, device)
    before = digest(device)
    await all_refused(agent, device, "mounted")
    # A read-only check still runs, with a warning that a live filesystem is unreliable.
    check = await agent.run("fsck", device=device)
    assert check["state"] == "done", check
    assert any("in use" in warning for warning in check["warnings"])
    assert digest(device) == before


@pytest.mark.tool("mkfs.ext4")
@pytest.mark.tool("partx")
async def test_a_disk_with_a_mounted_partition_is_refused_but_its_free_partition_is_not(
        agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(32 * MiB)
    first, second = lab.partition(device, "label: dos\n,12M\n,\n")
    small_ext4(first, "8M")
    mount_ro(lab, first)
    before_disk, before_first = digest(device), digest(first)
    await all_refused(agent, device, "partition-mounted")
    await all_refused(agent, first, "mounted")
    assert (digest(device), digest(first)) == (before_disk, before_first)
    task = await agent.run("wipe", device=second)
    assert task["state"] == "done", task
    assert digest(first) == before_first


@pytest.mark.tool("mkswap")
async def test_swap_is_refused(agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(16 * MiB)
    lab.swapon(device)
    before = digest(device)
    await all_refused(agent, device, "swap")
    assert digest(device) == before


@pytest.mark.tool("mkfs.ext4")
async def test_a_device_holding_a_loop_devices_backing_file_is_refused(
        agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(32 * MiB)
    small_ext4(device, "32M")
    mountpoint = lab.mount(device)
    inner = lab.image("inner.img", 4 * MiB, directory=mountpoint)
    lab.attach(inner, read_only=True)
    # Read-only before it disappears: a filesystem left writable behind the loop
    # commits its journal (an atime from a probe of the new loop device, say)
    # whenever it likes, and the device's digest changes without anyone writing.
    sh("mount", "-o", "remount,ro", "--", str(mountpoint))
    lab.umount(mountpoint, lazy=True)  # gone from the mount table, alive behind the loop
    before = digest(device)
    await all_refused(agent, device, "backs-loop")
    assert digest(device) == before
    # The image file itself is in use too: a copy will not overwrite it.
    outer = lab.loop(8 * MiB)
    image = agent.images / "backing.img"
    fill(image, 4 * MiB)
    lab.attach(image)
    failure = await agent.refused("copy", source=outer, destination=str(image))
    assert failure.name == "DeviceInUse"
    assert codes(failure) == {"backs-loop"}


async def test_a_device_held_open_exclusively_is_busy(agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(8 * MiB)
    fill(device, 8 * MiB)
    before = digest(device)
    with exclusive_open(device):  # like a mount in another namespace, or a running mkfs
        await all_refused(agent, device, "busy")
    assert digest(device) == before


@pytest.mark.tool("mkfs.ext4")
async def test_the_root_filesystems_device_is_refused(agent: Agent) -> None:
    major, minor = root_devnum()
    root = "/dev/" + os.path.basename(os.path.realpath(f"/sys/dev/block/{major}:{minor}"))
    with pytest.raises(errors.DeviceInUse) as info, paths.resolve_device(root, "f") as target:
        safety.check_target(target, None)
    assert "root" in {reason["code"] for reason in info.value.data["reasons"]}
    # Through the API with force=false: two independent refusals stand in the way.
    failure = await agent.refused("format", device=root, fstype="ext4")
    assert failure.name == "DeviceInUse"
    assert "root" in codes(failure)


# -- in use at start (the task waited in the queue) ---------------------------------------------


@pytest.mark.tool("mkfs.ext4")
async def test_a_device_mounted_while_the_task_waits_is_refused_when_it_starts(
        agents: Any, lab: DeviceLab) -> None:
    agent = await agents(max_running_tasks=1)
    device = lab.loop(32 * MiB)
    fill(device, 32 * MiB)
    small_ext4(device)  # the first 16 MiB; the pattern stays in the rest
    blocker = await agent.start("test.sleep", seconds=60)
    await agent.reach(blocker, "running")
    queued = await agent.start("wipe", device=device)
    assert (await agent.task(queued))["state"] == "accepted"
    mount_ro(lab, device)
    before = digest(device)
    await agent.call("cancelTask", taskID=blocker)
    task = await agent.finish(queued)
    assert task["state"] == "failed", task
    assert task["error"]["name"] == "DeviceInUse"
    assert "mounted" in {reason["code"] for reason in task["error"]["reasons"]}
    assert task["progress"]["done"] == 0
    assert digest(device) == before


@pytest.mark.tool("mkfs.ext4")
async def test_expect_is_checked_at_submit_and_again_when_the_task_starts(
        agents: Any, lab: DeviceLab) -> None:
    agent = await agents(max_running_tasks=1)
    device = lab.loop(32 * MiB)
    fill(device, 32 * MiB)
    seen = await agent.device(device)
    before = digest(device)
    failure = await agent.refused("wipe", device=device, expect={"size": 64 * MiB})
    assert failure.name == "PreconditionFailed"
    assert failure.code == 303
    assert failure.data["identity"] == seen["identity"]
    assert failure.data["mismatches"] == [{"field": "size", "expected": 64 * MiB,
                                           "actual": 32 * MiB}]
    failure = await agent.refused("format", device=device, fstype="ext4", force=True,
                                  expect={"fstype": "xfs"})
    assert failure.name == "PreconditionFailed"
    assert digest(device) == before
    # Matching when submitted, changed (mkfs) while queued: refused at start.
    blocker = await agent.start("test.sleep", seconds=60)
    await agent.reach(blocker, "running")
    queued = await agent.start("wipe", device=device, expect={
        "size": seen["size"], "fstype": None, "identity": seen["identity"]})
    small_ext4(device)
    after_mkfs = digest(device)
    await agent.call("cancelTask", taskID=blocker)
    task = await agent.finish(queued)
    assert task["state"] == "failed", task
    assert task["error"]["name"] == "PreconditionFailed"
    assert task["error"]["mismatches"][0]["field"] == "fstype"
    assert digest(device) == after_mkfs
    # And a matching expect lets the work run.
    fresh = await agent.device(device)
    done = await agent.run("wipe", device=device, length=MiB, expect={
        "fstype": fresh["fstype"], "uuid": fresh["uuid"], "serial": fresh["serial"]})
    assert done["state"] == "done", done
    assert done["result"]["target"]["identity"] == fresh["identity"]


# -- paths ----------------------------------------------------------------------------------------


@pytest.mark.tool("qemu-img")
async def test_paths_escaping_the_allowed_root_are_refused(agent: Agent,
                                                           tmp_path: Path) -> None:
    outside = tmp_path / "outside.img"
    fill(outside, MiB)
    before = digest(outside)
    inside = agent.images / "inside.img"
    fill(inside, MiB)
    link = agent.images / "link.img"
    link.symlink_to(outside)
    dangling = agent.images / "dangling.img"
    dangling.symlink_to(tmp_path / "created-outside.img")
    dotdot = str(agent.images / ".." / ".." / "outside.img")
    for source in (dotdot, str(link)):
        failure = await agent.refused("copy", source=source,
                                      destination=str(agent.images / "out.img"))
        assert failure.name == "PathNotAllowed", source
        assert failure.data["field"] == "params.params.source"
    for destination in (dotdot, str(link), str(dangling),
                        str(agent.images / ".." / ".." / "new-outside.img")):
        failure = await agent.refused("copy", source=str(inside), destination=destination)
        assert failure.name == "PathNotAllowed", destination
        assert failure.code == 302
        assert failure.data["field"] == "params.params.destination"
    assert digest(outside) == before
    assert not (tmp_path / "created-outside.img").exists()
    assert not (tmp_path / "new-outside.img").exists()
    assert not (agent.images / "out.img").exists()


@pytest.mark.tool("qemu-img")
async def test_a_backing_file_outside_the_allowed_root_is_refused(agent: Agent,
                                                                  tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    fill(base, MiB)
    overlay = agent.images / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(overlay)], check=True, timeout=60)
    failure = await agent.refused("copy", source=str(overlay),
                                  destination=str(agent.images / "flat.img"))
    assert failure.name == "PathNotAllowed"
    assert str(base) in failure.data["detail"] or "backing" in failure.data["detail"]


async def test_a_device_param_must_be_a_block_device(agent: Agent) -> None:
    image = agent.images / "plain.img"
    fill(image, MiB)
    before = digest(image)
    for kind, extra in (("wipe", {}), ("format", {"fstype": "ext4", "force": True}),
                        ("fsck", {"repair": True})):
        for path in ("/dev/null", str(image), "/dev/../" + str(image).lstrip("/"),
                     "/dev/disk/../../etc/passwd"):
            failure = await agent.refused(kind, device=path, **extra)
            assert failure.name == "PathNotAllowed", (kind, path)
            assert failure.data["field"] == "params.params.device"
        failure = await agent.refused(kind, device="/dev/no-such-device", **extra)
        assert failure.name == "DeviceNotFound"
        assert failure.code == 300
    assert digest(image) == before
