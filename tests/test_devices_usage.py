"""Unit tests of the inventory's parts: the verdict rules, parsers, sysfs reading, sharing.

No root needed: facts are made by hand, sysfs is a directory tree in tmp_path,
and the collection is replaced where the sharing of collections is tested.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from vdsm_agent import errors
from vdsm_agent.devices import blkid, collect, inventory, loop, procfs, sysfs, usage
from vdsm_agent.devices.usage import HostState, LoopBacking, Node, Reason
from vdsm_agent.settings import Config
from vdsm_agent.system import commands, mountinfo
from vdsm_agent.system.commands import CommandResult

# -- the verdict ---------------------------------------------------------------------------

DISK = Node("sda", (8, 0))
PART1 = Node("sda1", (8, 1), parent="sda")
PART2 = Node("sda2", (8, 2), parent="sda")


def verdict(nodes: list[Node], host: HostState) -> dict[str, list[tuple[str, str]]]:
    return {name: [(reason.code, reason.message) for reason in reasons]
            for name, reasons in usage.evaluate(nodes, host).items()}


def test_nothing_in_use() -> None:
    assert verdict([DISK, PART1], HostState()) == {"sda": [], "sda1": []}


def test_mounted_and_partition_mounted() -> None:
    host = HostState(mounts={(8, 1): ("/boot", "/mnt/boot copy")})
    result = verdict([DISK, PART1, PART2], host)
    assert result["sda1"] == [("mounted", "mounted at /boot, /mnt/boot copy")]
    assert result["sda"] == [("partition-mounted",
                              "partition sda1 mounted at /boot, /mnt/boot copy")]
    assert result["sda2"] == []


def test_swap_and_partition_swap() -> None:
    result = verdict([DISK, PART1, PART2], HostState(swaps=frozenset({(8, 2)})))
    assert result["sda2"] == [("swap", "used as swap")]
    assert result["sda"] == [("partition-swap", "partition sda2 used as swap")]


def test_held_and_partition_held() -> None:
    held = dataclasses.replace(PART2, holders=("dm-0", "md127"))
    dm = Node("dm-0", (253, 0), slaves=("sda2",), alias="vg-lv")
    result = verdict([DISK, PART1, held, dm], HostState())
    assert result["sda2"] == [("held", "held by dm-0 (vg-lv), md127")]
    assert result["sda"] == [("partition-held", "partition sda2 held by dm-0 (vg-lv), md127")]
    assert result["dm-0"] == []


def test_backs_loop_on_partition_and_disk() -> None:
    loop5 = Node("loop5", (7, 5), backing=LoopBacking("loop5", "/mnt/x/img", (8, 1)))
    result = verdict([DISK, PART1, loop5], HostState(mounts={(8, 1): ("/mnt/x",)}))
    assert result["sda1"] == [("mounted", "mounted at /mnt/x"),
                              ("backs-loop", "backs /dev/loop5 (/mnt/x/img)")]
    assert ("backs-loop", "partition sda1 backs /dev/loop5 (/mnt/x/img)") in result["sda"]
    assert result["loop5"] == []


def test_backs_loop_without_mount() -> None:
    """Lazily unmounted: only the loop device still shows that the filesystem lives."""
    loop5 = Node("loop5", (7, 5), backing=LoopBacking("loop5", "/img (deleted)", (8, 0)))
    assert verdict([DISK, loop5], HostState())["sda"] == [
        ("backs-loop", "backs /dev/loop5 (/img (deleted))")]


def test_root_through_dm_and_partition() -> None:
    lower = dataclasses.replace(PART2, holders=("dm-0",))
    dm = Node("dm-0", (253, 0), slaves=("sda2",), alias="vg-root")
    other = Node("sdb", (8, 16))
    host = HostState(mounts={(253, 0): ("/",)}, root=frozenset({(253, 0)}))
    result = verdict([DISK, PART1, lower, dm, other], host)
    assert result["dm-0"] == [("mounted", "mounted at /"), ("root", "backs the root filesystem")]
    assert ("root", "backs the root filesystem") in result["sda2"]
    assert ("held", "held by dm-0 (vg-root)") in result["sda2"]
    assert ("root", "backs the root filesystem") in result["sda"]
    assert result["sda1"] == []
    assert result["sdb"] == []


def test_partitions_inherit_what_uses_their_whole_disk() -> None:
    """A multipath path device with partition nodes: writing sdb1 corrupts the map."""
    path = Node("sdb", (8, 16), holders=("dm-3",))
    part = Node("sdb1", (8, 17), parent="sdb")
    mpath = Node("dm-3", (253, 3), slaves=("sdb",), alias="mpatha")
    result = verdict([path, part, mpath], HostState())
    assert result["sdb"] == [("held", "held by dm-3 (mpatha)")]
    assert result["sdb1"] == [("held", "disk sdb held by dm-3 (mpatha)")]


def test_partitions_of_a_whole_disk_root() -> None:
    disk = Node("vda", (254, 0))
    part = Node("vda1", (254, 1), parent="vda")
    host = HostState(mounts={(254, 0): ("/",)}, root=frozenset({(254, 0)}))
    assert verdict([disk, part], host)["vda1"] == [
        ("mounted", "disk vda mounted at /"), ("root", "disk vda backs the root filesystem")]


def test_root_on_a_loop_device_follows_the_backing_file() -> None:
    live = Node("loop0", (7, 0), backing=LoopBacking("loop0", "/run/live/root.img", (8, 1)))
    host = HostState(mounts={(7, 0): ("/",), (8, 1): ("/run/live",)},
                     root=frozenset({(7, 0)}))
    result = verdict([DISK, PART1, live], host)
    for name in ("loop0", "sda1", "sda"):
        assert ("root", "backs the root filesystem") in result[name], name


def test_root_not_a_block_device() -> None:
    assert verdict([DISK], HostState(root=frozenset({(0, 21)}))) == {"sda": []}


def test_mounted_member_without_mount_point() -> None:
    host = HostState(mounted_members={(8, 0): "part of the mounted btrfs filesystem X"})
    assert verdict([DISK], host)["sda"] == [
        ("mounted", "part of the mounted btrfs filesystem X")]


def test_every_reason_code_is_in_the_schema() -> None:
    from tests.support import SCHEMA
    enum = SCHEMA.components["schemas"]["InUseReason"]["properties"]["code"]["enum"]
    codes = {usage.MOUNTED, usage.PARTITION_MOUNTED, usage.SWAP, usage.PARTITION_SWAP,
             usage.HELD, usage.PARTITION_HELD, usage.BACKS_LOOP, usage.ROOT, usage.BUSY}
    assert codes == set(enum)


# -- /proc parsers ------------------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/root rw,discard
60 27 7:3 / /mnt/with\\040space rw,relatime shared:5 master:1 - ext4 /dev/loop3 rw
61 27 0:45 /@home /home rw,relatime shared:7 - btrfs /dev/vdb2 rw,subvol=/@home
garbage line
"""


