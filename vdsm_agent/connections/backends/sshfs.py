"""``sshfs://user@host[:port]/path``: a FUSE mount over SSH.

``sshfs -o reconnect,ServerAlive...,ConnectTimeout=...,BatchMode=yes,
IdentityFile=<sshfs_identity_file>,StrictHostKeyChecking=<setting>
[,UserKnownHostsFile=<setting>] -p PORT user@host:/path MOUNT_POINT``.

``reconnect`` makes sshfs open a new SSH session on the next access after the
old one died; ``ServerAliveInterval`` x ``ServerAliveCountMax`` bounds how long
an operation hangs on a frozen session, and ``ConnectTimeout`` how long a
reconnect hangs on a frozen listener. ``BatchMode`` because nobody can type a
password to a daemon. The key and the host-key policy come from the settings,
never from the URI. A killed sshfs leaves a mount answering ENOTCONN: the
probe finds no daemon and the monitor mounts again.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import Attachment, BackendError
from vdsm_agent.connections.backends.mounts import MountBackend, MountEndpoint
from vdsm_agent.connections.backends.needs import Needs

DEFAULT_PORT = 22
SERVER_ALIVE_INTERVAL = 5
SERVER_ALIVE_COUNT_MAX = 3
CONNECT_TIMEOUT = 10
HOST_KEY_POLICIES = ("yes", "accept-new", "no")

# POSIX-ish user names; no leading "-" so it cannot become an ssh option.
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
# A value inside "-o a=b,c=d": no comma, no whitespace or control characters.
_OPTION_VALUE = re.compile(r"^/[^\x00-\x20\x7f,]*$")
# "user@host:path" or "user@[v6]:path" as the mount table shows it.
_SOURCE = re.compile(r"^([^@/]+@(?:\[[^\]]+\]|[^:/]+)):(.*)$")


@dataclasses.dataclass(frozen=True)
class SshfsEndpoint(MountEndpoint):
    user: str
    host: str
    port: int
    path: str


class SshfsBackend(MountBackend[SshfsEndpoint]):
    scheme = "sshfs"
    needs = Needs(programs=("sshfs",), filesystems=("fuse",))
    fstypes = frozenset({"fuse.sshfs"})
    fuse = True

    def parse(self, uri: str) -> SshfsEndpoint:
        parts = uris.split(uri, userinfo=True)
        user, host, port = uris.authority(uri, parts)
        if user is None or not _USER.match(user):
            raise uris.invalid(uri, "user", "a user name is required (user@host), letters, "
                                            "digits, '_', '.', '-', not starting with '-'")
        path = uris.absolute_path(uri, parts.path)
        port = port or DEFAULT_PORT
        netloc = f"{user}@{host}" + (f":{port}" if port != DEFAULT_PORT else "")
        location = netloc + uris.quote_path(path)
        self.check_name(uri, location)
        return SshfsEndpoint(scheme=self.scheme, uri=f"sshfs://{location}",
                             key=f"sshfs://{location}", location=location,
                             source=f"{user}@{host}:{path}", user=user, host=host,
                             port=port, path=path)

    def config_problem(self) -> str | None:
        """Why the sshfs settings cannot be put on a command line, if they cannot."""
        context = self.context
        for name, value in (("sshfs_identity_file", context.sshfs_identity_file),
                            ("sshfs_known_hosts_file", context.sshfs_known_hosts_file)):
            if value and not _OPTION_VALUE.match(value):
                return f"setting {name} must be an absolute path without commas or spaces"
        if context.sshfs_host_key_checking not in HOST_KEY_POLICIES:
            return f"setting sshfs_host_key_checking must be one of {HOST_KEY_POLICIES}"
        return None

    def ssh_options(self) -> list[str]:
        context = self.context
        options = ["reconnect", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
                   f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}",
                   f"ConnectTimeout={CONNECT_TIMEOUT}", "BatchMode=yes"]
        if context.sshfs_identity_file:
            options.append(f"IdentityFile={context.sshfs_identity_file}")
        options.append(f"StrictHostKeyChecking={context.sshfs_host_key_checking}")
        if context.sshfs_known_hosts_file:
            options.append(f"UserKnownHostsFile={context.sshfs_known_hosts_file}")
        return options

    async def connect(self, endpoint: SshfsEndpoint) -> Attachment:
        problem = self.config_problem()
        if problem is not None:
            raise BackendError("ConfigInvalid", problem)
        return await super().connect(endpoint)

    def mount_argv(self, endpoint: SshfsEndpoint, mount_point: str) -> list[str]:
        return ["sshfs", "-o", ",".join(self.ssh_options()), "-p", str(endpoint.port),
                endpoint.source, mount_point]

    def uri_from_source(self, source: str) -> str | None:
        # The mount table does not say which port was used: the URI has none.
        match = _SOURCE.match(source)
        if match is None:
            return None
        remote, path = match.groups()
        return f"sshfs://{remote}{uris.quote_path(path if path.startswith('/') else '/' + path)}"

    def extra_info(self, endpoint: SshfsEndpoint) -> dict[str, Any]:
        return {"user": endpoint.user, "host": endpoint.host, "port": endpoint.port,
                "path": endpoint.path}
