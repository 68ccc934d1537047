"""``iscsi://portal[:port]/iqn[/lun]``: an iSCSI session and a LUN's block device.

Connect: ``iscsiadm -m discovery -t sendtargets -p PORTAL`` (under a lock:
iscsiadm's node database does not like concurrent writers), check that the
IQN is offered, then ``iscsiadm -m node -T IQN -p PORTAL --login`` (exit 15,
"session exists", is success; logins are not serialised, an unreachable
portal costs up to the login timeout). Disconnect: ``--logout`` (exit 21, "no
objects found", is success: nothing to log out). Sessions and the LUN's
device come from sysfs (``/sys/class/iscsi_session``,
``/sys/class/iscsi_connection``, ``.../device/target*/H:C:T:LUN/block/sdX``).

The target (the key) is portal + IQN: IDs naming different LUNs of one target
share the session, which is logged out only when the last of them is
unmanaged (the shared-target lesson of kubernetes #74313 and os-brick). A
session is matched by IQN and port, and by address when the URI gives an IP
address (a host name is not resolved on the event loop).

The probe: the session's state must be LOGGED_IN (a session that vanished is
broken and logged in again), then a 4 KiB O_DIRECT read of the LUN's device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import (
    Attachment,
    Backend,
    BackendError,
    Discovered,
    describe_failure,
)
from vdsm_agent.connections.backends.needs import Needs
from vdsm_agent.connections.probes import ProbeResult, read_direct
from vdsm_agent.system import commands
from vdsm_agent.system.commands import CommandResult

DEFAULT_PORT = 3260
MAX_LUN = 16383
SESSION_EXISTS = 15
NO_OBJECTS_FOUND = 21
# How long sysfs may take to show a session (and its LUN) after a login.
SYSFS_WAIT = 5.0
SYSFS_POLL = 0.1

_IQN = re.compile(
    r"^(?:iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[A-Za-z0-9.:_-]+)?"
    r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}(?:[0-9A-Fa-f]{16})?)$")
_LUN = re.compile(r"^[0-9]{1,5}$")

# iscsiadm(8) exit codes, named for lastError.
ISCSIADM_ERRORS = {
    1: "ISCSI_ERR", 2: "SESS_NOT_FOUND", 3: "NOMEM", 4: "TRANS", 5: "LOGIN", 6: "IDBM",
    7: "INVAL", 8: "TRANS_TIMEOUT", 9: "INTERNAL", 10: "LOGOUT", 11: "PDU_TIMEOUT",
    12: "TRANS_NOT_FOUND", 13: "ACCESS", 14: "TRANS_CAPS", 15: "SESS_EXISTS",
    16: "INVALID_MGMT_REQ", 17: "ISNS_UNAVAILABLE", 18: "ISCSID_COMM_ERR",
    19: "FATAL_LOGIN", 20: "ISCSID_NOTCONN", 21: "NO_OBJS_FOUND", 22: "SYSFS_LOOKUP",
    23: "HOST_NOT_FOUND", 24: "LOGIN_AUTH_FAILED", 25: "ISNS_QUERY",
    26: "ISNS_REG_FAILED", 27: "OP_NOT_SUPP", 28: "BUSY", 29: "AGAIN", 30: "UNKNOWN_DISCOVERY_TYPE",
}


@dataclasses.dataclass(frozen=True)
class IscsiEndpoint(uris.Endpoint):
    host: str
    port: int
    iqn: str
    lun: int | None

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Session:
    name: str  # "session3"
    iqn: str
    address: str
    port: int | None
    state: str
    path: Path


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _connection_address(sysfs_root: Path, number: str) -> tuple[str, int | None]:
    for connection in sorted((sysfs_root / "class" / "iscsi_connection").glob(
            f"connection{number}:*")):
        address = _read(connection / "persistent_address") or _read(connection / "address")
        port = _read(connection / "persistent_port") or _read(connection / "port")
        if address:
            return address, int(port) if port and port.isdigit() else None
    return "", None


def read_sessions(sysfs_root: Path) -> list[Session]:
    """Every iSCSI session the kernel knows, from sysfs."""
    base = sysfs_root / "class" / "iscsi_session"
    try:
        names = sorted(p.name for p in base.iterdir() if p.name.startswith("session"))
    except OSError:
        return []
    sessions = []
    for name in names:
        iqn = _read(base / name / "targetname")
        if not iqn:
            continue
        address, port = _connection_address(sysfs_root, name[len("session"):])
        # Kernels before 5.x have no "state" attribute; such a session exists,
        # so it is taken as logged in.
        state = _read(base / name / "state") or "LOGGED_IN"
        sessions.append(Session(name, iqn, address, port, state, base / name))
    return sessions


def lun_device(session: Session, lun: int) -> str | None:
    """The block device name (e.g. "sdb") of ``lun`` in ``session``."""
    for block in sorted((session.path / "device").glob(f"target*/*:*:*:{lun}/block/*")):
        return block.name
    return None


class IscsiBackend(Backend[IscsiEndpoint]):
    scheme = "iscsi"
    needs = Needs(programs=("iscsiadm",))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node_db = asyncio.Lock()

    def parse(self, uri: str) -> IscsiEndpoint:
        parts = uris.split(uri)
        user, host, port = uris.authority(uri, parts)
        if user is not None:
            raise uris.invalid(uri, "user", "iscsi URIs take no user@ (CHAP is not supported)")
        port = port or DEFAULT_PORT
        segments = parts.path.split("/")[1:] if parts.path.startswith("/") else []
        if len(segments) not in (1, 2):
            raise uris.invalid(uri, "iqn", "expected iscsi://portal[:port]/iqn[/lun]")
        iqn = segments[0]
        if len(iqn) > 223 or not _IQN.match(iqn):
            raise uris.invalid(uri, "iqn", "not an iSCSI name (iqn.YYYY-MM.domain[:id], "
                                           "eui.<16 hex>, naa.<16 or 32 hex>)")
        lun: int | None = None
        if len(segments) == 2:
            if not _LUN.match(segments[1]) or int(segments[1]) > MAX_LUN:
                raise uris.invalid(uri, "lun", f"the LUN must be a number from 0 to {MAX_LUN}")
            lun = int(segments[1])
        key = f"iscsi://{host}:{port}/{iqn}"
        canonical = key + (f"/{lun}" if lun is not None else "")
        return IscsiEndpoint(scheme=self.scheme, uri=canonical, key=key, host=host,
                             port=port, iqn=iqn, lun=lun)

    # -- sessions -------------------------------------------------------------------

    def _matches(self, session: Session, endpoint: IscsiEndpoint) -> bool:
        if session.iqn != endpoint.iqn or session.port not in (None, endpoint.port):
            return False
        host = endpoint.host.strip("[]")
        is_address = host.replace(".", "").isdigit() or ":" in host
        return not is_address or session.address == host

    def _session_for(self, endpoint: IscsiEndpoint) -> Session | None:
        for session in read_sessions(self.context.sysfs_root):
            if self._matches(session, endpoint):
                return session
        return None

    def _session_named(self, name: str) -> Session | None:
        for session in read_sessions(self.context.sysfs_root):
            if session.name == name:
                return session
        return None

    async def _iscsiadm(self, args: list[str], timeout: float,
                        ok: frozenset[int] = frozenset({0})) -> CommandResult:
        argv = ["iscsiadm", *args]
        try:
            result = await self.context.runner.run(argv, timeout)
        except commands.CommandTimeout:
            raise BackendError("ETIMEDOUT", f"iscsiadm timed out after {timeout:g}s "
                                            "(process group killed)") from None
        except commands.CommandError as exc:
            raise BackendError("ISCSI_ERR", str(exc)) from None
        if result.returncode not in ok:
            name = ISCSIADM_ERRORS.get(result.returncode, str(result.returncode))
            raise BackendError(f"ISCSI_ERR_{name}", describe_failure(result))
        return result

    # -- connect / disconnect ------------------------------------------------------------

    async def connect(self, endpoint: IscsiEndpoint) -> Attachment:
        session = self._session_for(endpoint)
        if session is not None:
            return Attachment(identity=session.name, adopted=True)
        async with self._node_db:
            found = await self._iscsiadm(
                ["-m", "discovery", "-t", "sendtargets", "-p", endpoint.portal],
                self.context.connect_timeout)
        offered = {line.split()[-1] for line in found.stdout.splitlines() if line.split()}
        if endpoint.iqn not in offered:
            raise BackendError("TargetNotFound", f"{endpoint.portal} does not offer "
                                                 f"{endpoint.iqn}")
        await self._iscsiadm(["-m", "node", "-T", endpoint.iqn, "-p", endpoint.portal,
                              "--login"], self.context.connect_timeout,
                             frozenset({0, SESSION_EXISTS}))
        session = await self._wait_for_session(endpoint)
        return Attachment(identity=session.name)

    async def _wait_for_session(self, endpoint: IscsiEndpoint) -> Session:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SYSFS_WAIT
        while True:
            session = self._session_for(endpoint)
            if session is not None:
                return session
            if loop.time() >= deadline:
                raise BackendError("SessionNotFound", f"logged in to {endpoint.iqn} but no "
                                                      "session shows in sysfs")
            await asyncio.sleep(SYSFS_POLL)

    async def disconnect(self, endpoint: IscsiEndpoint, attachment: Attachment | None) -> None:
        await self._iscsiadm(["-m", "node", "-T", endpoint.iqn, "-p", endpoint.portal,
                              "--logout"], self.context.disconnect_timeout,
                             frozenset({0, NO_OBJECTS_FOUND}))

    # -- probe / describe / discover --------------------------------------------------------

    def probe(self, endpoint: IscsiEndpoint, attachment: Attachment) -> ProbeResult:
        session = self._session_named(attachment.identity)
        if session is None or not self._matches(session, endpoint):
            return ProbeResult.failure("SessionGone", f"{attachment.identity} is gone",
                                       broken=True)
        if session.state != "LOGGED_IN":
            return ProbeResult.failure(f"Session{session.state.title().replace('_', '')}",
                                       f"{session.name} is {session.state}")
        if endpoint.lun is None:
            return ProbeResult.success(probeRead="session")
        device = lun_device(session, endpoint.lun)
        if device is None:
            return ProbeResult.failure("NoDevice", f"LUN {endpoint.lun} has no block device "
                                                   f"in {session.name}")
        try:
            mode = read_direct(str(self.context.dev_root / device))
        except OSError as exc:
            return ProbeResult.from_oserror(exc, f"read /dev/{device}")
        return ProbeResult.success(probeRead=mode)

    def describe(self, endpoint: IscsiEndpoint, attachment: Attachment | None) -> dict[str, Any]:
        session = self._session_named(attachment.identity) if attachment else None
        device = None
        if session is not None and endpoint.lun is not None:
            name = lun_device(session, endpoint.lun)
            device = f"/dev/{name}" if name else None
        return {"portal": endpoint.host, "port": endpoint.port, "iqn": endpoint.iqn,
                "lun": endpoint.lun, "session": session.name if session else None,
                "device": device}

    def discover(self) -> list[Discovered]:
        found = []
        for session in read_sessions(self.context.sysfs_root):
            host = f"[{session.address}]" if ":" in session.address else session.address
            port = session.port or DEFAULT_PORT
            found.append(Discovered(
                identity=session.name, uri=f"iscsi://{host}:{port}/{session.iqn}",
                info={"session": session.name, "state": session.state, "portal": host,
                      "port": port, "iqn": session.iqn}))
        return found