def test_mount_devnum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procfs, "block_devnum",
                        lambda path: (252, 2) if path == "/dev/vdb2" else None)
    mounts = mountinfo.parse(MOUNTINFO)
    # By number, never by name: /dev/root does not exist, 254:0 is still right.
    assert [procfs.mount_devnum(m) for m in mounts] == [None, (254, 0), (7, 3), (252, 2)]


def test_parse_swaps() -> None:
    text = ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            "/dev/loop3                              partition\t65532\t\t0\t\t-2\n"
            "/var/swap\\040file                       file\t\t1024\t\t0\t\t-3\n")
    assert procfs.parse_swaps(text) == [procfs.Swap("/dev/loop3", "partition"),
                                        procfs.Swap("/var/swap file", "file")]


def test_block_devnum(tmp_path: Path) -> None:
    assert procfs.block_devnum("/dev/null") is None  # a character device
    assert procfs.block_devnum(str(tmp_path)) is None
    assert procfs.block_devnum(str(tmp_path / "missing")) is None


# -- blkid ------------------------------------------------------------------------------------


def result(code: int, stdout: str = "", stderr: str = "") -> CommandResult:
    return CommandResult(["blkid"], code, stdout, stderr)


def test_blkid_export() -> None:
    out = ("DEVNAME=/dev/loop3\nLABEL=my\\ \\$label\\\\x\nUUID=1234-abcd\nTYPE=vfat\n"
           "PTTYPE=dos\nUSAGE=filesystem\n")
    assert blkid.interpret(result(0, out)) == blkid.Signature(
        fstype="vfat", label="my $label\\x", uuid="1234-abcd", partition_table="dos")


def test_blkid_nothing_found() -> None:
    assert blkid.interpret(result(2)) == blkid.NO_SIGNATURE


def test_blkid_cannot_open() -> None:
    # blkid exits 2 also when it cannot open the device: not "blank".
    signature = blkid.interpret(result(2, stderr="blkid: error: /dev/vda: Permission denied"))
    assert signature.fstype is None
    assert signature.error == "blkid: error: /dev/vda: Permission denied"


