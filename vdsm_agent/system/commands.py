"""Run external commands safely: argument lists only, hard timeouts, process groups.

Every command starts in its own session (process group), so that a timeout
kills the whole group, including any helpers the tool forked. Nothing here
ever goes through a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
from collections.abc import Sequence


class CommandError(Exception):
    """A command could not be started, timed out, or failed (when checked)."""

    def __init__(self, argv: Sequence[str], message: str, result: CommandResult | None = None):
        super().__init__(f"{argv[0]}: {message}")
        self.argv = list(argv)
        self.result = result


class CommandTimeout(CommandError):
    pass


@dataclasses.dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _check_argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str) or not argv:
        raise TypeError("argv must be a non-empty list of strings")
    checked = list(argv)
    for arg in checked:
        if not isinstance(arg, str):
            raise TypeError(f"argv members must be strings, got {type(arg).__name__}")
        if "\0" in arg:
            raise ValueError("argv members must not contain NUL bytes")
    return checked


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run(argv: Sequence[str], *, timeout: float, check: bool = False,
        input: str | None = None, pass_fds: Sequence[int] = ()) -> CommandResult:
    """Run a command to completion from a worker thread (never from the loop).

    ``pass_fds``: descriptors the command inherits (a tool given ``/dev/fd/N``
    instead of a name: ``vdsm_agent.system.confine``)."""
    args = _check_argv(argv)
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env=_command_env(), pass_fds=tuple(pass_fds))
    except OSError as exc:
        raise CommandError(args, f"cannot start: {exc.strerror}") from None
    try:
        stdout, stderr = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        raise CommandTimeout(args, f"timed out after {timeout:g}s") from None
    result = CommandResult(args, proc.returncode, stdout, stderr)
    if check and not result.ok:
        raise CommandError(args, f"exit code {result.returncode}: {stderr.strip()}", result)
    return result


async def run_async(argv: Sequence[str], *, timeout: float, check: bool = False) -> CommandResult:
    """Run a command from the event loop without blocking it."""
    args = _check_argv(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, env=_command_env())
    except OSError as exc:
        raise CommandError(args, f"cannot start: {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise CommandTimeout(args, f"timed out after {timeout:g}s") from None
    except BaseException:
        _kill_group(proc.pid)
        await proc.wait()
        raise
    result = CommandResult(args, proc.returncode or 0, stdout.decode(errors="replace"),
                           stderr.decode(errors="replace"))
    if check and not result.ok:
        raise CommandError(args, f"exit code {result.returncode}: {result.stderr.strip()}",
                           result)
    return result


def _command_env() -> dict[str, str]:
    # A predictable environment: C locale for parseable output, sbin on PATH.
    env = {"LC_ALL": "C", "LANG": "C"}
    env["PATH"] = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return env
