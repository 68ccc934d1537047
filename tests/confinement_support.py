"""Fixtures for the confinement tests: a real non-root user, a directory tree it can
reach, a real agent whose allowed root that user owns, and a racing process.

* ``local_user``: a system user made with ``useradd`` for the test and removed
  with ``userdel`` at teardown (its uid is then free again).
* ``Arena``: a world-traversable directory under /tmp (pytest's own tmp dirs
  are 0700, which another user cannot enter) with ``images/`` (the agent's
  allowed root, owned by the user: the attacker may do anything inside it)
  and ``outside/`` (root's, 0755: what the attacker must never reach
  through the agent). Removed at teardown, after unmounting anything the
  test mounted inside it.
* ``confined_agent``: a real agent on the arena's root, its Unix socket in the
  arena (mode 0666 once made, so that the user's identity is what is tested,
  not the file mode), stopped by PID at teardown, task processes killed.
* ``Racer``: a Python process run as the user that swaps pairs of names with
  ``renameat2(RENAME_EXCHANGE)`` (a raw syscall through ctypes) in a loop
  until stopped (by PID).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security_support import start_agent
from tests.support import AgentProcess, RpcFailure, free_port
from tests.tasks_support import become_subreaper, kill_task_processes
from vdsm_agent.tasks.kinds import KindEnv
from vdsm_agent.tasks.kinds.base import Canceled

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture
def local_user() -> Iterator[User]:
    """A real non-root user for this test; deleted afterwards."""
    name = f"vdsmt{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True,
                   timeout=30)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


@dataclasses.dataclass
class Arena:
    base: Path
    root: Path  # the allowed root, owned by the user
    outside: Path  # root's, beside it
    user: User

    def own(self, *paths: Path) -> None:
        """Hand paths (in the root) over to the user, as if the user made them."""
        for path in paths:
            os.lchown(path, self.user.uid, self.user.gid)


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return sorted((point for point in points if point.startswith(prefix)), reverse=True)


@pytest.fixture
def arena(local_user: User) -> Iterator[Arena]:
    base = Path(tempfile.mkdtemp(prefix="vdsm-confine-"))
    try:
        os.chmod(base, 0o755)
        root, outside = base / "images", base / "outside"
        root.mkdir(mode=0o755)
        outside.mkdir(mode=0o755)
        os.chown(root, local_user.uid, local_user.gid)
        yield Arena(base, root, outside, local_user)
    finally:
        for point in _mounts_under(base):
            subprocess.run(["umount", "--lazy", "--", point], check=False,
                           capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def agent_factory(arena: Arena) -> Iterator[Any]:
    """Start real agents on the arena's root (extra flags as arguments)."""
    become_subreaper()
    started: list[AgentProcess] = []

    def start(*flags: str) -> AgentProcess:
        index = len(started)
        work = arena.base / f"agent{index}"
        work.mkdir(mode=0o700)
        sockets = arena.base / f"sock{index}"
        sockets.mkdir(mode=0o755)
        agent = start_agent(work, free_port(), "--allowed-root", str(arena.root),
                            "--heartbeat-interval", "0.2", "--stale-after", "1.5",
                            "--cancel-grace", "1", *flags, socket_path=sockets / "agent.sock")
        started.append(agent)
        os.chmod(agent.socket_path, 0o666)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()
            kill_task_processes(agent.state_dir)


@pytest.fixture
def confined_agent(agent_factory: Any) -> AgentProcess:
    agent: AgentProcess = agent_factory()
    return agent


def sha256(path: Path | str) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def random_file(path: Path, size: int, mode: int = 0o644) -> Path:
    path.write_bytes(os.urandom(size))
    os.chmod(path, mode)
    return path


def submit(agent: AgentProcess, kind: str, **params: Any) -> dict[str, Any]:
    """startTask as root over the Unix socket (admin): the answer, or the error."""
    try:
        return {"result": agent.call("startTask", unix=True, kind=kind, params=params)}
    except RpcFailure as failure:
        return {"error": failure.error}


def wait(agent: AgentProcess, task_id: str, timeout: float = 60) -> dict[str, Any]:
    task: dict[str, Any] = agent.call("waitTask", unix=True, taskID=task_id, timeout=timeout)
    assert task["state"] in ("done", "failed", "canceled"), task
    return task


