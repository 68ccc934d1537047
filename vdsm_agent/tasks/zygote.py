"""The task zygote: one pre-started Python process that forks task processes.

Spawning ``python -m vdsm_agent.tasks.child`` costs a Python start-up and the
imports of every kind: 0.1-0.15 s of CPU per task, inside the task's own time
(``startedAt`` -> ``endedAt``) and its ``accepted`` -> ``running``. The zygote
pays that once, when the agent starts: for each task it forks a copy of
itself that is ready to run at once (a few milliseconds; see "Device
operations" in docs/benchmarks.md).

A forked task process is set up as a spawned one is: its own session, the
signal state of a fresh Python, stdin ``/dev/null``, stdout and stderr
appended to ``child.log``, the task directory as its working directory (that
is how ``process.find_by_task_dir`` knows it: its command line is the
zygote's), no other file descriptor open; then it runs
``tasks.child.main``.

The zygote is single-threaded (so forking it is safe) and talks to the agent
over a ``SOCK_SEQPACKET`` socket pair, one JSON object per packet:

* agent -> zygote: ``{"taskDir": DIR}``;
* zygote -> agent: ``{"ready": PID}`` once, after its imports; for each
  request, in order, ``{"pid": N, "createTime": T}`` with a pidfd of the new
  process attached (``SCM_RIGHTS``: opened before the zygote could reap it,
  so it cannot name a reused PID), or ``{"error": TEXT}``; and whenever a
  task process ends, ``{"exited": N, "status": S}`` (S: exit code, or minus
  the signal, as ``process.reap``). Before reaping, the zygote kills what is
  left of the task's process group, as the agent does for its own children.

The zygote exits when the agent's end closes (the agent stopped or died).
Task processes it started keep running, as spawned ones do across an agent
restart, and are re-attached by the next agent. An agent killed while
packets to it were unread (a task ended or was forked just before) resets
the socket rather than closing it: that is the same news, not an error, so
the zygote says it in one line on its stderr (the agent's: its log, or the
journal under systemd) and exits 0, without a traceback.
"""

# Longer than 400 lines: both ends of the zygote's small protocol (the agent's side and
# the zygote's), so that each message is written and read in one place.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vdsm_agent import logs
from vdsm_agent.settings import LOG_LEVELS

ZYGOTE_MODULE = "vdsm_agent.tasks.zygote"
log = logging.getLogger(ZYGOTE_MODULE)  # also when run as __main__ (the zygote itself)
MAX_PACKET = 65536
READY_TIMEOUT = 30.0  # seconds for the zygote's imports, however loaded the host
# A zygote that died is replaced at the next launch, but not more often than this
# (a zygote that keeps dying must not cost every launch a Python start-up).
RESTART_INTERVAL = 60.0
EXIT_STATUS_WAIT = 2.0  # seconds to wait for an exit status after the pidfd fired


class ZygoteGone(RuntimeError):
    """The zygote is not running (any more): spawn the task process instead."""


class AgentGone(Exception):
    """In the zygote: the agent's end of the socket closed or was reset."""


# -- the agent's side ---------------------------------------------------------------------


