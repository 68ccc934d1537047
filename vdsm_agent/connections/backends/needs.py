"""What a backend needs of the host, and whether this host has it.

A scheme is served only when its tools and kernel support are here:
``nfs`` needs ``mount.nfs`` and the kernel's ``nfs`` filesystem, ``glusterfs``
``mount.glusterfs`` and ``fuse``, ``sshfs`` the ``sshfs`` program and
``fuse``, ``iscsi`` ``iscsiadm``, ``loop`` ``/dev/loop-control``.
``getCapabilities.uriSchemes`` lists the served ones, and managing a URI of
another is ``UnsupportedScheme`` with the reason (a connection that could
only ever fail with "unknown filesystem type" is refused at once instead).

A kernel filesystem counts when ``/proc/filesystems`` lists it, or when the
kernel can load it: ``modprobe`` is there and ``/lib/modules/$(uname -r)``
has the module (built in, or a ``.ko`` file). Programs are looked up in
``PATH`` and the sbin directories (mount helpers live in ``/sbin``).

The answer is kept for ``TTL`` seconds: ``getCapabilities`` stays a handful
of cheap reads however often it is called, and a package installed meanwhile
is seen within a minute.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

TTL = 30.0
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")


@dataclasses.dataclass(frozen=True)
class Needs:
    """Programs, kernel filesystems and device nodes a backend cannot work without."""

    programs: tuple[str, ...] = ()
    filesystems: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


@dataclasses.dataclass
class HostSupport:
    """Answers "is this need met here?" from the host (paths are parameters for tests)."""

    search_path: str = ""  # empty: $PATH and the sbin directories
    proc_filesystems: Path = Path("/proc/filesystems")
    modules_root: Path = Path("/lib/modules")
    modprobe_setting: Path = Path("/proc/sys/kernel/modprobe")
    clock: float = 0.0  # when the answers below were found
    _answers: dict[Needs, str | None] = dataclasses.field(default_factory=dict)

    def unmet(self, needs: Needs) -> str | None:
        """Why ``needs`` is not met on this host (e.g. "mount.nfs not found"), or None."""
        now = time.monotonic()
        if now - self.clock > TTL:
            self._answers.clear()
            self.clock = now
        if needs not in self._answers:
            self._answers[needs] = self._check(needs)
        return self._answers[needs]

    def _check(self, needs: Needs) -> str | None:
        path = self.search_path or os.pathsep.join(
            [*os.environ.get("PATH", "").split(os.pathsep), *SBIN])
        for program in needs.programs:
            if shutil.which(program, path=path) is None:
                return f"{program} not found (install the package that provides it)"
        for name in needs.filesystems:
            if not self._filesystem(name):
                return (f"the kernel has no {name} filesystem (not in "
                        f"{self.proc_filesystems} and no {name} module to load)")
        for file in needs.files:
            if not os.path.exists(file):
                return f"{file} does not exist"
        return None

    def _filesystem(self, name: str) -> bool:
        try:
            listed = self.proc_filesystems.read_text()
        except OSError:
            listed = ""
        if any(line.split()[-1:] == [name] for line in listed.splitlines()):
            return True
        return self._loadable(name)

    def _loadable(self, name: str) -> bool:
        try:
            modprobe = self.modprobe_setting.read_text().strip() or "/sbin/modprobe"
        except OSError:
            modprobe = "/sbin/modprobe"
        if not os.access(modprobe, os.X_OK):
            return False
        release = self.modules_root / os.uname().release
        try:
            if f"/{name}.ko" in (release / "modules.builtin").read_text():
                return True
        except OSError:
            pass
        return any((release / "kernel" / "fs" / name).glob(f"{name}.ko*"))


class AllServed:
    """For a runner that fakes every tool: every need is met."""

    def unmet(self, needs: Needs) -> str | None:
        return None
