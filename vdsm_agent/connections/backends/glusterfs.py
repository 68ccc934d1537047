"""``glusterfs://server/volume``: a GlusterFS FUSE mount (``mount -t glusterfs``).

The client daemon (``glusterfs --process-name fuse``) keeps reconnecting to
the bricks by itself; while bricks are down every operation fails with
ENOTCONN and the mount recovers on its own when they are back (open files
included). Only a dead client daemon makes the mount broken (see
``mounts``). The client's own ``network.ping-timeout`` (a volume option, 42 s
by default) bounds how long an operation hangs on a frozen brick.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.mounts import MountBackend, MountEndpoint
from vdsm_agent.connections.backends.needs import Needs

# GlusterFS volume names: letters, digits, "-" and "_"; we refuse a leading "-".
_VOLUME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class GlusterEndpoint(MountEndpoint):
    server: str
    volume: str


class GlusterfsBackend(MountBackend[GlusterEndpoint]):
    scheme = "glusterfs"
    needs = Needs(programs=("mount.glusterfs",), filesystems=("fuse",))
    fstypes = frozenset({"fuse.glusterfs"})
    fuse = True

    def parse(self, uri: str) -> GlusterEndpoint:
        parts = uris.split(uri)
        _, server, port = uris.authority(uri, parts)
        if port is not None:
            raise uris.invalid(uri, "port", "glusterfs URIs take no port")
        volume = parts.path[1:] if parts.path.startswith("/") else ""
        if not _VOLUME.match(volume):
            raise uris.invalid(uri, "volume", "the volume name must be letters, digits, "
                                              "'-' and '_', not starting with '-'")
        location = f"{server}/{volume}"
        self.check_name(uri, location)
        return GlusterEndpoint(scheme=self.scheme, uri=f"glusterfs://{location}",
                               key=f"glusterfs://{location}", location=location,
                               source=f"{server}:/{volume}", server=server, volume=volume)

    def mount_argv(self, endpoint: GlusterEndpoint, mount_point: str) -> list[str]:
        return ["mount", "-t", "glusterfs", endpoint.source, mount_point]

    def uri_from_source(self, source: str) -> str | None:
        server, sep, volume = source.rpartition(":/")
        if not sep or not server or not volume:
            return None
        return f"glusterfs://{server}/{volume}"

    def extra_info(self, endpoint: GlusterEndpoint) -> dict[str, Any]:
        return {"server": endpoint.server, "volume": endpoint.volume}
