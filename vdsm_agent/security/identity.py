"""Who is calling: one ``Caller`` per connection, found once and cached.

* TLS: the verified client certificate's names (subject CN, then
  subjectAltName DNS, URI and email entries). The identity is the first name.
* Unix socket: the peer's credentials (``SO_PEERCRED``): ``uid:N``.
* Plain TCP (loopback only: the listener refuses anything else at start-up):
  **anonymous**, with ``loopback_role`` when it is set, else ``default_role``.
  Nothing the kernel says of a TCP connection is an attestation: its socket
  table (``/proc/net/tcp``) lists a socket that its owner already closed (an
  orphan in FIN_WAIT2) with uid 0, so a local user who sent an admin call and
  closed the socket at once was sometimes taken for root. Privileged local
  work goes through the Unix socket.
* Anything else (no transport, a peer that cannot be identified): ``unknown``
  with role ``none``.

Identity comes only from the kernel's attestation of a Unix socket peer
(``SO_PEERCRED``) or a verified certificate.

The ``Caller`` is cached per transport (dropped when the transport is
collected), which keeps the hot path at one dictionary lookup. The HTTP layer
puts it in ``CURRENT_CALLER``; the dispatcher and any handler read it there.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import ipaddress
import logging
import pwd
import socket
import struct
import weakref
from typing import Any

from vdsm_agent.security.roles import Role, RolePolicy

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")
ANONYMOUS = "anonymous"


@dataclasses.dataclass(eq=False, slots=True)
class Caller:
    """One connection's caller: identity, how it came, its role, and its calls in flight."""

    identity: str
    transport: str  # "tls", "unix", "tcp", "local" (in-process), "unknown"
    role: Role
    names: tuple[str, ...] = ()
    in_flight: int = 0  # JSON-RPC calls and streams being served (limits.Limiter)

    def __str__(self) -> str:
        return f"{self.transport}:{self.identity}"


CURRENT_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "vdsm_agent_caller", default=None)


def current() -> Caller | None:
    """The caller of the request being served (None outside an HTTP request)."""
    return CURRENT_CALLER.get()


# -- certificates -----------------------------------------------------------------------

_SAN_TYPES = ("DNS", "URI", "email")


def certificate_names(peercert: dict[str, Any] | None) -> tuple[str, ...]:
    """Subject CN(s), then subjectAltName DNS/URI/email entries, without repeats."""
    if not peercert:
        return ()
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str):
                names.append(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in _SAN_TYPES and isinstance(value, str):
            names.append(value)
    seen: set[str] = set()
    unique = []
    for name in names:
        if name not in seen:
            seen.add(name)
            unique.append(name)
    return tuple(unique)


# -- local peers --------------------------------------------------------------------------


def peer_uid_unix(sock: Any) -> int | None:
    """The uid of a Unix socket's peer (``SO_PEERCRED``)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid) if uid >= 0 else None


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# -- the authenticator --------------------------------------------------------------------


class Authenticator:
    """Finds and caches the ``Caller`` of each connection."""

    def __init__(self, policy: RolePolicy) -> None:
        self.policy = policy
        # id(transport) -> Caller; the entry goes when the transport is collected
        # (weakref.finalize), before its id could be reused. A plain dict keyed by
        # an int is the cheapest lookup for the hot path.
        self._cache: dict[int, Caller] = {}

    def cached(self, transport: Any) -> Caller | None:
        return self._cache.get(id(transport))

    async def caller(self, transport: Any) -> Caller:
        """The connection's caller (found on its first request, then cached)."""
        if transport is None:
            return Caller("unknown", "unknown", Role.NONE)
        key = id(transport)
        found = self._cache.get(key)
        if found is None:
            found = await self._identify(transport)
            self._cache[key] = found
            weakref.finalize(transport, self._cache.pop, key, None)
            log.debug("caller %s: role %s%s", found, found.role,
                      f" (names {', '.join(found.names)})" if found.names else "")
        return found

    async def _identify(self, transport: Any) -> Caller:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            return self.tls_caller(ssl_object.getpeercert())
        sock = transport.get_extra_info("socket")
        family = getattr(sock, "family", None)
        if family == socket.AF_UNIX:
            return await asyncio.to_thread(self._unix_caller, sock)
        if family in (socket.AF_INET, socket.AF_INET6):
            peer = transport.get_extra_info("peername")
            if peer and is_loopback(str(peer[0])):
                return self.anonymous_tcp()
        return Caller("unknown", "unknown", Role.NONE)

    def tls_caller(self, peercert: dict[str, Any] | None) -> Caller:
        names = certificate_names(peercert)
        if not names:
            return Caller("unknown", "tls", Role.NONE)
        return Caller(names[0], "tls", self.policy.for_certificate(names), names)

    def _local(self, uid: int | None, transport: str) -> Caller:
        if uid is None:
            return Caller("unknown", transport, Role.NONE)
        user = user_name(uid)
        names = (f"uid:{uid}",) + ((f"user:{user}",) if user else ())
        return Caller(f"uid:{uid}", transport, self.policy.for_uid(uid, user), names)

    def _unix_caller(self, sock: Any) -> Caller:
        return self._local(peer_uid_unix(sock), "unix")

    def anonymous_tcp(self) -> Caller:
        """A loopback TCP caller: nobody in particular (see the module docstring)."""
        role = self.policy.loopback if self.policy.loopback is not None else self.policy.default
        return Caller(ANONYMOUS, "tcp", role)