class Zygote:
    """The agent's handle on its zygote: ``start``, ``spawn``, ``exit_status``, ``close``."""

    def __init__(self, sock: socket.socket, pid: int, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = pid
        self._sock = sock
        self._loop = loop
        self._replies: list[asyncio.Future[tuple[dict[str, Any], list[int]]]] = []
        self._children: set[int] = set()  # forked here and not yet asked about
        self._statuses: dict[int, int] = {}
        self._status_waiters: dict[int, asyncio.Future[int]] = {}
        self.alive = True
        loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def start(cls, state_dir: Path) -> Zygote:
        """Start a zygote and wait until it has imported everything; ZygoteGone if it
        cannot start (the caller spawns task processes instead)."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = await asyncio.to_thread(_spawn_zygote, theirs, state_dir)
        except OSError as exc:
            ours.close()
            raise ZygoteGone(f"cannot start the task zygote: {exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        try:
            data = await asyncio.wait_for(loop.sock_recv(ours, MAX_PACKET), READY_TIMEOUT)
            ready = json.loads(data) if data else {}
        except (TimeoutError, OSError, ValueError):
            ready = {}
        except BaseException:  # cancelled: closing our end makes it exit
            ours.close()
            raise
        if ready.get("ready") != pid:
            ours.close()
            _reap_quietly(pid)
            raise ZygoteGone("the task zygote did not start (see the agent's log)")
        return cls(ours, pid, loop)

    async def spawn(self, task_dir: Path) -> tuple[int, float, int]:
        """Fork a task process for ``task_dir``: its PID, start time and a pidfd."""
        if not self.alive:
            raise ZygoteGone("the task zygote has exited")
        reply: asyncio.Future[tuple[dict[str, Any], list[int]]] = self._loop.create_future()
        self._replies.append(reply)
        try:
            self._sock.send(json.dumps({"taskDir": str(task_dir)}).encode())
        except OSError as exc:
            self._replies.remove(reply)
            self._gone(f"cannot write to the task zygote: {exc}")
            raise ZygoteGone(str(exc)) from None
        message, fds = await reply
        if "error" in message:
            for fd in fds:
                os.close(fd)
            raise OSError(f"the task zygote could not fork: {message['error']}")
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError("the task zygote sent no pidfd")
        pid = int(message["pid"])
        self._children.add(pid)
        return pid, float(message["createTime"]), fds[0]

    async def exit_status(self, pid: int) -> int | None:
        """The wait status of a task process this zygote forked (once it has ended);
        None if this zygote did not fork it, or does not say within EXIT_STATUS_WAIT
        (it died meanwhile)."""
        if pid not in self._children:
            return None
        self._children.discard(pid)
        if pid in self._statuses:
            return self._statuses.pop(pid)
        if not self.alive:
            return None
        waiter = self._status_waiters.setdefault(pid, self._loop.create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), EXIT_STATUS_WAIT)
        except TimeoutError:
            return None
        finally:
            self._status_waiters.pop(pid, None)
            self._statuses.pop(pid, None)

    async def close(self) -> None:
        """Close our end: the zygote exits (its task processes keep running)."""
        if self.alive:
            self._gone(None)
        try:
            await asyncio.wait_for(asyncio.to_thread(_wait_exit, self.pid), READY_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _reap_quietly(self.pid)

    def _on_readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_PACKET, 4)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(f"cannot read from the task zygote: {exc}")
            return
        if not data:
            self._gone("the task zygote exited")
            return
        message = json.loads(data)
        if "exited" in message:
            for fd in fds:
                os.close(fd)
            self._on_exited(int(message["exited"]), int(message["status"]))
        elif self._replies:
            reply = self._replies.pop(0)
            if reply.cancelled():
                for fd in fds:
                    os.close(fd)
            else:
                reply.set_result((message, fds))

    def _on_exited(self, pid: int, status: int) -> None:
        waiter = self._status_waiters.get(pid)
        if waiter is not None and not waiter.done():
            waiter.set_result(status)
        elif pid in self._children:  # kept until asked (not after a wait gave up)
            self._statuses[pid] = status

    def _gone(self, why: str | None) -> None:
        self.alive = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if why is not None:
            log.warning("%s; task processes are spawned from now on", why)
        for reply in self._replies:
            if not reply.done():
                reply.set_exception(ZygoteGone(why or "the task zygote was closed"))
        self._replies.clear()
        for waiter in self._status_waiters.values():
            if not waiter.done():
                waiter.cancel()


class ZygoteKeeper:
    """The agent's one zygote over its life: started in the background (the agent
    serves and re-attaches without waiting for its imports; only launches wait
    for it, which costs them nothing: spawning instead takes as long), replaced
    at the next launch after it died (at most once per RESTART_INTERVAL),
    closed with the agent."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._zygote: Zygote | None = None
        self._starting: asyncio.Task[Zygote] | None = None
        self._started_at: float | None = None  # time.monotonic() of the last start
        self._closed = False

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._starting = asyncio.create_task(Zygote.start(self.state_dir),
                                             name="tasks-zygote-start")

    async def ready(self) -> Zygote | None:
        """The running zygote, None without one (the caller spawns instead)."""
        starting = self._starting
        if starting is not None:
            try:
                zygote: Zygote | None = await asyncio.shield(starting)
            except Exception as exc:  # ZygoteGone, or it could not even try
                if self._starting is starting:
                    log.warning("%s; task processes are spawned instead", exc)
                zygote = None
            if self._starting is starting:
                self._starting = None
                self._zygote = zygote
        zygote = self._zygote
        if zygote is not None and zygote.alive:
            return zygote
        if self._may_restart():
            if zygote is not None:
                await zygote.close()  # reap the dead one
                self._zygote = None
            log.info("starting a new task zygote")
            self.start()  # for the next launches; this one is spawned
        return None

    async def exit_status(self, pid: int) -> int | None:
        """What the zygote said of a task process it forked (see Zygote.exit_status)."""
        return await self._zygote.exit_status(pid) if self._zygote is not None else None

    async def close(self) -> None:
        self._closed = True
        await self.ready()  # a start under way ends first
        if self._zygote is not None:
            await self._zygote.close()  # also reaps one that died

    def _may_restart(self) -> bool:
        return (not self._closed and self._starting is None and self._started_at is not None
                and time.monotonic() - self._started_at >= RESTART_INTERVAL)


def _spawn_zygote(theirs: socket.socket, state_dir: Path) -> int:
    """posix_spawn the zygote with ``theirs`` as an inherited fd (blocking)."""
    os.set_inheritable(theirs.fileno(), True)
    # The agent's log level, so that the zygote's one line at exit obeys it too.
    argv = [sys.executable, "-m", ZYGOTE_MODULE, "--fd", str(theirs.fileno()),
            "--state-dir", str(state_dir), "--log-level", _agent_log_level()]
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
    # stdout/stderr stay the agent's: a zygote traceback belongs in the agent's log.
    return os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions,
                          setsid=True)


