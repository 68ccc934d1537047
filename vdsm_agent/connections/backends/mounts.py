"""What the mount-based backends (nfs, glusterfs, sshfs) share.

Mount points are ``MOUNT_ROOT/<scheme>/<name>`` with ``<name>`` from
``uri.encode_name``, so two targets never share a mount point and a mount
point found under the root (e.g. a leftover after a failed unmount) maps back
to exactly one URI. Whether something is mounted is read from
``/proc/self/mountinfo`` (``system.mountinfo``), which never touches the
server, so checking a mount of a dead server cannot hang.

Connect adopts an existing mount at the mount point (agent restart) and only
mounts otherwise. Disconnect is ``umount`` with a short timeout, then ``umount
-f -l`` (the VDSM way out of a hung server), then ``rmdir``. A FUSE mount
whose daemon died answers ENOTCONN forever: the probe checks whether a
process still serves the mount point and, if none does, reports the mount
broken so the monitor unmounts it lazily and mounts again. A GlusterFS client
whose bricks are down answers ENOTCONN too, but its daemon is alive and
reconnects by itself (open files survive), so it is left alone.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import (
    Attachment,
    Backend,
    BackendError,
    Discovered,
    describe_failure,
    run_checked,
)
from vdsm_agent.connections.probes import FileChoice, ProbeResult, probe_directory
from vdsm_agent.system import commands, mountinfo
from vdsm_agent.system.mountinfo import MountEntry

log = logging.getLogger(__name__)


def fuse_daemon_alive(proc_root: Path, mount_point: str) -> bool:
    """Whether a live process has ``mount_point`` among its arguments.

    Both glusterfs and sshfs daemons keep the mount point in their command
    line; a zombie's command line is empty. Only called after a probe failed.
    """
    wanted = mount_point.encode()
    try:
        pids = [entry for entry in os.listdir(proc_root) if entry.isdigit()]
    except OSError:
        return True  # cannot tell: do not tear a mount down on a guess
    for pid in pids:
        try:
            argv = (proc_root / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class MountEndpoint(uris.Endpoint):
    location: str  # the canonical URI without "scheme://": names the mount point
    source: str  # what mount(8) is given, e.g. "server:/export"


ME = TypeVar("ME", bound=MountEndpoint)


class MountBackend(Backend[ME]):
    """A target that is a mount under the mount root."""

    fstypes: ClassVar[frozenset[str]]
    fuse: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._files = FileChoice()

    @abc.abstractmethod
    def mount_argv(self, endpoint: ME, mount_point: str) -> list[str]:
        """The command that mounts ``endpoint`` at ``mount_point``."""

    @abc.abstractmethod
    def uri_from_source(self, source: str) -> str | None:
        """A URI for a foreign mount of this type, from its mount source."""

    def extra_info(self, endpoint: ME) -> dict[str, Any]:
        return {}

    # -- names ---------------------------------------------------------------------

    @property
    def scheme_root(self) -> Path:
        return self.context.mount_root / self.scheme

    def mount_point(self, endpoint: ME) -> str:
        return str(self.scheme_root / uris.encode_name(endpoint.location))

    def check_name(self, uri: str, location: str) -> None:
        uris.check_name_length(uri, uris.encode_name(location))

    # -- connect / disconnect ----------------------------------------------------------

    def _mounted(self, mount_point: str) -> MountEntry | None:
        return mountinfo.find(mount_point, self.context.mountinfo)

    async def connect(self, endpoint: ME) -> Attachment:
        mount_point = self.mount_point(endpoint)
        entry = self._mounted(mount_point)
        if entry is not None:
            if entry.fstype not in self.fstypes:
                raise BackendError("MountPointBusy", f"{mount_point} holds a {entry.fstype} "
                                                     f"mount of {entry.source}")
            return Attachment(identity=mount_point, adopted=True)
        os.makedirs(mount_point, mode=0o755, exist_ok=True)
        try:
            await run_checked(self.context, self.mount_argv(endpoint, mount_point),
                              self.context.connect_timeout, "MountFailed")
            if self._mounted(mount_point) is None:
                raise BackendError("MountFailed", f"mount returned 0 but {mount_point} "
                                                  "is not in the mount table")
        except BackendError:
            await self._clean_up_failed_mount(mount_point)
            raise
        return Attachment(identity=mount_point)

    async def _clean_up_failed_mount(self, mount_point: str) -> None:
        # A mount killed at its timeout may still have mounted: take it away so
        # the next attempt starts clean, then drop the directory.
        if self._mounted(mount_point) is not None:
            await self._lazy_unmount(mount_point)
        _remove_dir(mount_point)

    async def disconnect(self, endpoint: ME, attachment: Attachment | None) -> None:
        mount_point = self.mount_point(endpoint)
        if self._mounted(mount_point) is not None:
            await self._unmount(mount_point)
        _remove_dir(mount_point)

    async def _unmount(self, mount_point: str) -> None:
        try:
            result = await self.context.runner.run(["umount", mount_point],
                                                   self.context.disconnect_timeout)
            if result.ok:
                return
            log.warning("umount %s failed (%s); trying umount -f -l", mount_point,
                        describe_failure(result))
        except commands.CommandError as exc:
            log.warning("umount %s failed (%s); trying umount -f -l", mount_point, exc)
        await self._lazy_unmount(mount_point)

    async def _lazy_unmount(self, mount_point: str) -> None:
        await run_checked(self.context, ["umount", "-f", "-l", mount_point],
                          self.context.disconnect_timeout, "UmountFailed")

    async def repair(self, endpoint: ME, attachment: Attachment | None,
                     failure: ProbeResult) -> Attachment:
        mount_point = self.mount_point(endpoint)
        if self._mounted(mount_point) is not None:
            if not failure.broken:
                # Mounted and served: the client reconnects by itself (or the
                # server is down and a remount would not help). Nothing to do.
                return attachment or Attachment(identity=mount_point, adopted=True)
            log.info("%s is broken (%s): unmounting lazily to mount again",
                     mount_point, failure.code)
            await self._lazy_unmount(mount_point)
        self._files.forget(mount_point)
        return await self.connect(endpoint)

    # -- probe / describe / discover ----------------------------------------------------

    def probe(self, endpoint: ME, attachment: Attachment) -> ProbeResult:
        mount_point = self.mount_point(endpoint)
        if self._mounted(mount_point) is None:
            return ProbeResult.failure("NotMounted", f"{mount_point} is not mounted",
                                       broken=True)
        result = probe_directory(mount_point, self._files)
        if result.ok or not self._is_broken(result, mount_point):
            return result
        return dataclasses.replace(result, broken=True,
                                   message=result.message + self._broken_reason())

    def _is_broken(self, result: ProbeResult, mount_point: str) -> bool:
        if result.code == errno.errorcode[errno.ESTALE]:
            return True
        if self.fuse and result.code == errno.errorcode[errno.ENOTCONN]:
            return not fuse_daemon_alive(self.context.proc_root, mount_point)
        return False

    def _broken_reason(self) -> str:
        return " (FUSE daemon gone)" if self.fuse else " (stale mount)"

    def describe(self, endpoint: ME, attachment: Attachment | None) -> dict[str, Any]:
        return {"mountPoint": self.mount_point(endpoint), "source": endpoint.source,
                **self.extra_info(endpoint)}

    def discover(self) -> list[Discovered]:
        found = []
        for entry in mountinfo.read(self.context.mountinfo):
            if entry.fstype not in self.fstypes:
                continue
            uri = self._uri_of(entry)
            if uri is None:
                continue
            found.append(Discovered(
                identity=entry.mount_point, uri=uri,
                info={"mountPoint": entry.mount_point, "source": entry.source,
                      "fstype": entry.fstype}))
        return found

    def _uri_of(self, entry: MountEntry) -> str | None:
        mount_point = Path(entry.mount_point)
        if mount_point.parent == self.scheme_root:
            # One of ours (a leftover): the name says exactly which target.
            return f"{self.scheme}://{uris.decode_name(mount_point.name)}"
        return self.uri_from_source(entry.source)


def _remove_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove mount point %s: %s", path, exc.strerror)
