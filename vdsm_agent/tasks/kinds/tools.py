"""Running a tool (mkfs, e2fsck, xfs_repair, qemu-img) as the work of a task.

* argv lists only, never a shell; ``check_arg`` refuses any value that could
  be taken for an option (a leading ``-``) or holds a NUL byte, and the kinds
  put ``--`` before paths where the tool accepts it.
* A tool never gets a caller's path by name: it gets ``/dev/fd/N`` of the
  descriptor the task resolved (``fds``: inherited through ``pass_fds``), so
  it opens that inode whatever the name leads to by then. The output says
  which name each ``/dev/fd/N`` was resolved from.
* The tool runs in the task's own process group (not a new session), so the
  task manager's SIGTERM on cancel and its SIGKILL after ``cancel_grace``
  reach the tool too. The runner also sends SIGTERM itself when it sees the
  cancel, and SIGKILL after ``TERM_WAIT``, so the kind's cleanup still runs
  before the manager's grace period ends.
* stdout and stderr are one pipe, copied byte for byte to the task output:
  getTaskOutput shows what an administrator would see in a terminal
  (qemu-img's ``\\r`` progress updates included; it prints one per percent).
* Progress is parsed from the output (``on_segment``: each piece of output
  ended by ``\\n`` or ``\\r``) or from a dedicated pipe (``progress_fd``: e.g.
  ``e2fsck -C FD`` writes ``pass current max device`` lines there).
* The runner heartbeats while the tool runs, so a long silent tool is not
  taken for a hung task; a tool that hangs in the kernel still stops the
  output and progress, which is what the caller sees.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

from vdsm_agent.errors import Failure
from vdsm_agent.tasks.kinds.base import Canceled, TaskContext, TaskFailure
from vdsm_agent.tasks.kinds.sandbox import Sandbox

TERM_WAIT = 2.0  # seconds between our SIGTERM to the tool and SIGKILL
POLL = 0.2  # seconds between heartbeats while the tool is silent
TAIL_LINES = 20  # last output lines kept for the error message

Segment = Callable[[str], None]
_ENDS = re.compile(rb"[\r\n]")


def check_arg(value: str, what: str) -> str:
    """A value from the caller that goes on a command line (never an option)."""
    if not value or value.startswith("-") or "\0" in value or "\n" in value:
        raise TaskFailure(Failure.INVALID_ARGUMENT, f"{what} {value!r} cannot be passed to a tool")
    return value


def tool_env() -> dict[str, str]:
    """C locale (parseable output), sbin on PATH, nothing else from the agent."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return {"LC_ALL": "C", "LANG": "C", "PATH": path}


@dataclasses.dataclass
class ToolResult:
    argv: list[str]
    returncode: int
    tail: list[str]  # the last lines of its output

    def summary(self) -> str:
        return "; ".join(line for line in self.tail[-3:] if line.strip())


class _Splitter:
    """Bytes into text segments ended by ``\\n`` or ``\\r``."""

    def __init__(self, handle: Segment) -> None:
        self.handle = handle
        self.pending = b""

    def feed(self, data: bytes) -> None:
        *complete, self.pending = _ENDS.split(self.pending + data)
        for piece in complete:
            self.handle(piece.decode("utf-8", "replace"))

    def close(self) -> None:
        if self.pending:
            self.handle(self.pending.decode("utf-8", "replace"))
            self.pending = b""