def _wait_exit(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _reap_quietly(pid: int) -> None:
    """Reap the zygote if it has exited; it exits by itself once our end is closed."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# -- the zygote's side -------------------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    try:
        socket.send_fds(sock, [json.dumps(message).encode()], list(fds))
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise AgentGone(_gone_reason(exc)) from None


def _gone_reason(exc: OSError) -> str:
    return f"the agent's end of the socket is gone ({exc.strerror or exc})"


def _fork_task(sock: socket.socket, wakeup: tuple[int, int], task_dir: str,
               children: set[int]) -> None:
    """Fork one task process and tell the agent its PID, start time and pidfd (the
    process keeps running if the agent is gone by then: the next one finds it)."""
    from vdsm_agent.tasks import child

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become_task(sock, wakeup, task_dir)  # never returns
    children.add(pid)
    pidfd = os.pidfd_open(pid)
    try:
        _send(sock, {"pid": pid, "createTime": child.start_time(pid)}, [pidfd])
    finally:
        os.close(pidfd)


def _become_task(sock: socket.socket, wakeup: tuple[int, int], task_dir: str) -> None:
    """In the forked process: look like a freshly spawned task process, then run it."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote changed only this
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        sock.close()
        for fd in wakeup:
            os.close(fd)
        os.chdir(task_dir)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        output = os.open(os.path.join(task_dir, "child.log"),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        os.dup2(output, 1)
        os.dup2(output, 2)
        # Nothing else of the zygote's, nor what it inherited without close-on-exec.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        from vdsm_agent.tasks import child

        code = child.main(["--task-dir", task_dir])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap_children(sock: socket.socket | None, children: set[int]) -> None:
    """Report every ended task process, after killing what is left of its group
    (``sock`` None: the agent is gone, only reap)."""
    while True:
        try:
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if ended is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ended.si_pid, signal.SIGKILL)  # its group ID is still its own
        _, wait_status = os.waitpid(ended.si_pid, 0)
        children.discard(ended.si_pid)
        status = (os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status)
                  else -os.WTERMSIG(wait_status))
        if sock is not None:
            _send(sock, {"exited": ended.si_pid, "status": status})


def _receive(sock: socket.socket) -> bytes:
    """The agent's next request; AgentGone when its end closed or was reset."""
    try:
        data = sock.recv(MAX_PACKET)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise AgentGone(_gone_reason(exc)) from None
    if not data:
        raise AgentGone("the agent closed its end of the socket")
    return data


def _serve_requests(sock: socket.socket, wakeup: tuple[int, int], children: set[int]) -> None:
    """Fork on request and report ends until the agent is gone (AgentGone)."""
    _send(sock, {"ready": os.getpid()})
    while True:
        readable, _, _ = select.select([sock.fileno(), wakeup[0]], [], [])
        if wakeup[0] in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wakeup[0], 512):
                    pass
            _reap_children(sock, children)
        if sock.fileno() in readable:
            task_dir = str(json.loads(_receive(sock))["taskDir"])
            try:
                _fork_task(sock, wakeup, task_dir, children)
            except OSError as exc:
                _send(sock, {"error": str(exc)})


def serve(sock: socket.socket) -> int:
    """The zygote's life: fork on request, report ends; once the agent is gone
    (stopped, killed, crashed: all normal), one line on stderr and exit 0."""
    wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup[1])
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    # Imported now, once, so that every fork starts with them loaded.
    from vdsm_agent.tasks import child  # noqa: F401
    from vdsm_agent.tasks.kinds import KINDS  # noqa: F401

    children: set[int] = set()  # forked and not yet reaped
    try:
        _serve_requests(sock, wakeup, children)
    except AgentGone as gone:
        _reap_children(None, children)  # ended meanwhile: no agent to tell
        log.info("task zygote (pid %d): %s; exiting (task processes it started that still "
                 "run: %d; the next agent re-attaches them)", os.getpid(), gone, len(children))
    return 0


def _log_to_stderr(level: str) -> None:
    """This module's records on stderr, as the agent writes its own (its log, or the
    journal under systemd); nothing else is configured, so that forked task
    processes log as spawned ones do."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.Formatter(logs.FORMAT))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


def _agent_log_level() -> str:
    name = logging.getLevelName(log.getEffectiveLevel()).lower()
    return name if name in LOG_LEVELS else "info"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ZYGOTE_MODULE)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--state-dir", required=True,
                        help="the agent's state dir (so that ps shows whose zygote it is)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    args = parser.parse_args(argv)
    _log_to_stderr(args.log_level)
    sock = socket.socket(fileno=args.fd)
    sock.set_inheritable(False)
    try:
        return serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
