"""Real GlusterFS volumes for the gluster task tests: bricks under tmp, a FUSE mount.

glusterd is the session's (``connections_support.gluster_server``: started
once, or one already running reused); each test makes its own distributed
volume (unique name, bricks under its tmp dir), mounts it, writes files, and
at teardown unmounts it, stops and deletes it by name, even when the test
failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from tests.connections_support import GlusterServer, _wait_glusterd, gluster, sh
from tests.support import until

_COUNTER = itertools.count()


@dataclasses.dataclass
class Volume:
    name: str
    host: str
    base: Path
    bricks: list[Path]
    mount: Path

    def brick(self, path: Path) -> str:
        return f"{self.host}:{path}"

    def add_brick(self) -> Path:
        path = self.base / f"b{len(self.bricks) + 1}"
        path.mkdir()
        gluster("volume", "add-brick", self.name, self.brick(path), "force")
        self.bricks.append(path)
        return path

    def write_files(self, count: int, size: int) -> None:
        """``count`` files of random data through the FUSE mount."""
        for index in range(count):
            (self.mount / f"f{index:05d}").write_bytes(os.urandom(size))

    def checksums(self) -> dict[str, str]:
        """sha256 of every file, read through the mount."""
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(self.mount.iterdir()) if path.is_file()}

    def files_on(self, brick: Path) -> list[str]:
        """Data files a brick holds (not Gluster's own, nor link files)."""
        return [entry.name for entry in brick.iterdir()
                if entry.is_file() and not entry.name.startswith(".")
                and entry.stat().st_size > 0]

    def brick_names(self) -> list[str]:
        root = ET.fromstring(gluster("volume", "info", self.name, "--xml").stdout)
        return [(node.text or "").strip() for node in root.iter("name")
                if (node.text or "").startswith(f"{self.host}:")]

    def brick_pid(self, path: Path) -> int:
        """The brick's process (glusterfsd), from ``volume status``; 0 when offline."""
        root = ET.fromstring(gluster("volume", "status", self.name, "--xml").stdout)
        for node in root.iter("node"):
            if node.findtext("path") == str(path):
                pid = node.findtext("pid") or ""
                online = node.findtext("status") == "1"
                return int(pid) if online and pid.isdigit() else 0
        raise AssertionError(f"brick {path} not in the volume's status")

    def rebalance_task_id(self) -> str | None:
        out = gluster("volume", "rebalance", self.name, "status", "--xml", check=False).stdout
        return ET.fromstring(out).findtext("volRebalance/task-id")


@contextlib.contextmanager
def gluster_volume(server: GlusterServer, base: Path, bricks: int = 2) -> Iterator[Volume]:
    name = f"vdsmgl{os.getpid()}x{next(_COUNTER)}"
    base.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(bricks):
        path = base / f"b{index + 1}"
        path.mkdir()
        paths.append(path)
    mount = base / "mnt"
    mount.mkdir()
    volume = Volume(name, server.host, base, paths, mount)
    try:
        gluster("volume", "create", name, *(volume.brick(p) for p in paths), "force")
        gluster("volume", "start", name)
        # glusterd answers "volume start: success" before the bricks listen.
        until(lambda: sh(["mount", "-t", "glusterfs", f"{server.host}:/{name}", str(mount)],
                         check=False).returncode == 0, timeout=20, interval=0.3)
        yield volume
    finally:
        sh(["umount", "-l", str(mount)], check=False)
        _ensure_glusterd(server)
        gluster("volume", "stop", name, "force", check=False)
        gluster("volume", "delete", name, check=False)


def _ensure_glusterd(server: GlusterServer) -> None:
    """A test that killed glusterd and failed before it restarted it: restart it, so the
    volume can be deleted (and the session's later tests find it)."""
    if server.glusterd is not None and server.glusterd.poll() is not None:
        restart_glusterd(server)


def kill_glusterd(server: GlusterServer) -> int:
    """SIGKILL the session's glusterd (only one it started); its PID."""
    proc = server.glusterd
    assert proc is not None
    assert proc.poll() is None
    proc.kill()
    proc.wait(timeout=10)
    return proc.pid


def restart_glusterd(server: GlusterServer) -> None:
    """A new glusterd in place of the killed one; the session's teardown stops it."""
    log = server.brick.parent / "glusterd.log"
    with log.open("ab") as stream:
        proc = subprocess.Popen(["glusterd", "-N", f"--log-file={log}"], stdout=stream,
                                stderr=subprocess.STDOUT)
    server.glusterd = proc
    _wait_glusterd(proc)
