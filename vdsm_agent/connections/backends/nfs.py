"""``nfs://server/export/path?version=4.1&options=...``: a kernel NFS mount.

The timeout budget follows VDSM: ``soft,nosharecache,timeo=100,retrans=3`` —
a request is retried at about 10, 30 and 60 s and fails after about a minute
(``timeo`` is in deciseconds and must not go below sanlock's 10 s I/O
timeout), instead of the kernel default ``hard`` that blocks forever.
``nosharecache`` lets the same export be mounted twice with different
options. NFSv3 (and "auto", which may negotiate v3) gets ``nolock`` unless
the URI asks for ``lock``: remote v3 locks break HA failover (VDSM, BZ
1550127).

Query parameters: ``version`` (3, 4, 4.0, 4.1, 4.2, auto; default auto) and
``options``, a comma-separated list from an allowlist (e.g.
``hard,nconnect=4``); a given option replaces the default it conflicts with
(``hard`` replaces ``soft``). The target key is the canonical URI, query
included: the same export with other options is another mount.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import Any

from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.mounts import MountBackend, MountEndpoint
from vdsm_agent.connections.backends.needs import Needs

DEFAULT_OPTIONS = ("soft", "nosharecache", "timeo=100", "retrans=3")
VERSIONS = ("3", "4", "4.0", "4.1", "4.2", "auto")

# Options a caller may set, and what their value must look like (None: a flag).
_NUMBER = re.compile(r"^[0-9]{1,7}$")
_ALLOWED: dict[str, re.Pattern[str] | None] = {
    **{flag: None for flag in (
        "soft", "hard", "softerr", "lock", "nolock", "ro", "rw", "sharecache",
        "nosharecache", "ac", "noac", "cto", "nocto", "atime", "noatime", "relatime",
        "diratime", "nodiratime", "softreval", "nosoftreval", "exec", "noexec", "suid",
        "nosuid", "dev", "nodev", "fsc", "nofsc", "resvport", "noresvport")},
    **{number: _NUMBER for number in (
        "timeo", "retrans", "rsize", "wsize", "actimeo", "acregmin", "acregmax",
        "acdirmin", "acdirmax", "port", "mountport", "retry")},
    "nconnect": re.compile(r"^(?:[1-9]|1[0-6])$"),
    "proto": re.compile(r"^(?:tcp|tcp6|rdma|rdma6)$"),
    "sec": re.compile(r"^(?:sys|krb5|krb5i|krb5p|none)(?::(?:sys|krb5|krb5i|krb5p|none))*$"),
    "lookupcache": re.compile(r"^(?:all|none|pos|positive)$"),
    "local_lock": re.compile(r"^(?:all|flock|posix|none)$"),
}
# Setting one of these removes the others (e.g. "hard" removes the default "soft").
_EXCLUSIVE = [{"soft", "hard", "softerr"}, {"lock", "nolock"}, {"ro", "rw"},
              {"sharecache", "nosharecache"}, {"ac", "noac"}, {"cto", "nocto"},
              {"atime", "noatime", "relatime"}, {"diratime", "nodiratime"},
              {"softreval", "nosoftreval"}, {"exec", "noexec"}, {"suid", "nosuid"},
              {"dev", "nodev"}, {"fsc", "nofsc"}, {"resvport", "noresvport"}]


@dataclasses.dataclass(frozen=True)
class NfsEndpoint(MountEndpoint):
    server: str
    export: str
    version: str
    mount_options: tuple[str, ...]


def _parse_option(uri: str, item: str) -> tuple[str, str | None]:
    name, sep, value = item.partition("=")
    if name not in _ALLOWED:
        raise uris.invalid(uri, "query", f"NFS mount option {name[:32]!r} is not allowed; "
                                         f"allowed: {', '.join(sorted(_ALLOWED))}")
    pattern = _ALLOWED[name]
    if pattern is None and sep:
        raise uris.invalid(uri, "query", f"NFS mount option {name!r} takes no value")
    if pattern is not None and not pattern.match(value):
        raise uris.invalid(uri, "query", f"bad value for NFS mount option {name!r}")
    return name, value if sep else None


def mount_options(uri: str, version: str, options: str) -> tuple[str, ...]:
    """The final ``-o`` list: defaults, then the URI's options, then version."""
    chosen: dict[str, str | None] = dict(_parse_option(uri, o) for o in DEFAULT_OPTIONS)
    items = [item for item in options.split(",")] if options else []
    for item in items:
        if not item:
            raise uris.invalid(uri, "query", "empty NFS mount option")
        name, value = _parse_option(uri, item)
        for group in _EXCLUSIVE:
            if name in group:
                for other in group - {name}:
                    chosen.pop(other, None)
        chosen[name] = value
    if version != "auto":
        chosen["vers"] = version
    if version in ("3", "auto") and "lock" not in chosen:
        chosen.setdefault("nolock", None)
    return tuple(name if value is None else f"{name}={value}" for name, value in chosen.items())


class NfsBackend(MountBackend[NfsEndpoint]):
    scheme = "nfs"
    needs = Needs(programs=("mount.nfs",), filesystems=("nfs",))
    fstypes = frozenset({"nfs", "nfs4"})

    def parse(self, uri: str) -> NfsEndpoint:
        parts = uris.split(uri, query=True)
        _, server, port = uris.authority(uri, parts)
        if port is not None:
            raise uris.invalid(uri, "port", "give the NFS port as options=port=N")
        export = uris.absolute_path(uri, parts.path, "export")
        query = uris.query_params(uri, parts.query, ("version", "options"))
        version = query.get("version", "auto")
        if version not in VERSIONS:
            raise uris.invalid(uri, "query", f"version must be one of {', '.join(VERSIONS)}")
        options = mount_options(uri, version, query.get("options", ""))
        canonical_query = urllib.parse.urlencode(
            [(name, query[name]) for name in ("version", "options") if name in query],
            safe=",=:")
        location = server + uris.quote_path(export) + (
            f"?{canonical_query}" if canonical_query else "")
        self.check_name(uri, location)
        return NfsEndpoint(scheme=self.scheme, uri=f"nfs://{location}", key=f"nfs://{location}",
                           location=location, source=f"{server}:{export}", server=server,
                           export=export, version=version, mount_options=options)

    def mount_argv(self, endpoint: NfsEndpoint, mount_point: str) -> list[str]:
        return ["mount", "-t", "nfs", "-o", ",".join(endpoint.mount_options),
                endpoint.source, mount_point]

    def uri_from_source(self, source: str) -> str | None:
        server, sep, export = source.rpartition(":/")
        if not sep or not server:
            return None
        return f"nfs://{server}{uris.quote_path('/' + export)}"

    def extra_info(self, endpoint: NfsEndpoint) -> dict[str, Any]:
        return {"server": endpoint.server, "export": endpoint.export,
                "version": endpoint.version, "mountOptions": list(endpoint.mount_options)}
