"""The one mount-table parser (vdsm_agent/system/mountinfo.py), for devices and connections."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.connections_support import FakeRunner
from vdsm_agent.connections.backends.base import BackendContext
from vdsm_agent.connections.backends.nfs import NfsBackend
from vdsm_agent.devices import collect
from vdsm_agent.system import mountinfo

TABLE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/root rw,discard
60 27 7:3 / /mnt/with\\040space rw,relatime shared:5 master:1 - ext4 /dev/loop3 rw
61 27 0:45 /@home /home rw,relatime shared:7 - btrfs /dev/vdb2 rw,subvol=/@home
36 35 98:0 /mnt1 /mnt/glu\\011ster rw,noatime master:1 shared:2 - fuse.glusterfs vm:/gv rw,user_id=0
37 35 0:5 / /x rw - nfs4 [fe80::1]:/e
garbage line
"""


def test_every_field_is_parsed_and_unescaped() -> None:
    entries = mountinfo.parse(TABLE)
    assert [(e.mount_id, e.devnum, e.root, e.mount_point, e.fstype, e.source, e.options)
            for e in entries] == [
        (22, (0, 21), "/", "/proc", "proc", "proc", "rw"),
        (27, (254, 0), "/", "/", "ext4", "/dev/root", "rw,discard"),
        (60, (7, 3), "/", "/mnt/with space", "ext4", "/dev/loop3", "rw"),
        (61, (0, 45), "/@home", "/home", "btrfs", "/dev/vdb2", "rw,subvol=/@home"),
        (36, (98, 0), "/mnt1", "/mnt/glu\tster", "fuse.glusterfs", "vm:/gv", "rw,user_id=0"),
        (37, (0, 5), "/", "/x", "nfs4", "[fe80::1]:/e", ""),
    ]


def test_escapes_are_decoded_in_names_and_types_alike() -> None:
    """The two parsers this one replaced disagreed: one left the filesystem type
    escaped. A FUSE type names its program, which may hold any character."""
    line = "40 1 0:50 /a\\134b /m\\012n rw - fuse.my\\040fs src\\040x rw"
    [entry] = mountinfo.parse(line)
    assert (entry.root, entry.mount_point) == ("/a\\b", "/m\nn")
    assert (entry.fstype, entry.source) == ("fuse.my fs", "src x")


def test_a_name_that_is_not_utf8_keeps_its_bytes(tmp_path: Path) -> None:
    """The table is decoded as file names are: the mount point handed back to the
    kernel is the directory that is mounted (one parser replaced 'replace',
    which turned such a name into U+FFFD and matched no directory)."""
    raw = b"/srv/caf\xe9"
    table = tmp_path / "mountinfo"
    table.write_bytes(b"50 1 0:60 / " + raw + b" rw - tmpfs tmpfs rw\n")
    [entry] = mountinfo.read(table)
    assert os.fsencode(entry.mount_point) == raw
    assert mountinfo.find(os.fsdecode(raw), table) == entry


def test_find_is_the_topmost_mount(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text("1 0 0:2 / /m rw - tmpfs first rw\n"
                     "2 1 0:3 / /m rw - tmpfs second rw\n")
    found = mountinfo.find("/m", table)
    assert found is not None
    assert found.source == "second"
    assert mountinfo.find("/elsewhere", table) is None


def test_devices_and_connections_read_the_same_table(tmp_path: Path) -> None:
    """The device inventory and the mount backends see one mount point the same
    way (it was two parsers with two decodings)."""
    table = tmp_path / "mountinfo"
    table.write_text(TABLE)
    entries = mountinfo.read(table)
    assert "/mnt/with space" in collect.mount_table(entries)[(7, 3)]
    backend = NfsBackend(BackendContext(runner=FakeRunner(), mount_root=tmp_path / "mnt",
                                        mountinfo=table))
    assert [found.uri for found in backend.discover()] == ["nfs://[fe80::1]/e"]


@pytest.mark.root
@pytest.mark.tool("mount")
def test_a_real_mount_point_with_a_space(tmp_path: Path) -> None:
    point = tmp_path / "with space\tand tab"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "vdsm-test", str(point)], check=True)
    try:
        found = mountinfo.find(str(point))
        assert found is not None
        assert (found.fstype, found.source) == ("tmpfs", "vdsm-test")
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