def run(ctx: TaskContext, argv: Sequence[str], *, on_segment: Segment | None = None,
        progress_fd: bool = False, on_progress: Segment | None = None,
        fds: Mapping[int, str] | None = None, sandbox: Sandbox | None = None) -> ToolResult:
    """Run ``argv`` to its end; Canceled if the task was cancelled meanwhile.

    With ``progress_fd``, the tool gets a pipe whose write end number replaces
    the ``{progress_fd}`` placeholder in argv, and each line on it goes to
    ``on_progress``. ``fds``: descriptors the tool inherits (named in argv as
    ``/dev/fd/N``), each with the path it was resolved from (for the output).
    ``sandbox``: a Landlock ruleset the tool's process enters before exec
    (``kinds.sandbox``; only from a single-threaded process: the task's).
    """
    args = list(argv)
    read_end = write_end = -1
    if progress_fd:
        read_end, write_end = os.pipe()
        args = [arg.replace("{progress_fd}", str(write_end)) for arg in args]
    for arg in args:
        if "\0" in arg:
            raise TaskFailure(Failure.INVALID_ARGUMENT, "NUL byte in a command line")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def segment(text: str) -> None:
        if text.strip():
            tail.append(text)
        if on_segment is not None:
            on_segment(text)

    ctx.print("$ " + shlex.join(args))
    inherited = tuple(fds or ())
    if fds:
        ctx.print("  where " + ", ".join(f"/dev/fd/{fd} is {name}"
                                         for fd, name in sorted(fds.items())))
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=tool_env(), close_fds=True,
            pass_fds=(*inherited, write_end) if progress_fd else inherited,
            preexec_fn=sandbox.enter if sandbox is not None else None)
    except OSError as exc:
        if read_end >= 0:
            os.close(read_end)
        raise TaskFailure(Failure.TOOL_FAILED, f"cannot start {args[0]}: {exc.strerror}") from None
    finally:
        if write_end >= 0:
            os.close(write_end)
    assert proc.stdout is not None
    streams = {proc.stdout.fileno(): (_Splitter(segment), True)}
    if read_end >= 0:
        streams[read_end] = (_Splitter(on_progress or (lambda text: None)), False)
    try:
        if _pump(ctx, proc, streams) not in (b"", b"\n"):
            ctx.write(b"\n")  # the task's own next line starts on a line of its own
        # The output is closed; the tool is exiting (or a helper kept the pipe).
        try:
            proc.wait(timeout=TERM_WAIT)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if read_end >= 0:
            os.close(read_end)
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if ctx.cancel_requested:
        ctx.print(f"{args[0]} stopped ({_describe(proc.returncode)})")
        raise Canceled()
    if proc.returncode < 0:
        raise TaskFailure(Failure.TOOL_FAILED, f"{args[0]} was killed by "
                          f"{_describe(proc.returncode)}", argv=args)
    return ToolResult(args, proc.returncode, list(tail))


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _pump(ctx: TaskContext, proc: subprocess.Popen[bytes],
          streams: dict[int, tuple[_Splitter, bool]]) -> bytes:
    """Copy output and progress until every pipe is closed; stop the tool on a cancel.

    Returns the last byte of the output copied (b"" if none)."""
    last = b""
    selector = selectors.DefaultSelector()
    for fd in streams:
        selector.register(fd, selectors.EVENT_READ)
    term_at: float | None = None
    exited_at: float | None = None
    try:
        while selector.get_map():
            for key, _ in selector.select(POLL):
                fd = int(key.fd)
                data = os.read(fd, 65536)
                splitter, echo = streams[fd]
                if not data:
                    selector.unregister(fd)
                    splitter.close()
                    continue
                if echo:
                    ctx.write(data)
                    last = data[-1:]
                splitter.feed(data)
            ctx.heartbeat()
            if ctx.cancel_requested and proc.poll() is None:
                now = time.monotonic()
                if term_at is None:
                    term_at = now
                    proc.send_signal(signal.SIGTERM)
                elif now - term_at > TERM_WAIT:
                    proc.kill()
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            if exited_at is not None and time.monotonic() - exited_at > TERM_WAIT:
                break  # the tool is gone; a helper it forked still holds the pipe
    finally:
        selector.close()
    return last


class ProgressLines:
    """Human progress lines for in-process work: each 10%, and at least every 10 s."""

    EVERY = 10.0

    def __init__(self, ctx: TaskContext, total: int, verb: str) -> None:
        self.ctx = ctx
        self.total = total
        self.verb = verb
        self.started = time.monotonic()
        self.last_print = self.started
        self.last_decile = 0

    def maybe_print(self, done: int) -> None:
        now = time.monotonic()
        decile = done * 10 // self.total if self.total else 10
        if (decile == self.last_decile and now - self.last_print < self.EVERY) \
                or done >= self.total:
            return
        self.last_decile = decile
        self.last_print = now
        rate = done / max(now - self.started, 1e-6)
        self.ctx.print(f"{done * 100 // max(self.total, 1)}% {human_bytes(done)} of "
                       f"{human_bytes(self.total)} {self.verb}, {human_bytes(rate)}/s")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")
