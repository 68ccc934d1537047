"""The task child process: ``python -m vdsm_agent.tasks.child --task-dir DIR``.

One process per task, in its own session (process group), detached from the
agent: its stdout/stderr go to ``child.log`` in the task directory, never to
a pipe, so it outlives an agent restart. It reads ``spec.json``, runs the
kind (pre -> perform -> post, cleanup after a failure or cancel), keeps
``status.json`` fresh (heartbeat + progress), writes the task output, and at
the end records ``outcome.json`` atomically and durably. SIGTERM asks the work
to stop at its next ``check_cancel``.

A full state disk (its status or output cannot be written) stops the work at
its next ``check_cancel`` too, as failed with ``StorageFull``; the output that
could not be written is lost and counted. The outcome goes into room the agent
allocated before the task started; if even that fails, the process exits with
``files.EXIT_STORAGE_FULL`` and the agent records the failure.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.errors import Failure
from vdsm_agent.system import inhibit
from vdsm_agent.system.space import is_no_space
from vdsm_agent.tasks import files, output
from vdsm_agent.tasks.kinds import KINDS, priority
from vdsm_agent.tasks.kinds.base import Canceled, KindEnv, TaskFailure, TaskKind

# Progress samples kept for the rate estimate (udisks keeps a window too).
RATE_WINDOW = 10.0
# The rate looks back half the time the work has run (at most RATE_WINDOW), over at
# least RATE_MIN_SPAN seconds, and is given once RATE_WARMUP seconds have passed. A
# tool may claim much at once as it starts (qemu-img convert counts a chunk when it
# takes it, not when it is written: 18 MiB of a 64 MiB copy in 10 ms, then 8 MiB/s
# under -r 8M): measured from the start, that burst doubled the rate shown.
RATE_MIN_SPAN = 0.5
RATE_WARMUP = 1.0
# New progress reaches the status file at most this long after it is reported (the
# heartbeat alone may be slower: heartbeat_interval); a new total at once.
PROGRESS_INTERVAL = 0.25


def start_time(pid: int) -> float:
    """When ``pid`` started, computed as psutil does (start ticks / CLK_TCK + btime),
    so the agent's psutil-based identity check agrees. No psutil here: the child
    stays small and starts fast."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
        stat = stream.read()
    ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
    with open("/proc/stat", encoding="ascii") as stream:
        boot = next(float(line.split()[1]) for line in stream if line.startswith("btime"))
    return ticks / os.sysconf("SC_CLK_TCK") + boot