def test_blkid_ambivalent() -> None:
    assert blkid.interpret(result(8)).error == "blkid exit code 8"


def test_blkid_probe_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(argv: Any, **kwargs: Any) -> CommandResult:
        assert argv == ["blkid", "-p", "-o", "export", "--", "/dev/x"]
        raise commands.CommandTimeout(argv, "timed out after 1s")

    monkeypatch.setattr(commands, "run", broken)
    assert blkid.probe("/dev/x", timeout=1).error == "blkid: timed out after 1s"


# -- sysfs ------------------------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str | bytes | None]) -> None:
    """Files (str/bytes content) and directories (None)."""
    for relative, content in files.items():
        path = root / relative
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def scsi_disk(root: Path) -> Path:
    disk = root / "sda"
    serial = b"SN-0042  "
    write_tree(disk, {
        "dev": "8:0\n", "size": "2097152\n", "ro": "0\n", "removable": "0\n",
        "queue/rotational": "1\n", "queue/logical_block_size": "4096\n",
        "device/model": "VIRTUAL-DISK    \n", "device/wwid": "naa.6001405abc  def\n",
        "device/vpd_pg80": bytes([0, 0x80, 0, len(serial)]) + serial,
        "holders": None, "slaves": None,
        "sda1/dev": "8:1\n", "sda1/size": "1024\n", "sda1/partition": "1\n",
        "sda1/ro": "0\n", "sda1/holders/dm-0": "", "sda1/slaves": None,
    })
    return disk


def test_read_facts_of_a_scsi_disk_and_its_held_partition(tmp_path: Path) -> None:
    disk = scsi_disk(tmp_path)
    facts = sysfs.read_facts(str(disk), "sda", "disk", "/dev/sda")
    assert facts.devnum == (8, 0)
    assert facts.size == 2097152 * 512
    assert facts.rotational is True
    assert facts.logical_block_size == 4096
    assert facts.model == "VIRTUAL-DISK"
    assert facts.serial == "SN-0042"
    assert facts.wwn == "naa.6001405abc def"
    assert facts.holders == ()
    part = sysfs.read_facts(str(disk / "sda1"), "sda1", "partition", "/dev/sda1")
    assert part.parent == "sda"
    assert part.partition_number == 1
    assert part.holders == ("dm-0",)
    assert part.serial is None  # hardware IDs belong to the disk
    [disk_facts, part_facts] = collect.inherit_from_disks([facts, part])
    assert part_facts.logical_block_size == 4096
    assert part_facts.rotational is True
    assert collect.identity(facts, [], None) == "wwn:naa.6001405abc def"
    assert collect.identity(part_facts, [], disk_facts) == "wwn:naa.6001405abc def-part1"
    # held, end to end from the sysfs tree
    nodes = [collect.to_node(item) for item in (disk_facts, part_facts)]
    reasons = usage.evaluate(nodes, HostState())
    assert reasons["sda1"] == [Reason("held", "held by dm-0")]
    assert reasons["sda"] == [Reason("partition-held", "partition sda1 held by dm-0")]


