"""What every connection backend provides, and what it is given.

A backend handles one URI scheme. It parses and validates its URIs, connects
(adopting a target that is already attached, so a restarted agent does not
remount), disconnects, probes health, describes a connection
(``connectionInfo``) and discovers attachments on the host that the agent
does not manage. Async methods run commands through ``context.runner``;
``probe`` and ``discover`` are blocking and run in threads (``probe`` on the
probe pool, because it touches storage; ``discover`` only reads the mount
table and sysfs).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence, Set
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from vdsm_agent.connections.backends.needs import HostSupport, Needs
from vdsm_agent.connections.probes import ProbeResult
from vdsm_agent.connections.uri import Endpoint
from vdsm_agent.system import commands
from vdsm_agent.system.commands import CommandResult

E = TypeVar("E", bound=Endpoint)


class Runner(Protocol):
    """Runs one command: an argv list and a hard timeout (process group killed); and
    says whether the tools and kernel support a backend needs are there (a runner
    that fakes the tools says they all are)."""

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult: ...

    def unmet(self, needs: Needs) -> str | None: ...


class SystemRunner:
    """The production runner: ``system.commands.run_async`` and this host's support."""

    def __init__(self, support: HostSupport | None = None) -> None:
        self.support = support or HostSupport()

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        return await commands.run_async(argv, timeout=timeout)

    def unmet(self, needs: Needs) -> str | None:
        return self.support.unmet(needs)


class BackendError(Exception):
    """A connect or disconnect that failed; ``code`` is short and stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class BackendContext:
    """What backends share: the runner, timeouts, paths, sshfs settings.

    ``sysfs_root``, ``dev_root`` and ``mountinfo`` are parameters so that tests
    can point them at a fixture tree.
    """

    runner: Runner
    mount_root: Path
    connect_timeout: float = 60.0
    disconnect_timeout: float = 10.0
    sysfs_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")
    mountinfo: Path = Path("/proc/self/mountinfo")
    proc_root: Path = Path("/proc")
    sshfs_identity_file: str = ""
    sshfs_host_key_checking: str = "yes"
    sshfs_known_hosts_file: str = ""
    # Where local images may live (setting allowed_roots): a loop:// image elsewhere
    # would let a caller attach, and then wipe, any file on the host.
    allowed_roots: tuple[str, ...] = ()


@dataclasses.dataclass
class Attachment:
    """What a connect made (or adopted), as the backend needs it later.

    ``identity`` names the attachment on the host (a mount point, a device, a
    session) so that discovery can tell managed from unmanaged ones.
    """

    identity: str
    adopted: bool = False
    device: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Discovered:
    """An attachment found on the host."""

    identity: str
    uri: str
    info: dict[str, Any]


async def run_checked(context: BackendContext, argv: Sequence[str], timeout: float,
                      code: str, ok_codes: Set[int] = frozenset({0})) -> CommandResult:
    """Run a command; BackendError when it times out, cannot start or fails."""
    try:
        result = await context.runner.run(argv, timeout)
    except commands.CommandTimeout:
        raise BackendError("ETIMEDOUT", f"{argv[0]} timed out after {timeout:g}s "
                                        "(process group killed)") from None
    except commands.CommandError as exc:
        raise BackendError(code, str(exc)) from None
    if result.returncode not in ok_codes:
        raise BackendError(code, describe_failure(result))
    return result


# Lines tools print after the one that says what went wrong (mount(8) ends every
# failure with the dmesg line, and may start with a "(hint)").
_NOISE = ("dmesg(1) may have more information", "(hint)")


def describe_failure(result: CommandResult) -> str:
    """One line for lastError: the command, its exit code and the tool's own words
    (its first error line, e.g. mount's "unknown filesystem type 'nfs'", not the
    advice that follows it)."""
    lines = [line.strip() for line in
             (result.stderr.strip() or result.stdout.strip()).splitlines() if line.strip()]
    said = [line for line in lines if not any(noise in line for noise in _NOISE)]
    first = (said or lines or ["no output"])[0]
    return f"{result.argv[0]} exited with {result.returncode}: {first[:400]}"


class Backend(abc.ABC, Generic[E]):
    """One URI scheme. Subclasses set ``scheme`` and implement the methods."""

    scheme: ClassVar[str]
    # The programs and kernel support the scheme needs (needs.py): without them it
    # is not served (getCapabilities.uriSchemes; manage answers UnsupportedScheme).
    needs: ClassVar[Needs] = Needs()

    def __init__(self, context: BackendContext) -> None:
        self.context = context

    def unserved(self) -> str | None:
        """Why this host cannot serve the scheme (a tool or the kernel lacks), or None."""
        return self.context.runner.unmet(self.needs)

    @abc.abstractmethod
    def parse(self, uri: str) -> E:
        """Validate ``uri`` (InvalidUri) and return its endpoint."""

    def authorize(self, endpoint: E) -> None:
        """Refuse a new managed target this agent may not use (``errors.*``).

        Only for manage: discovery and adoption of what is already there skip it.
        """

    @abc.abstractmethod
    async def connect(self, endpoint: E) -> Attachment:
        """Attach the target, or adopt it when it is already attached."""

    @abc.abstractmethod
    async def disconnect(self, endpoint: E, attachment: Attachment | None) -> None:
        """Detach the target; a target that is not attached is success."""

    async def repair(self, endpoint: E, attachment: Attachment | None,
                     failure: ProbeResult) -> Attachment:
        """Reconnect after a failure. By default: connect (which adopts)."""
        return await self.connect(endpoint)

    @abc.abstractmethod
    def probe(self, endpoint: E, attachment: Attachment) -> ProbeResult:
        """Check health; blocking, runs on the probe pool."""

    @abc.abstractmethod
    def describe(self, endpoint: E, attachment: Attachment | None) -> dict[str, Any]:
        """``connectionInfo`` for one connection ID on this endpoint."""

    def discover(self) -> list[Discovered]:
        """Attachments of this scheme on the host; blocking, never touches storage."""
        return []
