"""Fixtures and helpers for the storage connection tests.

Real servers on loopback (shared/reference/loopback-storage.md):

* ``gluster``: ``glusterd -N`` and a one-brick volume on this machine's host
  name (gluster refuses 127.0.0.1 and localhost; the name must resolve to a
  local address, added to /etc/hosts for the session only if it does not),
  brick under the session's temp dir (``force``: it is on the root fs),
  ``network.ping-timeout`` 3 s so that a frozen brick fails a probe in ~4 s.
* ``sshd``: an sshd on a free high loopback port with a throwaway host key,
  client key and config under the temp dir (``StrictModes no``: /tmp is
  world-writable), ``/run/sshd`` created.

Both are session-scoped, started on first use, and stopped by PID at the end,
volume stopped and deleted, even when tests fail. ``host_cleanup`` (used by every
test module) unmounts whatever a test left under its temp dir and
detaches loop devices bound to files there, so a failing test never leaks a
mount into the next.

The test modules load this file as a plugin (``pytest_plugins``) so that the
session-scoped servers exist once; it is imported before pytest could rewrite
its asserts, hence PYTEST_DONT_REWRITE (its asserts carry their own messages).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import psutil
import pytest

from tests.support import AgentProcess, agent_argv, free_port, spawn_agent, until
from vdsm_agent.connections.backends.loop import bound_loop_devices
from vdsm_agent.system import mountinfo
from vdsm_agent.system.commands import CommandResult

MOUNTINFO = Path("/proc/self/mountinfo")
SYSFS = Path("/sys")

# Fast monitor settings for tests: probes every 0.3 s, disconnected after 2
# failures, connected after 2 successes, retries within 0.2-1 s.
FAST = {
    "probe_interval": 0.3,
    "probe_failures": 2,
    "probe_recoveries": 2,
    "backoff_base": 0.2,
    "backoff_cap": 1.0,
    "backoff_floor": 0.2,
    "backoff_reset": 60.0,
    "connect_timeout": 20.0,
    "disconnect_timeout": 5.0,
}


def sh(argv: Sequence[str], timeout: float = 30, check: bool = True) -> CommandResult:
    """Run a command for a fixture (never through a shell)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)
    result = CommandResult(list(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: rc {proc.returncode}: {proc.stderr.strip()}")
    return result


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str = "condition") -> Any:
    return until(predicate, timeout, interval, what)


def pid_gone(pid: int) -> bool:
    """True once /proc/PID is gone (a zombie still has it: PID 1 reaps slowly).

    When an earlier test made this process a child subreaper (tests/tasks_support.py),
    orphans are re-parented to us and only we can reap them.
    """
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: PID 1 reaps it
    return not Path(f"/proc/{pid}").exists()


def mount_entry(mount_point: str) -> Any:
    for entry in mountinfo.read(MOUNTINFO):
        if entry.mount_point == mount_point:
            return entry
    return None


# -- fake command runner ------------------------------------------------------------------


def ok(argv: Sequence[str], stdout: str = "", stderr: str = "", rc: int = 0) -> CommandResult:
    return CommandResult(list(argv), rc, stdout, stderr)


class FakeRunner:
    """Records every argv; answers with ``respond(argv)`` (default: exit 0)."""

    def __init__(self, respond: Callable[[list[str]], CommandResult | Exception] | None = None):
        self.calls: list[tuple[list[str], float]] = []
        self.respond = respond

    @property
    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]

    def unmet(self, needs: Any) -> str | None:
        return None  # it fakes every tool: every scheme is served

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.calls.append((list(argv), timeout))
        outcome = self.respond(list(argv)) if self.respond else ok(argv)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class FailingRunner:
    """The real runner, except commands whose argv starts with ``fail_prefix``."""

    def __init__(self, real: Any, fail_prefixes: Sequence[Sequence[str]]) -> None:
        self.real = real
        self.fail_prefixes = [list(prefix) for prefix in fail_prefixes]
        self.failed: list[list[str]] = []

    def unmet(self, needs: Any) -> str | None:
        return self.real.unmet(needs)  # type: ignore[no-any-return]

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        args = list(argv)
        if any(args[:len(prefix)] == prefix for prefix in self.fail_prefixes):
            self.failed.append(args)
            return ok(args, stderr=f"{args[0]}: injected failure: target is busy", rc=32)
        result: CommandResult = await self.real.run(argv, timeout)
        return result


