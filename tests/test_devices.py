"""Device inventory on real loop devices, and getDeviceList through the API.

The tests marked ``root`` attach loop devices, make filesystems, mount them and
enable swap; ``tests/devices_fixtures.py`` undoes all of it, also on failure.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests import devices_fixtures
from tests.devices_fixtures import (
    DeviceLab,
    MiB,
    dm_available,
    exclusive_open,
    root_devnum,
)
from tests.support import RpcClient, RpcFailure
from vdsm_agent import errors
from vdsm_agent.devices.inventory import Inventory
from vdsm_agent.settings import Config
from vdsm_agent.system import commands

# The fixture (loop devices, mounts, swap, all undone at teardown), made
# visible to pytest in this module.
lab = devices_fixtures.lab

root = pytest.mark.root


@pytest.fixture
def inventory(config: Config) -> Inventory:
    return Inventory(config)


def name_of(device: str) -> str:
    return os.path.basename(device)


def codes(device: dict[str, Any]) -> list[str]:
    return [reason["code"] for reason in device["inUseReasons"]]


def reason(device: dict[str, Any], code: str) -> str:
    messages = [item["message"] for item in device["inUseReasons"] if item["code"] == code]
    assert messages, f"{device['name']}: no {code!r} reason in {device['inUseReasons']}"
    return "; ".join(messages)


# -- single loop devices ---------------------------------------------------------


@root
async def test_unused_loop_device(lab: DeviceLab, inventory: Inventory) -> None:
    device = lab.loop(size=64 * MiB, name="unused.img")
    [found] = await inventory.list([device])
    stat = os.stat(device)
    assert found["name"] == name_of(device)
    assert found["path"] == device
    assert found["type"] == "loop"
    assert found["majorMinor"] == f"{os.major(stat.st_rdev)}:{os.minor(stat.st_rdev)}"
    assert found["size"] == 64 * MiB
    assert found["readOnly"] is False
    assert found["backingFile"] == str(lab.workdir / "unused.img")
    assert found["fstype"] is None
    assert found["probeError"] is None
    assert found["mountpoints"] == []
    assert found["holders"] == []
    assert found["slaves"] == []
    assert found["swap"] is False
    assert found["inUse"] is False
    assert found["inUseReasons"] == []
    assert found["identity"] == f"dev:{found['majorMinor']}:{64 * MiB}"
    assert await inventory.check_not_in_use(device) == found


@root
async def test_ext4_signature(lab: DeviceLab, inventory: Inventory) -> None:
    device = lab.loop()
    fs_uuid = str(uuid.uuid4())
    lab.mkfs_ext4(device, label="scratch", fs_uuid=fs_uuid)
    [found] = await inventory.list([device])
    assert (found["fstype"], found["label"], found["uuid"]) == ("ext4", "scratch", fs_uuid)
    assert found["partitionTable"] is None
    assert found["inUse"] is False  # a filesystem is not a use; a mount is


@root
async def test_mounted_loop_device(lab: DeviceLab, inventory: Inventory) -> None:
    device = lab.loop()
    lab.mkfs_ext4(device)
    # A space in the mount point checks the \040 unescaping of mountinfo.
    target = lab.mount(device, name="mount point")
    [found] = await inventory.list([device])
    assert found["mountpoints"] == [str(target)]
    assert codes(found) == ["mounted"]
    assert reason(found, "mounted") == f"mounted at {target}"
    with pytest.raises(errors.DeviceInUse) as caught:
        await inventory.check_not_in_use(device)
    assert caught.value.data["path"] == device
    assert caught.value.data["reasons"] == found["inUseReasons"]
    lab.umount(target)
    # device() must see the unmount at once (a fresh collection, not a cached one).
    assert (await inventory.device(device))["inUse"] is False


@root
async def test_swap_loop_device(lab: DeviceLab, inventory: Inventory) -> None:
    device = lab.loop()
    lab.swapon(device)
    [found] = await inventory.list([device])
    assert found["fstype"] == "swap"
    assert found["swap"] is True
    assert codes(found) == ["swap"]
    assert reason(found, "swap") == "used as swap"
    with pytest.raises(errors.DeviceInUse):
        await inventory.check_not_in_use(device)


@root
async def test_exclusively_opened_device_is_busy(lab: DeviceLab, inventory: Inventory) -> None:
    """What the tables cannot see (a mount in another namespace, a running mkfs)."""
    device = lab.loop()
    with exclusive_open(device):
        [found] = await inventory.list([device])
        assert found["inUse"] is False  # the listing is passive
        with pytest.raises(errors.DeviceInUse) as caught:
            await inventory.check_not_in_use(device)
    assert [item["code"] for item in caught.value.data["reasons"]] == ["busy"]
    await inventory.check_not_in_use(device)


# -- devices that hold other devices ---------------------------------------------------


@root
async def test_device_backing_a_loop_file(lab: DeviceLab, inventory: Inventory) -> None:
    outer = lab.loop()
    lab.mkfs_ext4(outer)
    target = lab.mount(outer)
    inner_image = lab.image("inner.img", 16 * MiB, directory=target)
    inner = lab.attach(inner_image)

    found_outer, found_inner = await inventory.list([outer, inner])
    assert found_outer["backsLoops"] == [name_of(inner)]
    assert codes(found_outer) == ["mounted", "backs-loop"]
    assert reason(found_outer, "backs-loop") == f"backs {inner} ({inner_image})"
    assert found_inner["backingFile"] == str(inner_image)
    assert found_inner["inUse"] is False

    # Lazily unmounted: gone from the mount table, but the filesystem lives
    # on while the inner loop device keeps its file open.
    lab.umount(target, lazy=True)
    found_outer = await inventory.device(outer)
    assert found_outer["mountpoints"] == []
    assert codes(found_outer) == ["backs-loop"]
    with pytest.raises(errors.DeviceInUse):
        await inventory.check_not_in_use(outer)


@root
async def test_device_backing_a_loop_directly(lab: DeviceLab, inventory: Inventory) -> None:
    lower = lab.loop()
    upper = lab.attach(lower)
    found_lower, found_upper = await inventory.list([lower, upper])
    assert found_lower["backsLoops"] == [name_of(upper)]
    assert reason(found_lower, "backs-loop") == f"backs {upper} ({lower})"
    assert found_upper["inUse"] is False


@root
async def test_device_mapper_holder(lab: DeviceLab, inventory: Inventory) -> None:
    if not dm_available():
        pytest.skip("device-mapper is not available in this kernel (no device-mapper in "
                    "/proc/misc); 'held' is covered by the sysfs-tree unit tests")
    device = lab.loop(size=16 * MiB)
    holder = lab.dm_linear(device, sectors=16 * MiB // 512)
    [found] = await inventory.list([device])
    assert found["holders"] == [holder]
    assert codes(found) == ["held"]
    assert reason(found, "held").startswith(f"held by {holder} (vdsm-agent-test-")
    dm = next(item for item in await inventory.list() if item["name"] == holder)
    assert dm["type"] == "dm"
    assert dm["slaves"] == [name_of(device)]
    with pytest.raises(errors.DeviceInUse):
        await inventory.check_not_in_use(device)


# -- partitions --------------------------------------------------------------------------


@root
async def test_partitions(lab: DeviceLab, inventory: Inventory) -> None:
    disk = lab.loop(size=64 * MiB)
    first, second = lab.partition(disk, "label: dos\n,32M,L\n,,S\n")
    lab.mkfs_ext4(first, label="part1")

    found_disk, found_first, found_second = await inventory.list([disk, first, second])
    assert found_disk["partitionTable"] == "dos"
    assert found_disk["partitions"] == [name_of(first), name_of(second)]
    assert found_first["type"] == "partition"
    assert found_first["parent"] == name_of(disk)
    assert found_first["fstype"] == "ext4"
    assert found_first["label"] == "part1"
    assert found_first["size"] == 32 * MiB
    assert found_first["logicalBlockSize"] == found_disk["logicalBlockSize"]
    assert found_first["identity"] == f"dev:{found_first['majorMinor']}:{32 * MiB}"
    assert found_disk["inUse"] is False
    assert found_first["inUse"] is False

    target = lab.mount(first)
    lab.swapon(second)
    found_disk, found_first, found_second = await inventory.list([disk, first, second])
    assert codes(found_first) == ["mounted"]
    assert codes(found_second) == ["swap"]
    assert codes(found_disk) == ["partition-mounted", "partition-swap"]
    assert reason(found_disk, "partition-mounted") == (
        f"partition {name_of(first)} mounted at {target}")
    assert reason(found_disk, "partition-swap") == f"partition {name_of(second)} used as swap"
    with pytest.raises(errors.DeviceInUse) as caught:
        await inventory.check_not_in_use(disk)
    assert len(caught.value.data["reasons"]) == 2


@root
async def test_partition_of_a_disk_in_use(lab: DeviceLab, inventory: Inventory) -> None:
    """Partition nodes outlive the table: the disk is swap now, so its partitions are too."""
    disk = lab.loop(size=64 * MiB)
    first, _ = lab.partition(disk, "label: dos\n,32M,L\n,,L\n")
    lab.swapon(disk)
    found = await inventory.device(first)
    assert found["swap"] is False
    assert found["inUseReasons"] == [
        {"code": "swap", "message": f"disk {name_of(disk)} used as swap"}]
    with pytest.raises(errors.DeviceInUse):
        await inventory.check_not_in_use(first)


@root
async def test_root_device(inventory: Inventory) -> None:
    """The device under / (vda on the project VM) is in use as the root device."""
    major, minor = root_devnum()
    if major == 0:
        pytest.skip("/ is not on a block device here (overlay, NFS or btrfs subvolume)")
    devices = await inventory.list()
    [found] = [item for item in devices if item["majorMinor"] == f"{major}:{minor}"]
    assert "/" in found["mountpoints"]
    assert "mounted" in codes(found)
    assert reason(found, "root") == "backs the root filesystem"
    if found["parent"]:
        [disk] = [item for item in devices if item["name"] == found["parent"]]
        assert "root" in codes(disk)
    with pytest.raises(errors.DeviceInUse):
        await inventory.check_not_in_use(found["path"])


# -- lookup by path ----------------------------------------------------------------------


@root
async def test_symlinks_are_resolved(lab: DeviceLab, inventory: Inventory,
                                     tmp_path: Path) -> None:
    device = lab.loop()
    link = tmp_path / "by-id-link"
    link.symlink_to(device)
    assert (await inventory.device(str(link)))["name"] == name_of(device)


async def test_paths_that_are_not_block_devices(inventory: Inventory, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for path in ("/dev/null", str(tmp_path / "file"), str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(errors.DeviceNotFound) as caught:
            await inventory.device(path)
        assert caught.value.data == {"path": path}
        with pytest.raises(errors.DeviceNotFound):
            await inventory.list(["/dev/null", path])


# -- through the API --------------------------------------------------------------------


async def test_api_whole_list(rpc: Any) -> None:
    result = await rpc.call("getDeviceList")  # checked against the schema by rpc.call
    names = [device["name"] for device in result["devices"]]
    assert len(names) == len(set(names))
    by_name = {device["name"]: device for device in result["devices"]}
    for device in result["devices"]:
        assert device["inUse"] == bool(device["inUseReasons"])
        if device["parent"]:
            assert device["name"] in by_name[device["parent"]]["partitions"]


@root
async def test_api_paths_in_order(rpc: Any, lab: DeviceLab) -> None:
    first, second = lab.loop(), lab.loop()
    result = await rpc.call("getDeviceList", paths=[second, first, second])
    assert [device["path"] for device in result["devices"]] == [second, first, second]


async def test_api_device_not_found(rpc: Any) -> None:
    with pytest.raises(RpcFailure) as caught:
        await rpc.call("getDeviceList", paths=["/dev/vdsm-agent-no-such-device"])
    assert caught.value.name == "DeviceNotFound"
    assert caught.value.code == 300
    assert caught.value.data is not None
    assert caught.value.data["path"] == "/dev/vdsm-agent-no-such-device"


@pytest.mark.parametrize("path", ["relative/path", "/etc/passwd", "/dev/$(reboot)", ""])
async def test_api_path_pattern(rpc: Any, path: str) -> None:
    with pytest.raises(RpcFailure) as caught:
        await rpc.call("getDeviceList", paths=[path])
    assert caught.value.code == -32602


@root
async def test_event_loop_not_blocked(rpc: Any, lab: DeviceLab,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    lab.loop()  # at least one device that blkid probes
    real_run = commands.run
    probing = threading.Event()

    def slow_run(argv: Any, **kwargs: Any) -> commands.CommandResult:
        if argv[0] == "blkid":
            probing.set()
            time.sleep(1.0)
        return real_run(argv, **kwargs)

    monkeypatch.setattr(commands, "run", slow_run)
    # A client of its own: RpcClient matches answer IDs to its last request.
    listing = asyncio.create_task(RpcClient(rpc.client).call("getDeviceList"))
    while not probing.is_set():
        await asyncio.sleep(0.01)
    for _ in range(5):
        started = time.monotonic()
        await rpc.call("ping")
        assert time.monotonic() - started < 0.1
    assert not listing.done()
    assert (await listing)["devices"]


async def test_one_listing_is_fast(inventory: Inventory) -> None:
    started = time.monotonic()
    await inventory.list()
    elapsed = time.monotonic() - started
    print(f"getDeviceList collection: {elapsed * 1000:.1f} ms")
    assert elapsed < 5.0
