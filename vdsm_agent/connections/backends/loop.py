"""``loop:///absolute/image.img``: a loop device bound to an image file.

The image is a caller's path, so it is resolved once, to a descriptor, beneath
its allowed root (``system.confine``: no symlink, no ``..``, no other mount,
no hard-linked file), and the loop device is bound to that descriptor by the
kernel's ioctls (``system.loopdev``), never by name: ``losetup`` opens the
name it is given, and so would follow a symlink swapped in after the check.

* Connect resolves the image in a worker thread and adopts a loop device the
  kernel reports bound to the same file (``LOOP_GET_STATUS64``: st_dev and
  st_ino, not the name: an agent restart), or binds a free one to the
  descriptor. The attachment records the device and that identity.
* Disconnect detaches exactly that device, and only while it is still bound
  to that file (a number detached behind our back may be somebody else's
  now). It waits for the detach to happen: a device held open (mounted, or a
  reader) is not detached, and disconnect fails with ``DeviceBusy``.
* The probe checks the device is still bound to that file (else ``Detached``,
  broken: bound again), then reads 4 KiB of it with O_DIRECT.
* Discovery lists every bound loop device the agent does not manage (sysfs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import Any

from vdsm_agent import errors
from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import (
    Attachment,
    Backend,
    BackendError,
    Discovered,
)
from vdsm_agent.connections.backends.needs import Needs
from vdsm_agent.connections.probes import ProbeResult, read_direct
from vdsm_agent.system import confine, loopdev

log = logging.getLogger(__name__)

_DELETED = " (deleted)"
FIELD = "uri"
# How long a disconnect waits for a device somebody else holds open to be
# released (udev's blkid closes within milliseconds; a mount never does).
BUSY_WAIT = 1.0


@dataclasses.dataclass(frozen=True)
class LoopEndpoint(uris.Endpoint):
    image: str


def backing_name(sysfs_root: Path, number: int) -> str | None:
    """The kernel's name of the file behind loopN (sysfs ``backing_file``): informative
    only, it follows renames and gains `` (deleted)`` when the file is unlinked."""
    path = sysfs_root / "block" / f"loop{number}" / "loop" / "backing_file"
    try:
        return path.read_text().rstrip("\n")
    except OSError:
        return None  # not bound (any more)


def bound_loop_devices(sysfs_root: Path) -> dict[str, str]:
    """``{"/dev/loopN": backing file name}`` for every bound loop device, in order."""
    found: dict[str, str] = {}
    for number in loopdev.bound_numbers(sysfs_root):
        name = backing_name(sysfs_root, number)
        if name is not None:
            found[f"/dev/loop{number}"] = name
    return found


def _refused(exc: errors.RpcError) -> BackendError:
    """A connect-time refusal of the image, as a connection error code."""
    if isinstance(exc, errors.PathNotAllowed):
        return BackendError("PathNotAllowed", exc.detail)
    if exc.data.get("rule") == "exists":
        return BackendError("ENOENT", exc.detail)  # retried: the image may appear
    return BackendError("InvalidImage", exc.detail)


def _open_image(image: confine.Resolved) -> tuple[int, bool]:
    """A read-write descriptor of the resolved image (read-only where it cannot be
    written, as losetup does); and whether it is read-only."""
    try:
        return image.reopen(os.O_RDWR), False
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    return image.reopen(os.O_RDONLY), True


class LoopBackend(Backend[LoopEndpoint]):
    scheme = "loop"
    needs = Needs(files=("/dev/loop-control",))

    def parse(self, uri: str) -> LoopEndpoint:
        parts = uris.split(uri, authority=False)
        image = uris.absolute_path(uri, parts.path, "image")
        if image == "/":
            raise uris.invalid(uri, "image", "the image must be a file")
        canonical = "loop://" + uris.quote_path(image)
        return LoopEndpoint(scheme=self.scheme, uri=canonical, key=canonical, image=image)

    def authorize(self, endpoint: LoopEndpoint) -> None:
        """The image must be a regular file beneath an allowed root (no symlink, no
        ``..``, no other mount, one hard link). One that does not exist yet is
        accepted: connect resolves it again, and retries until it appears."""
        try:
            confine.resolve_file(endpoint.image, self.context.allowed_roots, FIELD).close()
        except errors.InvalidParams as exc:
            if exc.data.get("rule") != "exists":
                raise

    # -- connect ----------------------------------------------------------------------

    async def connect(self, endpoint: LoopEndpoint) -> Attachment:
        work = asyncio.ensure_future(asyncio.to_thread(self._bind, endpoint))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # An unmanage (or shutdown) stopped the monitor during the bind, which a
            # thread cannot abandon half-way: let it finish and undo what it bound,
            # or the device would be left bound with no attachment naming it.
            await self._undo(work)
            raise

    async def _undo(self, work: asyncio.Future[Attachment]) -> None:
        try:
            attachment = await work
        except Exception:
            return  # nothing was bound
        if not attachment.adopted:
            try:
                await asyncio.to_thread(self._unbind, attachment)
            except BackendError as exc:
                log.warning("loop: a cancelled connect left %s bound: %s", attachment.device,
                            exc.message)

    def _bind(self, endpoint: LoopEndpoint) -> Attachment:
        """Blocking: resolve the image, adopt its loop device or bind one to it."""
        try:
            image = confine.resolve_file(endpoint.image, self.context.allowed_roots, FIELD)
        except (errors.InvalidParams, errors.PathNotAllowed) as exc:
            raise _refused(exc) from None
        with image:
            backing = loopdev.Backing.of(image.info)
            for number, current in loopdev.bound(self.context.sysfs_root,
                                                 self.context.dev_root).items():
                # A device on a slice of the file (losetup -o/--sizelimit) is not the image.
                if current.backing == backing and current.whole:
                    return self._attachment(number, backing, adopted=True)
            try:
                fd, read_only = _open_image(image)
                try:
                    number = loopdev.attach(fd, read_only=read_only, file_name=image.path,
                                            dev_root=self.context.dev_root)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise BackendError("LosetupFailed", f"cannot bind a loop device to "
                                   f"{endpoint.image}: {exc.strerror or exc}") from None
        return self._attachment(number, backing, adopted=False)

    def _attachment(self, number: int, backing: loopdev.Backing, adopted: bool) -> Attachment:
        device = f"/dev/loop{number}"
        return Attachment(identity=device, adopted=adopted, device=device,
                          info={"backing": backing.identity,
                                "name": backing_name(self.context.sysfs_root, number) or ""})

    async def repair(self, endpoint: LoopEndpoint, attachment: Attachment | None,
                     failure: ProbeResult) -> Attachment:
        """Connect again; a device still bound to the file the connection had before
        (the image was deleted or replaced since) is detached, not left behind."""
        repaired = await self.connect(endpoint)
        if attachment is not None and attachment.info.get("backing") != repaired.info.get(
                "backing"):
            try:
                await asyncio.to_thread(self._unbind, attachment)
            except BackendError as exc:
                log.warning("loop: %s, bound to the image's previous file, is left bound: %s",
                            attachment.device, exc.message)
        return repaired

    # -- disconnect -------------------------------------------------------------------

    async def disconnect(self, endpoint: LoopEndpoint, attachment: Attachment | None) -> None:
        # Only what this connection bound or adopted: a connect that failed or was
        # cancelled left nothing bound (see connect), and a device bound to the
        # image by somebody else is theirs.
        if attachment is not None:
            await asyncio.to_thread(self._unbind, attachment)

    def _unbind(self, attachment: Attachment) -> None:
        """Blocking: detach the attachment's device if it is still bound to its file."""
        device = attachment.device or ""
        number = loopdev.number_of(device)
        backing = loopdev.Backing.parse(str(attachment.info.get("backing", "")))
        if number is None or backing is None:
            raise BackendError("LosetupFailed", f"{device!r} is not a loop device bound "
                                                "by this agent")
        wait = min(BUSY_WAIT, self.context.disconnect_timeout)
        try:
            detached = loopdev.detach(number, backing, wait=wait, dev_root=self.context.dev_root)
        except OSError as exc:
            raise BackendError("LosetupFailed", f"cannot detach {device}: "
                                                f"{exc.strerror or exc}") from None
        if not detached:
            raise BackendError("DeviceBusy", f"{device} is held open (mounted or in use): "
                                             f"left bound")

    # -- health -----------------------------------------------------------------------

    def probe(self, endpoint: LoopEndpoint, attachment: Attachment) -> ProbeResult:
        device = attachment.device or ""
        number = loopdev.number_of(device)
        backing = loopdev.Backing.parse(str(attachment.info.get("backing", "")))
        if number is None or backing is None:
            return ProbeResult.failure("Detached", f"{device!r} is not a loop device bound "
                                                   "by this agent", broken=True)
        current = loopdev.status_of(loopdev.device_path(number, self.context.dev_root))
        if current is None:
            return ProbeResult.failure("Detached", f"{device} is not bound any more",
                                       broken=True)
        if current.backing != backing:
            return ProbeResult.failure("Detached", f"{device} is now bound to another file",
                                       broken=True)
        name = backing_name(self.context.sysfs_root, number) or ""
        if name.endswith(_DELETED) and not str(attachment.info.get("name")).endswith(_DELETED):
            return ProbeResult.failure("ENOENT", f"the image behind {device} was deleted")
        try:
            mode = read_direct(str(loopdev.device_path(number, self.context.dev_root)))
        except OSError as exc:
            return ProbeResult.from_oserror(exc, f"read {device}")
        return ProbeResult.success(probeRead=mode)

    def describe(self, endpoint: LoopEndpoint, attachment: Attachment | None) -> dict[str, Any]:
        return {"image": endpoint.image,
                "device": attachment.device if attachment is not None else None,
                "imageIdentity": (attachment.info.get("backing")
                                  if attachment is not None else None)}

    def discover(self) -> list[Discovered]:
        found = []
        for device, backing in bound_loop_devices(self.context.sysfs_root).items():
            deleted = backing.endswith(_DELETED)
            image = backing[:-len(_DELETED)] if deleted else backing
            found.append(Discovered(identity=device, uri="loop://" + uris.quote_path(image),
                                    info={"device": device, "image": image,
                                          "imageDeleted": deleted}))
        return found