# -- host cleanup -----------------------------------------------------------------------------


def cleanup_under(root: Path) -> None:
    """Lazily unmount every mount under ``root``; detach loops on files under it."""
    prefix = str(root.resolve()) + "/"
    for entry in reversed(mountinfo.read(MOUNTINFO)):
        if entry.mount_point.startswith(prefix):
            sh(["umount", "-f", "-l", entry.mount_point], check=False, timeout=10)
    for device, backing in bound_loop_devices(SYSFS).items():
        if backing.startswith(prefix):
            sh(["losetup", "-d", device], check=False, timeout=10)


@pytest.fixture(name="host_cleanup")
def host_cleanup_fixture(tmp_path: Path) -> Iterator[None]:
    yield
    cleanup_under(tmp_path)


# -- the host name gluster needs ------------------------------------------------------------


def _is_local(address: str) -> bool:
    if ipaddress.ip_address(address).is_loopback:
        return True
    with contextlib.suppress(OSError), socket.socket() as sock:
        sock.bind((address, 0))
        return True
    return False


@contextlib.contextmanager
def hostname_resolving_locally() -> Iterator[str]:
    """This machine's host name, resolving to a local address for the duration.

    If it does not, a line is added to /etc/hosts and removed afterwards.
    """
    name = socket.gethostname()
    try:
        resolved = socket.gethostbyname(name)
    except OSError:
        resolved = ""
    if resolved and _is_local(resolved):
        yield name
        return
    line = f"127.0.1.1 {name}  # vdsm-agent tests\n"
    hosts = Path("/etc/hosts")
    with hosts.open("a") as stream:
        stream.write(line)
    try:
        yield name
    finally:
        hosts.write_text(hosts.read_text().replace(line, ""))


def _require(present: bool, what: str) -> None:
    """Skip without root or the tools, except in CI, where that is a failure
    (the same rule as the root/tool markers in tests/conftest.py)."""
    if os.geteuid() == 0 and present:
        return
    message = f"needs root and {what} (scripts/bootstrap --with-system)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# -- GlusterFS -----------------------------------------------------------------------------------


def gluster(*args: str, check: bool = True, timeout: float = 60) -> CommandResult:
    return sh(["gluster", "--mode=script", *args], check=check, timeout=timeout)


@dataclasses.dataclass
class GlusterServer:
    host: str
    volume: str
    brick: Path
    glusterd: subprocess.Popen[bytes] | None  # None: a glusterd was already running

    @property
    def uri(self) -> str:
        return f"glusterfs://{self.host}/{self.volume}"

    def brick_status(self) -> tuple[bool, int | None]:
        """(online, pid) of the brick, from ``gluster volume status --xml``
        (the text form wraps long brick paths over two lines)."""
        out = gluster("volume", "status", self.volume, "--xml", check=False).stdout
        try:
            root = ElementTree.fromstring(out)
        except ElementTree.ParseError:
            return False, None
        for node in root.iter("node"):
            if node.findtext("path") == str(self.brick):
                pid = node.findtext("pid") or ""
                online = node.findtext("status") == "1"
                return online, int(pid) if pid.isdigit() and int(pid) > 0 else None
        return False, None

    def brick_pid(self) -> int:
        online, pid = self.brick_status()
        assert online, "the brick is not online"
        assert pid is not None
        return pid

    def kill_brick(self) -> int:
        pid = self.brick_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_brick(self, old_pid: int) -> float:
        """``volume start force`` once the old brick is really gone; seconds taken."""
        started = time.monotonic()
        # A zombie brick makes "start force" report success and start nothing.
        wait_for(lambda: pid_gone(old_pid), 20, what="killed brick reaped")
        gluster("volume", "start", self.volume, "force")
        wait_for(lambda: self.brick_status()[0], 20, interval=0.2, what="brick online")
        return time.monotonic() - started


def _wait_glusterd(proc: subprocess.Popen[bytes] | None) -> None:
    def answers() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError("glusterd exited")
        return gluster("volume", "list", check=False, timeout=10).returncode == 0
    wait_for(answers, 30, interval=0.2, what="glusterd answering")