class ChildContext:
    """Implements ``kinds.base.TaskContext`` on top of the task directory."""

    def __init__(self, task_files: files.TaskFiles, spec: dict[str, Any]) -> None:
        self.files = task_files
        self.task_id: str = spec["taskID"]
        self.env = KindEnv(allowed_roots=tuple(spec.get("allowedRoots", ())),
                           io_rate_limit=int(spec.get("ioRateLimit", 0)),
                           task_id=self.task_id, task_dir=str(task_files.dir))
        self.heartbeat_interval = float(spec["heartbeatInterval"])
        self.writer = output.Writer(task_files.output, int(spec["outputMaxBytes"]))
        self.warnings: list[str] = []
        # What the work goes through outside the agent (report_external).
        self.external: dict[str, Any] = {}
        self.phase = "initializing"
        self._cancel = False
        # Set at the first write that failed for lack of space (what failed).
        self.storage_full: str | None = None
        self.lost_output = 0  # bytes of output that could not be written
        self._seq = 0
        self._last_beat = 0.0
        self._done = 0
        self._total: int | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._started: float | None = None  # when the work began reporting progress
        self._progressed = False  # progress not yet in the status file
        self._throttle_start = time.monotonic()
        self._throttled_bytes = 0
        self._pid = os.getpid()
        # The logind inhibitor lock's descriptor, open until the process exits.
        self.inhibitor: int | None = None
        self._create_time = start_time(self._pid)

    # -- signals and cancel -----------------------------------------------------

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self._cancel = True

    @property
    def cancel_requested(self) -> bool:
        return self._cancel

    def check_cancel(self) -> None:
        if self._cancel:
            raise Canceled()
        if self.storage_full is not None:
            raise errors.StorageFull(f"the state disk is full: {self.storage_full}")

    def write_failed(self, exc: OSError, what: str) -> None:
        """A write failed for lack of space: remember it (the work stops at its
        next check_cancel); other errors are raised."""
        if not is_no_space(exc):
            raise exc
        if self.storage_full is None:
            self.storage_full = f"cannot write the task's {what}: {exc.strerror or exc}"

    # -- heartbeat and progress ---------------------------------------------------

    def progress(self, done: int, total: int | None) -> None:
        changed_total = total != self._total
        self._done = max(self._done, done)
        self._total = total
        self._progressed = True
        self.heartbeat(force=changed_total)

    def heartbeat(self, force: bool = False) -> None:
        """Rewrite the status file when due: every heartbeat_interval, and within
        PROGRESS_INTERVAL of new progress (the work's loops call this often)."""
        now = time.monotonic()
        since = now - self._last_beat
        if force or since >= self.heartbeat_interval or (
                self._progressed and since >= PROGRESS_INTERVAL):
            self._last_beat = now
            self._progressed = False
            self._write_status(now)

    def report_external(self, **values: Any) -> None:
        """Tell the agent what the work goes through outside it (a Gluster task's ID):
        in the status file at once, kept in the task's record from then on."""
        self.external.update(values)
        self.heartbeat(force=True)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.heartbeat(force=True)

    def progress_report(self, now: float, final: bool = False) -> dict[str, Any]:
        """done, total, rate and eta; ``final``: the rate is the whole run's average."""
        if final and self._started is not None and now - self._started >= RATE_MIN_SPAN:
            return {"done": self._done, "total": self._total,
                    "rate": self._done / (now - self._started), "eta": None}
        samples = self._samples
        if self._started is None and (self._total is not None or self._done):
            self._started = now  # the work began (what came before is not its rate)
            samples.clear()
        samples.append((now, self._done))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        rate = eta = None
        elapsed = now - self._started if self._started is not None else 0.0
        if elapsed >= RATE_WARMUP:
            # The newest sample at least ``lookback`` old: half the run, so that what
            # was claimed at the start leaves the window as the run goes on.
            lookback = min(RATE_WINDOW, max(RATE_MIN_SPAN, elapsed / 2))
            base_time, base_done = samples[0]
            for at, done in samples:
                if now - at < lookback:
                    break
                base_time, base_done = at, done
            if now - base_time >= RATE_MIN_SPAN:
                rate = (self._done - base_done) / (now - base_time)
                if self._total is not None and rate > 0:
                    eta = max(self._total - self._done, 0) / rate
        return {"done": self._done, "total": self._total, "rate": rate, "eta": eta}

    def _write_status(self, now: float) -> None:
        self._seq += 1
        try:
            files.write_json_atomic(self.files.status, {
                "pid": self._pid,
                "createTime": self._create_time,
                "phase": self.phase,
                "seq": self._seq,
                "heartbeatAt": clock.now(),
                "progress": self.progress_report(now),
                **({"external": self.external} if self.external else {}),
            })
        except OSError as exc:
            self.write_failed(exc, "status")

    # -- output --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        before = self.writer.offset
        try:
            self.writer.write(data)
        except OSError as exc:
            self.write_failed(exc, "output")
            self.lost_output += len(data) - (self.writer.offset - before)

    def print(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.write(f"{stamp} {line}\n".encode("utf-8", "replace"))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.print(f"warning: {message}")

    # -- pacing --------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Sleep, heartbeating and honouring a cancel."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.check_cancel()
            time.sleep(min(left, 0.05, self.heartbeat_interval))
            self.heartbeat()

    def throttle(self, nbytes: int) -> None:
        """Keep data-moving work at or below the configured I/O rate."""
        limit = self.env.io_rate_limit
        if limit <= 0:
            return
        self._throttled_bytes += nbytes
        ahead = self._throttle_start + self._throttled_bytes / limit - time.monotonic()
        if ahead > 0:
            self.sleep(ahead)


def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, TaskFailure):
        return exc.to_error()
    if isinstance(exc, errors.RpcError):
        return exc.to_data()
    return errors.InternalError(f"{type(exc).__name__}: {exc}").to_data()


def _prepare(kind_cls: type[TaskKind], ctx: ChildContext, spec: dict[str, Any]) -> TaskKind:
    """Re-validate in the child (the world may have changed since the agent
    checked); the kind's instance, whose ``pre`` has not run yet."""
    params = spec["params"]
    kind_cls.validate(params, ctx.env)
    resources = kind_cls.resources(params, ctx.env)
    if sorted(resources) != sorted(spec.get("resources", [])):
        raise TaskFailure(Failure.RESOURCE_CHANGED,
                          f"the task now needs {resources}, not the locked "
                          f"{spec.get('resources')}")
    return kind_cls(params, ctx)


