"""``file:///absolute/dir``: a local directory (VDSM's localfs).

Nothing is attached: the directory must exist. The probe is the mount probe
(statvfs plus a direct read of a file in the directory), so a directory that
lives on a mount the agent does not manage is still watched without blocking
anything. A missing directory (``ENOENT``; a file in its place is ``ENOTDIR``)
is a broken connection, retried with backoff until it appears. Disconnect does
nothing; discovery finds nothing (a local directory is not a connection on the
host).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import Attachment, Backend
from vdsm_agent.connections.probes import FileChoice, ProbeResult, probe_directory


@dataclasses.dataclass(frozen=True)
class FileEndpoint(uris.Endpoint):
    path: str


class FileBackend(Backend[FileEndpoint]):
    scheme = "file"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._files = FileChoice()

    def parse(self, uri: str) -> FileEndpoint:
        parts = uris.split(uri, authority=False)
        path = uris.absolute_path(uri, parts.path)
        canonical = "file://" + uris.quote_path(path)
        return FileEndpoint(scheme=self.scheme, uri=canonical, key=canonical, path=path)

    async def connect(self, endpoint: FileEndpoint) -> Attachment:
        # Checking the directory could block if it sits on a hung mount: the
        # probe that follows every connect does it on the probe pool.
        return Attachment(identity=endpoint.path)

    async def disconnect(self, endpoint: FileEndpoint, attachment: Attachment | None) -> None:
        self._files.forget(endpoint.path)

    def probe(self, endpoint: FileEndpoint, attachment: Attachment) -> ProbeResult:
        try:
            info = os.stat(endpoint.path)
        except FileNotFoundError:
            return ProbeResult.failure("ENOENT", f"{endpoint.path} does not exist", broken=True)
        except OSError as exc:
            return ProbeResult.from_oserror(exc, f"stat {endpoint.path}")
        if not stat.S_ISDIR(info.st_mode):
            return ProbeResult.failure("ENOTDIR", f"{endpoint.path} is not a directory",
                                       broken=True)
        return probe_directory(endpoint.path, self._files)

    def describe(self, endpoint: FileEndpoint, attachment: Attachment | None) -> dict[str, Any]:
        return {"path": endpoint.path}