@pytest.fixture(scope="session", name="gluster_server")
def gluster_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterServer]:
    _require(shutil.which("glusterd") is not None, "glusterd")
    base = tmp_path_factory.mktemp("gluster")
    volume = f"vdsmtest{os.getpid()}"
    with hostname_resolving_locally() as host:
        running = gluster("volume", "list", check=False, timeout=10).returncode == 0
        proc = None
        server: GlusterServer | None = None
        if not running:
            log = open(base / "glusterd.log", "wb")  # noqa: SIM115 - closed at teardown
            proc = subprocess.Popen(["glusterd", "-N", f"--log-file={base / 'glusterd.log'}"],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_glusterd(proc)
            brick = base / "brick"
            brick.mkdir()
            gluster("volume", "create", volume, f"{host}:{brick}", "force")
            # Set before start: a live change applies only after the next hang.
            gluster("volume", "set", volume, "network.ping-timeout", "3")
            gluster("volume", "start", volume)
            server = GlusterServer(host, volume, brick, proc)
            wait_for(lambda: server.brick_status()[0], 20, interval=0.2, what="brick online")
            yield server
        finally:
            # A test that killed glusterd started another in its place (server.glusterd,
            # tests/gluster_support.py): that one is stopped.
            _stop_gluster(volume, server.glusterd if server is not None else proc)
            if proc is not None:
                log.close()


def _stop_gluster(volume: str, proc: subprocess.Popen[bytes] | None) -> None:
    # Mounts of the volume left by a broken test would keep clients around.
    for entry in mountinfo.read(MOUNTINFO):
        if entry.fstype == "fuse.glusterfs" and entry.source.endswith(f":/{volume}"):
            sh(["umount", "-f", "-l", entry.mount_point], check=False)
    gluster("volume", "stop", volume, "force", check=False)
    gluster("volume", "delete", volume, check=False)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- sshd ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SshServer:
    port: int
    base: Path
    export: Path
    identity: Path
    known_hosts: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"sshfs://root@127.0.0.1:{self.port}{self.export}"

    @property
    def settings(self) -> dict[str, Any]:
        return {"sshfs_identity_file": str(self.identity),
                "sshfs_host_key_checking": "accept-new",
                "sshfs_known_hosts_file": str(self.known_hosts)}

    def flags(self) -> list[str]:
        return [f"--{name.replace('_', '-')}={value}" for name, value in self.settings.items()]

    def start(self) -> None:
        log = open(self.base / "sshd.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        wait_for(self._listening, 10, what="sshd listening")

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"sshd exited: {(self.base / 'sshd.log').read_text()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes forked by our listener."""
        if self.proc is None:
            return []
        try:
            return [child.pid for child in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_everything(self) -> None:
        """Kill the sessions and the listener (SIGKILL, by PID)."""
        for pid in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session", name="ssh_server")
def ssh_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    _require(shutil.which("sshfs") is not None and Path("/usr/sbin/sshd").exists(),
             "sshfs and openssh-server")
    base = tmp_path_factory.mktemp("sshd")
    export = base / "export"
    export.mkdir()
    (export / "hello.txt").write_text("hello\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    for name in ("host", "id"):
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)])
    shutil.copy(base / "id.pub", base / "authorized_keys")
    port = free_port()
    config = base / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host'}",
        f"PidFile {base / 'sshd.pid'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "StrictModes no", f"AuthorizedKeysFile {base / 'authorized_keys'}",
        "Subsystem sftp internal-sftp", ""]))
    server = SshServer(port=port, base=base, export=export, identity=base / "id",
                       known_hosts=base / "known_hosts", config=config)
    server.start()
    try:
        yield server
    finally:
        for entry in mountinfo.read(MOUNTINFO):
            if entry.fstype == "fuse.sshfs" and entry.source.endswith(f":{export}"):
                sh(["umount", "-f", "-l", entry.mount_point], check=False)
        server.kill_everything()


# -- a real agent process with connection settings ----------------------------------------------


def start_agent(tmp_path: Path, settings: dict[str, Any], log_name: str = "agent.log",
                port: int | None = None) -> AgentProcess:
    state = tmp_path / "agent-state"
    port = port or free_port()
    socket_path = tmp_path / "agent.sock"
    argv = agent_argv(state, port, socket_path, settings)
    agent = spawn_agent(argv, port, socket_path, state, tmp_path / log_name, append_log=True)
    try:
        agent.wait_ready(timeout=20)
    except BaseException:
        agent.stop()
        raise
    return agent


def kill9(agent: AgentProcess) -> None:
    agent.proc.kill()
    agent.proc.wait()
