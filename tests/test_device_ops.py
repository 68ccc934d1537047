"""Device operations end to end: wipe, format, fsck, copy, checksum on real loop devices.

Each test drives an in-process agent (real task processes) against loop
devices from ``tests/devices_fixtures.py`` and checks the data itself
afterwards: zeros where a wipe went and nothing changed elsewhere, the
filesystem blkid sees, sha256 of copies. The safety matrix (in use, paths,
signatures, preconditions) is in ``test_device_ops_safety.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import devices_fixtures
from tests.device_ops_support import (
    Agent,
    MiB,
    agent,
    agents,
    blkid,
    digest,
    fill,
    is_zero,
    qemu_img,
    size_of,
)
from tests.devices_fixtures import DeviceLab, sh
from vdsm_agent.tasks.kinds import KindEnv, priority
from vdsm_agent.tasks.kinds.format import Format
from vdsm_agent.tasks.kinds.fsck import Fsck

lab = devices_fixtures.lab
__all__ = ["agent", "agents", "lab"]  # fixtures, used by name

pytestmark = [pytest.mark.root, pytest.mark.tool("losetup")]


def loop_with_data(lab: DeviceLab, size: int = 32 * MiB, seed: int = 1) -> str:
    image = lab.image(f"data-{seed}-{size}.img", size)
    fill(image, size, seed)
    return lab.attach(image)


async def progress_samples(agent: Agent, task_id: str, until_done: int) -> list[int]:
    """progress.done as seen by getTask until it reaches ``until_done`` bytes."""
    seen: list[int] = []
    for _ in range(600):
        task = await agent.task(task_id)
        seen.append(task["progress"]["done"])
        if task["progress"]["done"] >= until_done or task["state"] not in (
                "accepted", "initializing", "running", "stale"):
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"progress stuck at {seen[-1]}")


# -- wipe -------------------------------------------------------------------------------------


async def test_wipe_zeroes_an_unaligned_range_and_nothing_else(agent: Agent,
                                                               lab: DeviceLab) -> None:
    device = loop_with_data(lab)
    offset, length = 1000, 10 * MiB + 77
    head, tail = digest(device, 0, offset), digest(device, offset + length)
    task = await agent.run("wipe", device=device, offset=offset, length=length)
    assert task["state"] == "done", task
    assert task["warnings"] == []
    seen = await agent.device(device)
    assert task["result"] == {"bytes": length, "method": "zero", "target": {
        "path": device, "identity": seen["identity"], "size": 32 * MiB}}
    assert task["progress"]["done"] == length
    assert task["progress"]["percent"] == 100.0
    assert is_zero(device, offset, length)
    assert digest(device, 0, offset) == head
    assert digest(device, offset + length) == tail
    assert not is_zero(device, offset + length, 1)
    output = await agent.output(task["id"])
    assert "running at nice 10, I/O class idle" in output
    assert f"wiped {length} bytes" in output


async def test_wipe_progress_goes_up_and_a_cancel_stops_it(agents: Any,
                                                           lab: DeviceLab) -> None:
    agent = await agents(task_io_rate_limit=8 * MiB)
    size = 64 * MiB
    device = loop_with_data(lab, size)
    task_id = await agent.start("wipe", device=device)
    seen = await progress_samples(agent, task_id, 16 * MiB)
    assert seen == sorted(seen), seen
    assert seen[-1] >= 16 * MiB, seen
    pid = (await agent.task(task_id))["pid"]
    # The work runs niced and in the idle I/O class (settings task_nice, task_ionice_class).
    assert psutil.Process(pid).nice() == 10
    assert priority.current_ioprio(pid) >> 13 == 3
    await agent.call("cancelTask", taskID=task_id)
    task = await agent.finish(task_id)
    assert task["state"] == "canceled", task
    done = task["progress"]["done"]
    assert 16 * MiB <= done < size
    assert is_zero(device, 0, done)
    assert not is_zero(device, size - MiB, MiB)  # the rest is untouched
    assert "the data in that part is gone" in await agent.output(task_id)


async def test_wipe_discard_zeroes_unaligned_edges_with_a_warning(agent: Agent,
                                                                  lab: DeviceLab) -> None:
    device = loop_with_data(lab)
    offset, length = 3 * 4096 + 100, 5 * MiB
    head, tail = digest(device, 0, offset), digest(device, offset + length)
    task = await agent.run("wipe", device=device, method="discard", offset=offset,
                           length=length)
    assert task["state"] == "done", task
    assert task["result"]["bytes"] == length
    assert 0 < task["result"]["discarded"] < length
    assert len(task["warnings"]) == 1
    assert "discard granularity" in task["warnings"][0]
    assert is_zero(device, offset, length)
    assert (digest(device, 0, offset), digest(device, offset + length)) == (head, tail)


@pytest.fixture
def ramfs_lab(tmp_path: Path) -> Iterator[DeviceLab]:
    """A device lab whose images live on ramfs: their loop devices cannot discard
    (ramfs has no fallocate). Not done by writing 0 to queue/discard_max_bytes:
    on recent kernels that sticks to the loop device after it is detached."""
    directory = tmp_path / "ramfs"
    directory.mkdir()
    sh("mount", "-t", "ramfs", "-o", "mode=700", "none", str(directory))
    devices = DeviceLab(directory)
    try:
        yield devices
    finally:
        try:
            devices.cleanup()
        finally:
            sh("umount", "--", str(directory))


async def test_wipe_discard_on_a_device_that_cannot_discard_fails_clearly(
        agent: Agent, ramfs_lab: DeviceLab) -> None:
    device = loop_with_data(ramfs_lab, 8 * MiB)
    name = os.path.basename(device)
    assert Path(f"/sys/block/{name}/queue/discard_max_bytes").read_text().strip() == "0"
    before = digest(device)
    task = await agent.run("wipe", device=device, method="discard")
    assert task["state"] == "failed"
    assert task["error"]["name"] == "DiscardNotSupported"
    assert "method=zero" in task["error"]["detail"]
    assert digest(device) == before


async def test_reset_to_done_verifies_a_wipe_by_sampling(agents: Any, lab: DeviceLab) -> None:
    agent = await agents(max_running_tasks=1)
    blocker = await agent.start("test.sleep", seconds=60)
    blank = lab.loop(16 * MiB)  # a fresh sparse image reads as zeros
    dirty = loop_with_data(lab, 16 * MiB)
    queued_blank = await agent.start("wipe", device=blank)
    queued_dirty = await agent.start("wipe", device=dirty, offset=MiB, length=MiB)
    answer = await agent.call("resetTaskState", taskID=queued_blank, state="done",
                              reason="wiped by hand")
    assert answer["task"]["state"] == "done"
    assert answer["task"]["result"]["verified"] is True
    assert answer["task"]["result"]["bytes"] == 16 * MiB
    failure = await agent.fails("resetTaskState", taskID=queued_dirty, state="done",
                                reason="x")
    assert failure.name == "InvalidStateTransition"
    assert "non-zero data at offset 1048576" in failure.data["detail"]
    await agent.call("cancelTask", taskID=blocker)
    await agent.call("cancelTask", taskID=queued_dirty)


# -- format -----------------------------------------------------------------------------------


@pytest.mark.tool("mkfs.ext4")
async def test_format_ext4_with_a_label(agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(64 * MiB)
    task = await agent.run("format", device=device, fstype="ext4", label="data-1")
    assert task["state"] == "done", task
    result = task["result"]
    assert result["fstype"] == "ext4"
    assert result["label"] == "data-1"
    found = blkid(device)
    assert (found["TYPE"], found["UUID"], found["LABEL"]) == ("ext4", result["uuid"], "data-1")
    assert result["target"]["identity"] == (await agent.device(device))["identity"]
    assert task["progress"]["percent"] == 100.0
    output = await agent.output(task["id"])
    # mkfs got the descriptor the task resolved, never the name.
    assert re.search(rf"\$ mkfs\.ext4 -F -U {result['uuid']} -L data-1 -- /dev/fd/(\d+)\n"
                     rf".*  where /dev/fd/\1 is {device}\n", output), output
    assert "Writing superblocks" in output  # the tool's own output
    # The filesystem is sound.
    check = subprocess.run(["e2fsck", "-f", "-n", device], capture_output=True, check=False)
    assert check.returncode == 0
    # verify (resetTaskState) recognises this task's filesystem and nobody else's.
    env = KindEnv(task_dir=str(agent.state / "tasks" / task["id"]))
    verdict = await asyncio.to_thread(Format.verify, task["params"], env)
    assert verdict.complete
    assert verdict.result is not None
    assert verdict.result["uuid"] == result["uuid"]
    lab.mkfs_ext4(device, label="data-1")
    verdict = await asyncio.to_thread(Format.verify, task["params"], env)
    assert not verdict.complete


@pytest.mark.tool("mkfs.xfs")
@pytest.mark.tool("xfs_repair")
async def test_format_xfs_then_fsck_it(agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(320 * MiB)
    task = await agent.run("format", device=device, fstype="xfs", label="xfsdata")
    assert task["state"] == "done", task
    found = blkid(device)
    assert (found["TYPE"], found["UUID"], found["LABEL"]) == (
        "xfs", task["result"]["uuid"], "xfsdata")
    assert "$ mkfs.xfs -f -m uuid=" in await agent.output(task["id"])
    before = digest(device)
    check = await agent.run("fsck", device=device)
    assert check["state"] == "done", check
    assert check["result"]["clean"] is True
    assert check["result"]["fstype"] == "xfs"
    assert "Phase 7" in await agent.output(check["id"])
    assert digest(device) == before  # read-only


@pytest.mark.tool("mkfs.ext4")
async def test_format_refuses_a_signature_unless_forced(agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(32 * MiB)
    lab.mkfs_ext4(device, label="precious")
    before = digest(device)
    failure = await agent.refused("format", device=device, fstype="ext4")
    assert failure.code == -32602
    assert failure.data["field"] == "params.params.force"
    assert failure.data["rule"] == "signature"
    assert failure.data["fstype"] == "ext4"
    assert "label 'precious'" in failure.data["detail"]
    assert digest(device) == before
    task = await agent.run("format", device=device, fstype="ext4", force=True)
    assert task["state"] == "done", task
    assert blkid(device)["UUID"] == task["result"]["uuid"]
    assert "LABEL" not in blkid(device)
    assert task["result"]["label"] is None


# -- fsck -------------------------------------------------------------------------------------


@pytest.mark.tool("e2fsck")
@pytest.mark.tool("debugfs")
async def test_fsck_reports_then_repairs_ext4_errors(agent: Agent, lab: DeviceLab) -> None:
    device = lab.loop(32 * MiB)
    lab.mkfs_ext4(device)
    clean = await agent.run("fsck", device=device)
    assert clean["state"] == "done", clean
    assert clean["result"]["clean"] is True
    assert clean["result"]["fstype"] == "ext4"
    assert "files" in clean["result"]["summary"]
    assert clean["warnings"] == []
    assert clean["progress"]["percent"] == 100.0
    output = await agent.output(clean["id"])
    assert "Pass 5" in output
    assert "-C" in output
    sh("debugfs", "-w", "-R", "clri <11>", device)  # lose lost+found
    before = digest(device)
    broken = await agent.run("fsck", device=device)
    assert broken["state"] == "done", broken
    assert broken["result"]["clean"] is False
    assert broken["result"]["exitCode"] == 4
    assert digest(device) == before  # read-only
    repaired = await agent.run("fsck", device=device, repair=True)
    assert repaired["state"] == "done", repaired
    assert repaired["result"]["clean"] is True
    assert repaired["result"]["repaired"] is True
    assert any("corrected" in warning for warning in repaired["warnings"])
    again = await agent.run("fsck", device=device)
    assert again["result"]["clean"] is True
    # verify (resetTaskState) is a read-only check run by the agent itself.
    verdict = await asyncio.to_thread(Fsck.verify, repaired["params"], KindEnv())
    assert verdict.complete
    assert verdict.result is not None
    assert verdict.result["clean"] is True


async def test_fsck_of_a_device_without_a_filesystem_is_refused(agent: Agent,
                                                                lab: DeviceLab) -> None:
    failure = await agent.refused("fsck", device=lab.loop(8 * MiB))
    assert failure.code == -32602
    assert failure.data["field"] == "params.params.device"
    assert failure.data["rule"] == "fstype"


# -- copy -------------------------------------------------------------------------------------


@pytest.mark.tool("qemu-img")
async def test_copy_raw_to_qcow2_and_back_onto_a_device(agent: Agent, lab: DeviceLab) -> None:
    source = agent.images / "source.img"
    fill(source, 8 * MiB + 4096, seed=7)
    qcow2 = agent.images / "copy.qcow2"
    task = await agent.run("copy", source=str(source), destination=str(qcow2),
                           destinationFormat="qcow2")
    assert task["state"] == "done", task
    assert task["result"]["bytes"] == 8 * MiB + 4096
    assert task["result"]["created"] is True
    assert task["result"]["sourceFormat"] == "raw"
    assert task["progress"]["percent"] == 100.0
    info = qemu_img("info", "--output=json", str(qcow2))
    assert '"format": "qcow2"' in info.stdout
    assert str(8 * MiB + 4096) in info.stdout
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(source), str(qcow2)).returncode == 0
    output = await agent.output(task["id"])
    assert "$ qemu-img convert -p -f raw -O qcow2 -- " in output
    assert "(100.00/100%)" in output  # qemu-img's own progress
    # qcow2 (format probed) onto a raw loop device of the same size.
    device = lab.loop(8 * MiB + 4096)
    back = await agent.run("copy", source=str(qcow2), destination=device)
    assert back["state"] == "done", back
    assert back["result"]["sourceFormat"] == "qcow2"
    assert back["result"]["target"]["identity"] == (await agent.device(device))["identity"]
    assert digest(device) == digest(source)
    # ... and from the device back to a new raw file.
    final = agent.images / "final.img"
    again = await agent.run("copy", source=device, destination=str(final))
    assert again["state"] == "done", again
    assert digest(final) == digest(source)


@pytest.mark.tool("qemu-img")
async def test_copy_onto_a_larger_device_leaves_the_rest(agent: Agent, lab: DeviceLab) -> None:
    source = agent.images / "small.img"
    fill(source, 4 * MiB, seed=3)
    device = loop_with_data(lab, 16 * MiB, seed=4)
    rest = digest(device, 4 * MiB)
    task = await agent.run("copy", source=str(source), destination=device)
    assert task["state"] == "done", task
    assert digest(device, 0, 4 * MiB) == digest(source)
    assert digest(device, 4 * MiB) == rest
    assert "-n" in (await agent.output(task["id"])).split("$ qemu-img", 1)[1].split("\n")[0]


@pytest.mark.tool("qemu-img")
async def test_cancelled_copy_removes_the_file_it_created(agents: Any) -> None:
    agent = await agents(task_io_rate_limit=8 * MiB)
    source = agent.images / "big.img"
    fill(source, 64 * MiB, seed=5)  # real data: qemu-img skips holes at any rate
    destination = agent.images / "new.img"
    task_id = await agent.start("copy", source=str(source), destination=str(destination))
    seen = await progress_samples(agent, task_id, 8 * MiB)
    assert seen[-1] >= 8 * MiB
    assert seen == sorted(seen)
    assert destination.exists()
    await agent.call("cancelTask", taskID=task_id)
    task = await agent.finish(task_id)
    assert task["state"] == "canceled", task
    assert not destination.exists()
    output = await agent.output(task_id)
    assert f"removed {destination}" in output
    assert "-r 8388608" in output


@pytest.mark.tool("qemu-img")
async def test_failed_copy_keeps_a_destination_that_existed(agent: Agent) -> None:
    source = agent.images / "source.img"
    fill(source, 8 * MiB, seed=8)
    existing = agent.images / "existing.img"
    fill(existing, 4 * MiB, seed=9)
    before = digest(existing)
    task = await agent.run("copy", source=str(source), destination=str(existing), create=False)
    assert task["state"] == "failed"
    assert task["error"]["name"] == "ToolFailed"
    assert "smaller" in task["error"]["detail"]
    assert existing.exists()
    assert digest(existing) == before
    failure = await agent.refused("copy", source=str(source),
                                  destination=str(agent.images / "missing.img"), create=False)
    assert failure.data["field"] == "params.params.destination"
    assert failure.data["rule"] == "exists"


@pytest.mark.tool("qemu-img")
async def test_copy_verify_compares_source_and_destination(agents: Any,
                                                           lab: DeviceLab) -> None:
    agent = await agents(max_running_tasks=1)
    blocker = await agent.start("test.sleep", seconds=60)
    source = agent.images / "source.img"
    fill(source, 4 * MiB, seed=11)
    device = loop_with_data(lab, 8 * MiB, seed=11)  # its first 4 MiB equal the source
    other = loop_with_data(lab, 8 * MiB, seed=12)
    twin = agent.images / "twin.img"  # each task locks its source: a second one
    fill(twin, 4 * MiB, seed=11)
    same = await agent.start("copy", source=str(source), destination=device)
    different = await agent.start("copy", source=str(twin), destination=other)
    answer = await agent.call("resetTaskState", taskID=same, state="done", reason="copied")
    assert answer["task"]["result"]["verified"] is True
    assert answer["task"]["result"]["bytes"] == 4 * MiB
    failure = await agent.fails("resetTaskState", taskID=different, state="done", reason="x")
    assert failure.name == "InvalidStateTransition"
    assert "mismatch" in failure.data["detail"].lower()
    await agent.call("cancelTask", taskID=blocker)
    await agent.call("cancelTask", taskID=different)


# -- checksum of devices ----------------------------------------------------------------------


async def test_checksum_of_a_device_range_and_its_verify(agents: Any, lab: DeviceLab) -> None:
    agent = await agents(max_running_tasks=1)
    device = loop_with_data(lab, 16 * MiB, seed=21)
    # A range not on 1 MiB boundaries needs force (admin).
    task = await agent.run("checksum", path=device, offset=4096, length=5 * MiB, force=True)
    assert task["state"] == "done", task
    assert task["result"]["checksum"] == digest(device, 4096, 5 * MiB)
    assert task["resources"] == [f"device:{device}"]
    # resetTaskState(done) recomputes the digest.
    blocker = await agent.start("test.sleep", seconds=60)
    queued = await agent.start("checksum", path=device, algorithm="sha256")
    answer = await agent.call("resetTaskState", taskID=queued, state="done", reason="x")
    assert answer["task"]["result"] == {"checksum": digest(device), "algorithm": "sha256",
                                        "bytes": size_of(device)}
    await agent.call("cancelTask", taskID=blocker)