def identities_under(root: Path) -> dict[str, Path]:
    """``file:<st_dev>:<st_ino>`` of every regular file beneath ``root`` (no link
    followed), with one of its paths."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                found[f"file:{info.st_dev}:{info.st_ino}"] = path
    return found


def tree(path: Path) -> dict[str, str]:
    """Every entry beneath ``path`` with its content digest (files) or kind."""
    entries = {}
    for directory, dirs, names in os.walk(path):
        for name in dirs + names:
            full = Path(directory) / name
            if full.is_symlink():
                entries[str(full)] = "link:" + os.readlink(full)
            elif full.is_file():
                entries[str(full)] = sha256(full)
            else:
                entries[str(full)] = "dir"
    return entries


# renameat2(RENAME_EXCHANGE) by raw syscall, in a loop, until killed. argv: the
# pause between swaps (seconds), then pairs of paths (relative to the cwd).
RACER = r"""
import ctypes, os, platform, sys, time
NUMBERS = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}
libc = ctypes.CDLL(None, use_errno=True)
number = NUMBERS[platform.machine()]
pause = float(sys.argv[1])
names = [os.fsencode(name) for name in sys.argv[2:]]
pairs = list(zip(names[::2], names[1::2]))
AT_FDCWD, RENAME_EXCHANGE = -100, 2
print("ready", flush=True)
swaps = 0
while True:
    for one, other in pairs:
        if libc.syscall(number, AT_FDCWD, one, AT_FDCWD, other, RENAME_EXCHANGE) == 0:
            swaps += 1
    if pause:
        time.sleep(pause)
"""


# Rewrites the start of a file with one content, then the other, in a loop, until
# killed. argv: the seconds each content stays ("A,B" or one for both), the file,
# the two contents' files.
FLIPPER = r"""
import os, sys, time
pauses = [float(value) for value in sys.argv[1].split(",")] * 2
target = sys.argv[2]
contents = [open(name, "rb").read() for name in sys.argv[3:5]]
fd = os.open(target, os.O_WRONLY)
print("ready", flush=True)
while True:
    for content, pause in zip(contents, pauses):
        os.pwrite(fd, content, 0)
        time.sleep(pause)
"""


class Racer:
    """A process of the user swapping names in ``cwd`` (or running ``script`` with
    ``args``) until ``stop()``."""

    def __init__(self, user: User, cwd: Path, pairs: list[tuple[str, str]],
                 pause: float | str = 0.0005, script: str = RACER,
                 args: tuple[str, ...] = ()) -> None:
        argv = ["/usr/bin/python3", "-I", "-c", script, str(pause), *args]
        for one, other in pairs:
            argv += [one, other]
        self.proc = subprocess.Popen(argv, user=user.uid, group=user.gid, extra_groups=[],
                                     cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"ready\n", (line, self.proc.stderr.read() if self.proc.stderr else b"")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Racer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    """``mount --bind source target``; unmounted on exit (the arena also unmounts)."""
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", "--", str(source), str(target)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield target
    finally:
        subprocess.run(["umount", "--", str(target)], check=False, capture_output=True,
                       timeout=30)


def user_call(user: User, agent: AgentProcess, method: str, **params: Any) -> dict[str, Any]:
    """The whole answer of a call made by ``user`` over the agent's Unix socket."""
    from tests.security_support import run_as

    return run_as(user.uid, str(agent.socket_path), method, **params)


class LocalContext:
    """A task context for a kind run in this process (what the child provides)."""

    def __init__(self, env: KindEnv) -> None:
        self.env = env
        self.task_id = env.task_id
        self.phase = "initializing"
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.cancel_requested = False

    def progress(self, done: int, total: int | None) -> None: ...
    def heartbeat(self) -> None: ...
    def write(self, data: bytes) -> None: ...

    def print(self, line: str) -> None:
        self.lines.append(line)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def check_cancel(self) -> None:
        if self.cancel_requested:
            raise Canceled()

    def sleep(self, seconds: float) -> None: ...

    def set_phase(self, phase: str) -> None:
        self.phase = phase
    def throttle(self, nbytes: int) -> None: ...