def run(ctx: ChildContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the task; the outcome to record."""
    kind_cls = KINDS.get(spec["kind"])
    if kind_cls is None:
        return {"state": "failed", "error": errors.UnknownTaskKind(
            f"no kind {spec['kind']!r}").to_data()}
    ctx.print(f"task {ctx.task_id} ({kind_cls.name}) starting, pid {os.getpid()}")
    # Niceness and I/O class: inherited by every tool the kind runs.
    running_at, problems = priority.apply(int(spec.get("nice", 0)),
                                          str(spec.get("ioniceClass", "none")))
    ctx.print(f"running at {running_at}")
    for problem in problems:
        ctx.warn(problem)
    kind: TaskKind | None = None
    try:
        kind = _prepare(kind_cls, ctx, spec)
        if kind.destructive:
            _hold_inhibitor(ctx, kind)
        # Inside the try with ``kind`` set: a pre() that fails half-way (after
        # creating a file, opening a device) is cleaned up like any failure.
        kind.pre()
        ctx.set_phase("running")
        result = kind.post(kind.perform())
    except Canceled:
        _cleanup(kind, ctx)
        ctx.print("canceled")
        return {"state": "canceled",
                "error": Failure.CANCELED.error("canceled on request")}
    except Exception as exc:
        if not isinstance(exc, TaskFailure | errors.RpcError):
            _print_traceback()
        _cleanup(kind, ctx)
        error = _failure(exc)
        ctx.print(f"failed: {error['name']}: {error.get('detail', '')}")
        return {"state": "failed", "error": error}
    ctx.print("done")
    return {"state": "done", "result": result}


def _hold_inhibitor(ctx: ChildContext, kind: TaskKind) -> None:
    """A logind lock that makes a reboot wait (or say why it cannot) while this
    process lives: its descriptor stays open until the process exits
    (system/inhibit.py). Without logind (no systemd, a container) the work goes on."""
    why = f"task {ctx.task_id}: {kind.name} {_target(kind.params)}".strip()
    try:
        ctx.inhibitor = inhibit.take(why)
    except inhibit.InhibitError as exc:
        ctx.print(f"no shutdown inhibitor lock: {exc}")
        return
    ctx.print(f"holding a shutdown inhibitor lock ({inhibit.WHAT}, {inhibit.MODE}) until "
              "the task ends")


def _target(params: Any) -> str:
    """What a task works on, for the lock's reason: its device or destination."""
    if not isinstance(params, dict):
        return ""
    for key in ("device", "destination", "path"):
        value = params.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return str(value["path"])
    return ""


def _cleanup(kind: TaskKind | None, ctx: ChildContext) -> None:
    if kind is None:
        return
    try:
        kind.cleanup()
    except Exception as exc:
        _print_traceback()
        ctx.warn(f"cleanup failed: {type(exc).__name__}: {exc}")


def _print_traceback() -> None:
    """To child.log, which is on the state disk: a full disk must not turn a
    failure into a crash without an outcome."""
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except OSError:
        pass


def record(ctx: ChildContext, outcome: dict[str, Any]) -> None:
    """Write the outcome durably: output first, then the outcome file (into the
    room the agent allocated for it). OSError if even that cannot be written."""
    if ctx.lost_output:
        ctx.warn(f"{ctx.lost_output} bytes of output were lost: {ctx.storage_full}")
    ctx.set_phase("finished")
    try:
        ctx.writer.flush()
    except OSError as exc:
        ctx.write_failed(exc, "output")
    ctx.writer.close()
    outcome = {
        **outcome,
        "warnings": ctx.warnings,
        **({"external": ctx.external} if ctx.external else {}),
        "endedAt": clock.now(),
        "progress": ctx.progress_report(time.monotonic(), final=True),
        "pid": os.getpid(),
    }
    files.write_json_atomic(ctx.files.outcome, outcome, durable=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdsm_agent.tasks.child")
    parser.add_argument("--task-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    task_files = files.TaskFiles(args.task_dir.resolve())
    spec = files.read_json(task_files.spec)
    if not isinstance(spec, dict):
        print(f"no readable spec in {task_files.spec}", file=sys.stderr)
        return 2
    os.chdir(task_files.dir)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctx = ChildContext(task_files, spec)
    signal.signal(signal.SIGTERM, ctx.on_term)
    ctx.heartbeat(force=True)
    try:
        record(ctx, run(ctx, spec))
    except OSError as exc:
        if is_no_space(exc):
            return files.EXIT_STORAGE_FULL
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