def test_read_facts_of_a_vanished_device(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sysfs.read_facts(str(tmp_path / "loop9"), "loop9", "disk", "/dev/loop9")


def test_by_id_links(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (tmp_path / "sda").touch()
    (by_id / "wwn-0x5000").symlink_to(tmp_path / "sda")
    (by_id / "ata-DISK_SN1").symlink_to("../sda")
    (by_id / "not-a-link").touch()
    assert sysfs.by_id_links(str(by_id)) == {"sda": ["ata-DISK_SN1", "wwn-0x5000"]}
    assert sysfs.by_id_links(str(tmp_path / "missing")) == {}


def test_mounted_btrfs(tmp_path: Path) -> None:
    write_tree(tmp_path, {"features": None, "fsid-1/devices/vdb": "", "fsid-1/devices/vdc": ""})
    assert sysfs.mounted_btrfs(str(tmp_path)) == {"fsid-1": ("vdb", "vdc")}


def facts(name: str, devnum: tuple[int, int], **changes: Any) -> sysfs.BlockFacts:
    base = sysfs.BlockFacts(
        name=name, sys_path=f"/sys/block/{name}", devnode=f"/dev/{name}", devnum=devnum,
        devtype="disk", size=1 << 30, read_only=False, removable=False, rotational=None,
        logical_block_size=512, model=None, serial=None, wwn=None, holders=(), slaves=(),
        parent=None, partition_number=None, backing_file=None, dm_name=None)
    return dataclasses.replace(base, **changes)


def test_identity_order() -> None:
    disk = facts("sda", (8, 0), wwn="naa.1", serial="S1")
    assert collect.identity(disk, ["ata-X"], None) == "wwn:naa.1"
    assert collect.identity(dataclasses.replace(disk, wwn=None), ["ata-X"], None) == "serial:S1"
    plain = facts("sdb", (8, 16))
    assert collect.identity(plain, ["ata-Y", "wwn-Z"], None) == "ata-Y"
    assert collect.identity(plain, [], None) == f"dev:8:16:{1 << 30}"


def test_device_types() -> None:
    assert collect.device_type(facts("loop3", (7, 3))) == "loop"
    assert collect.device_type(facts("dm-0", (253, 0), dm_name="vg-lv")) == "dm"
    assert collect.device_type(facts("md127", (9, 127))) == "md"
    assert collect.device_type(facts("vda1", (254, 1), devtype="partition")) == "partition"
    assert collect.device_type(facts("zram0", (252, 0))) == "zram"
    assert collect.device_type(facts("nvme0n1", (259, 0))) == "disk"


def test_natural_order() -> None:
    names = ["loop10", "vda1", "loop2", "vda", "loop1p2", "loop1"]
    assert sorted(names, key=collect.natural_key) == [
        "loop1", "loop1p2", "loop2", "loop10", "vda", "vda1"]


# -- host state assembly ----------------------------------------------------------------------


def test_btrfs_members_share_mount_points_and_root() -> None:
    mounts = {(252, 2): ["/", "/home"]}
    root = {(252, 2)}
    devnums = {"vdb2": (252, 2), "vdc": (252, 32), "vdd": (252, 48)}
    unplaced = collect.spread_btrfs(mounts, root, {"A": ("vdb2", "vdc"), "B": ("vdd",)}, devnums)
    assert mounts[(252, 32)] == ["/", "/home"]
    assert root == {(252, 2), (252, 32)}
    assert unplaced == {(252, 48): "part of the mounted btrfs filesystem B"}


def test_root_is_the_last_mount_on_slash() -> None:
    mounts = mountinfo.parse("1 0 0:2 / / rw - rootfs rootfs rw\n"
                             "27 1 254:0 / / rw - ext4 /dev/vda rw\n")
    assert collect.root_devnums(mounts) == {(254, 0)}


def test_swap_matched_by_number_then_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procfs, "block_devnum",
                        lambda path: (7, 3) if path == "/dev/disk/by-label/swap" else None)
    swaps = [procfs.Swap("/dev/disk/by-label/swap", "partition"),
             procfs.Swap("/dev/zram0", "partition"),
             procfs.Swap("/swapfile", "file")]
    assert collect.active_swaps(swaps, {"zram0": (252, 0)}) == {(7, 3), (252, 0)}


# -- loop status ------------------------------------------------------------------------------


def encode(major: int, minor: int) -> int:
    # The kernel's new_encode_dev().
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def status(device: int, inode: int, rdevice: int) -> bytes:
    return struct.pack("=QQQ", device, inode, rdevice) + bytes(loop.LOOP_INFO64_SIZE - 24)


def test_loop_backing_from_status() -> None:
    assert loop.backing_from_status(status(encode(259, 300), 12, 0)) == (259, 300)
    # A block device as backing "file": the device itself, not devtmpfs.
    assert loop.backing_from_status(status(encode(0, 6), 5, encode(7, 4))) == (7, 4)
    assert loop.backing_from_status(b"") is None


def test_loop_backing_stat_fallback(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.touch()
    info = image.stat()
    expected = (os.major(info.st_dev), os.minor(info.st_dev))
    assert loop.backing_device("/nonexistent/loop", str(image)) == expected
    assert loop.backing_device("/nonexistent/loop", f"{image} (deleted)") is None


# -- sharing one collection -----------------------------------------------------------------------


class FakeCollector:
    """Stands in for collect.collect: counts runs, each taking ``delay`` seconds."""

    def __init__(self, delay: float = 0.2) -> None:
        self.delay = delay
        self.runs = 0

    def __call__(self, timeout: float) -> collect.Snapshot:
        self.runs += 1
        run = self.runs
        time.sleep(self.delay)
        device = {"name": "loop0", "run": run, "inUse": False, "inUseReasons": []}
        return collect.Snapshot(devices=[device], by_devnum={(7, 0): device},
                                started=0.0, duration=self.delay)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCollector:
    collector = FakeCollector()
    monkeypatch.setattr(collect, "collect", collector)
    monkeypatch.setattr(inventory, "resolve_paths", lambda paths: [(7, 0) for _ in paths])
    monkeypatch.setattr(procfs, "block_devnum", lambda path: (7, 0))
    monkeypatch.setattr(inventory, "exclusive_open_probe", lambda path: None)
    return collector


async def test_concurrent_callers_share_one_collection(fake: FakeCollector,
                                                       config: Config) -> None:
    inv = inventory.Inventory(config)
    results = await asyncio.gather(inv.list(), inv.list(), inv.list(["/dev/loop0"]))
    assert fake.runs == 1
    assert [devices[0]["run"] for devices in results] == [1, 1, 1]
    assert inv.last_duration == pytest.approx(0.2)
    await inv.list()
    assert fake.runs == 2  # a finished collection is not reused


async def test_fresh_callers_wait_for_a_new_collection(fake: FakeCollector,
                                                       config: Config) -> None:
    inv = inventory.Inventory(config)
    early = asyncio.create_task(inv.list())
    await asyncio.sleep(0.05)  # the first collection is running
    late = await asyncio.gather(inv.device("/dev/loop0"), inv.check_not_in_use("/dev/loop0"))
    assert (await early)[0]["run"] == 1
    assert [device["run"] for device in late] == [2, 2]
    assert fake.runs == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_collection(
        fake: FakeCollector, config: Config) -> None:
    inv = inventory.Inventory(config)
    first = asyncio.create_task(inv.list())
    second = asyncio.create_task(inv.list())
    await asyncio.sleep(0.05)
    first.cancel()
    assert (await second)[0]["run"] == 1
    assert first.cancelled()


async def test_device_results_are_private_copies(fake: FakeCollector, config: Config) -> None:
    inv = inventory.Inventory(config)
    device = await inv.device("/dev/loop0")
    device["inUse"] = True
    assert fake.runs == 1


async def test_in_use_error_carries_the_reasons(monkeypatch: pytest.MonkeyPatch,
                                                fake: FakeCollector, config: Config) -> None:
    reasons = [{"code": "mounted", "message": "mounted at /mnt/x"},
               {"code": "root", "message": "backs the root filesystem"}]

    def in_use(timeout: float) -> collect.Snapshot:
        device = {"name": "vda", "inUse": True, "inUseReasons": reasons}
        return collect.Snapshot([device], {(7, 0): device}, 0.0, 0.0)

    monkeypatch.setattr(collect, "collect", in_use)
    with pytest.raises(errors.DeviceInUse) as caught:
        await inventory.Inventory(config).check_not_in_use("/dev/vda")
    assert caught.value.data == {"path": "/dev/vda", "reasons": reasons}
    assert str(caught.value) == ("/dev/vda is in use: mounted at /mnt/x; "
                                 "backs the root filesystem")
    assert caught.value.to_error()["code"] == 301


async def test_a_failed_collection_reaches_every_caller(monkeypatch: pytest.MonkeyPatch,
                                                        config: Config) -> None:
    def broken(timeout: float) -> collect.Snapshot:
        raise OSError("sysfs is gone")

    monkeypatch.setattr(collect, "collect", broken)
    inv = inventory.Inventory(config)
    outcomes = await asyncio.gather(inv.list(), inv.list(), return_exceptions=True)
    assert all(isinstance(outcome, OSError) for outcome in outcomes)


def test_loop_over_a_mounted_disk_is_in_use() -> None:
    # losetup /dev/loop6 /dev/sda while sda1 is mounted: writing loop6 writes sda.
    loop6 = Node("loop6", (7, 6), backing=LoopBacking("loop6", "/dev/sda", (8, 0)))
    result = verdict([DISK, PART1, loop6], HostState(mounts={(8, 1): ("/mnt/x",)}))
    codes = [code for code, _ in result["loop6"]]
    assert codes == ["partition-mounted"]
    assert "backing device sda" in result["loop6"][0][1]


def test_loop_over_a_file_does_not_inherit_the_filesystems_verdict() -> None:
    loop5 = Node("loop5", (7, 5), backing=LoopBacking("loop5", "/mnt/x/img", (8, 1)))
    result = verdict([DISK, PART1, loop5], HostState(mounts={(8, 1): ("/mnt/x",)}))
    assert result["loop5"] == []
