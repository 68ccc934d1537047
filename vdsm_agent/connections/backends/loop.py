"""``loop:///absolute/image.img``: a loop device bound to an image file.

Connect adopts a loop device already bound to the image (agent restart) and
otherwise runs ``losetup -f --show -- IMAGE``. Which device backs which file
comes from sysfs (``/sys/block/loopN/loop/backing_file``), which is also how
the probe notices a device detached behind the agent's back (then reported
broken and bound again). The probe reads 4 KiB of the device with O_DIRECT.
Discovery lists every bound loop device the agent does not manage.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from vdsm_agent import errors
from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import (
    Attachment,
    Backend,
    BackendError,
    Discovered,
    run_checked,
)
from vdsm_agent.connections.probes import ProbeResult, read_direct

_DEVICE = re.compile(r"^/dev/(loop[0-9]+)$")
_DELETED = " (deleted)"


@dataclasses.dataclass(frozen=True)
class LoopEndpoint(uris.Endpoint):
    image: str


def _loop_number(name: str) -> int:
    digits = name[4:]
    return int(digits) if digits.isdigit() else -1


def bound_loop_devices(sysfs_root: Path) -> dict[str, str]:
    """``{"/dev/loopN": backing file}`` for every bound loop device, in order."""
    found: dict[str, str] = {}
    try:
        names = sorted((p.name for p in (sysfs_root / "block").iterdir()
                        if p.name.startswith("loop")), key=_loop_number)
    except OSError:
        return found
    for name in names:
        try:
            backing = (sysfs_root / "block" / name / "loop" / "backing_file").read_text()
        except OSError:
            continue  # not bound
        found[f"/dev/{name}"] = backing.rstrip("\n")
    return found


class LoopBackend(Backend[LoopEndpoint]):
    scheme = "loop"

    def parse(self, uri: str) -> LoopEndpoint:
        parts = uris.split(uri, authority=False)
        image = uris.absolute_path(uri, parts.path, "image")
        if image == "/":
            raise uris.invalid(uri, "image", "the image must be a file")
        canonical = "loop://" + uris.quote_path(image)
        return LoopEndpoint(scheme=self.scheme, uri=canonical, key=canonical, image=image)

    def authorize(self, endpoint: LoopEndpoint) -> None:
        """The image must be a file under an allowed root (symlinks and .. resolved)."""
        real = os.path.realpath(endpoint.image)
        roots = [os.path.realpath(root) for root in self.context.allowed_roots]
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
            raise errors.PathNotAllowed(
                f"{endpoint.image} is not under an allowed root "
                f"(configured: {', '.join(roots) or 'none'})",
                field="uri", path=endpoint.image)

    def _backing_file(self, device: str) -> str | None:
        match = _DEVICE.match(device)
        if match is None:
            return None
        path = self.context.sysfs_root / "block" / match.group(1) / "loop" / "backing_file"
        try:
            return path.read_text().rstrip("\n")
        except OSError:
            return None

    def _device_for(self, image: str) -> str | None:
        for device, backing in bound_loop_devices(self.context.sysfs_root).items():
            if backing == image:
                return device
        return None

    async def connect(self, endpoint: LoopEndpoint) -> Attachment:
        device = self._device_for(endpoint.image)
        if device is not None:
            return Attachment(identity=device, adopted=True, device=device)
        try:
            result = await run_checked(self.context,
                                       ["losetup", "-f", "--show", "--", endpoint.image],
                                       self.context.connect_timeout, "LosetupFailed")
        except BackendError as exc:
            if "No such file" in exc.message:
                raise BackendError("ENOENT", exc.message) from None
            raise
        device = result.stdout.strip()
        if not _DEVICE.match(device):
            raise BackendError("LosetupFailed", f"losetup printed {device[:80]!r}, "
                                                "not a loop device")
        return Attachment(identity=device, device=device)

    async def disconnect(self, endpoint: LoopEndpoint, attachment: Attachment | None) -> None:
        device = attachment.device if attachment is not None else None
        # Only detach a device still bound to our image: the number may have
        # been reused by someone else after it was detached behind our back.
        if device is None or self._backing_file(device) != endpoint.image:
            device = self._device_for(endpoint.image)
        if device is None:
            return
        await run_checked(self.context, ["losetup", "-d", device],
                          self.context.disconnect_timeout, "LosetupFailed")

    def probe(self, endpoint: LoopEndpoint, attachment: Attachment) -> ProbeResult:
        device = attachment.device or ""
        backing = self._backing_file(device)
        if backing is None:
            return ProbeResult.failure("Detached", f"{device} is not bound any more",
                                       broken=True)
        if backing != endpoint.image:
            if backing == endpoint.image + _DELETED:
                return ProbeResult.failure("ENOENT", f"the image behind {device} was deleted")
            return ProbeResult.failure("Detached", f"{device} is now bound to another file",
                                       broken=True)
        match = _DEVICE.match(device)
        assert match is not None
        try:
            mode = read_direct(str(self.context.dev_root / match.group(1)))
        except OSError as exc:
            return ProbeResult.from_oserror(exc, f"read {device}")
        return ProbeResult.success(probeRead=mode)

    def describe(self, endpoint: LoopEndpoint, attachment: Attachment | None) -> dict[str, Any]:
        return {"image": endpoint.image,
                "device": attachment.device if attachment is not None else None}

    def discover(self) -> list[Discovered]:
        found = []
        for device, backing in bound_loop_devices(self.context.sysfs_root).items():
            deleted = backing.endswith(_DELETED)
            image = backing[:-len(_DELETED)] if deleted else backing
            found.append(Discovered(identity=device, uri="loop://" + uris.quote_path(image),
                                    info={"device": device, "image": image,
                                          "imageDeleted": deleted}))
        return found
