"""Device-operation tasks against the bare tools, alternating, in the same run.

* ``wipe``: a ``wipe`` task (zero) of a loop device against
  ``dd if=/dev/zero of=DEV oflag=direct bs=4M``; target: task throughput at
  least 0.9 of dd's.
* ``copy``: a ``copy`` task of a raw image file to a new raw file against
  ``qemu-img convert -p -f raw -O raw`` run by hand; target 0.95. The task
  adds ``-W`` (out-of-order writes) for raw destinations; a second row
  (``copy-W``, no target) compares with that same command line, which shows
  the task's own overhead (process start-up, checks, qemu-img info).
* ``checksum``: a ``checksum`` task (sha256) of a loop device against
  ``sha256sum DEV``; target 0.9.

The agent and its task processes run from compiled bytecode (a private
``PYTHONPYCACHEPREFIX``), as installed by the packages.

The loop devices are attached with ``--direct-io=on``: both the task and
the tool then write through to the disk (a plain loop device would absorb
O_DIRECT writes into the backing file's page cache, and the task's final
fsync would then pay for everyone). Task times are the task's own
``startedAt`` -> ``endedAt`` (its process start-up included); the caller's
startTask -> waitTask time is shown too. The agent runs with its default
settings (``task_nice`` 10, ``task_ionice_class`` idle).

A task pays a fixed start-up (its own process: spawn, imports, the device
checks; about 0.15-0.3 s on the project VM) that a bare tool does not; at
1 GiB this is most of the difference (see the copy-W row), at larger sizes
(``--size``) it fades.

``python -m benchmarks.bench_device_ops [--quick] [--only wipe,copy,checksum]
[--size MIB] [--rounds N] [--task-nice N] [--task-ionice-class C]``.
Needs root (loop devices), dd, qemu-img and sha256sum. ``main`` returns 0 when
every case ran and (at 1 GiB or more) met its target, 1 otherwise; ``--quick``
(256 MiB) is a smoke run whose ratios are shown but not enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import agents
from vdsm_agent.common import clock

MiB = 1024 * 1024
GiB = 1024 * MiB
CASES = ("wipe", "copy", "checksum")
# copy-W (the same argv as the task) is for information: the task's overhead alone.
TARGETS = {"wipe": 0.9, "copy": 0.95, "checksum": 0.9, "copy-W": 0.0}


class BenchError(Exception):
    pass


@dataclasses.dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    port: int

    def call(self, method: str, **params: Any) -> Any:
        return agents.call(self.port, method, params, timeout=3600, error=BenchError)

    def run(self, kind: str, **params: Any) -> tuple[dict[str, Any], float]:
        """Run a task to its end: the task and the caller's wall time."""
        began = time.perf_counter()
        task_id = self.call("startTask", kind=kind, params=params)["taskID"]
        while True:
            task = self.call("waitTask", taskID=task_id, timeout=600)
            if task["state"] in ("done", "failed", "canceled", "interrupted"):
                break
        elapsed = time.perf_counter() - began
        if task["state"] != "done":
            raise BenchError(f"{kind} task ended {task['state']}: {task['error']}")
        self.call("deleteTask", taskID=task_id)
        return task, elapsed


@contextlib.contextmanager
def agent_in(root: Path, flags: Sequence[str] = ()) -> Iterator[Agent]:
    port = agents.free_port()
    argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(root / "state"),
            "--listen", f"127.0.0.1:{port}", "--unix-socket", "none",
            "--allowed-root", str(root / "images"), "--log-level", "warning",
            "--loopback-role", "admin", *flags]  # loopback TCP callers are anonymous
    # Compiled bytecode, as the packages install it: with PYTHONDONTWRITEBYTECODE
    # (set in some development shells) every task process would compile every
    # module it imports again (~0.2 s of CPU per task here). Kept out of the tree.
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(root / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with open(root / "agent.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    agent = Agent(proc, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise BenchError(f"agent exited with {proc.returncode}")
            with contextlib.suppress(BenchError, OSError):
                agent.call("ping")
                break
            if time.monotonic() > deadline:
                raise BenchError("agent not ready")
            time.sleep(0.05)
        yield agent
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    # On the disk (not a tmpfs /tmp): the loop devices' data must really be written.
    base = os.environ.get("BENCH_DIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    root = Path(tempfile.mkdtemp(prefix="bench-device-ops-", dir=base))
    (root / "images").mkdir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def loop_device(image: Path, read_only: bool = False) -> Iterator[str]:
    argv = ["losetup", "--find", "--show", "--direct-io=on",
            *(["--read-only"] if read_only else []), "--", str(image)]
    device = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def make_data(path: Path, size: int) -> None:
    """Non-zero, non-repeating-enough data (qemu-img must copy every block)."""
    block = os.urandom(4 * MiB)
    with open(path, "wb") as stream:
        for _ in range(size // len(block)):
            stream.write(block[:-8] + os.urandom(8))


def task_seconds(task: dict[str, Any]) -> float:
    return clock.parse_rfc3339(task["endedAt"]) - clock.parse_rfc3339(task["startedAt"])


def timed(argv: Sequence[str]) -> float:
    began = time.perf_counter()
    subprocess.run(list(argv), check=True, capture_output=True)
    return time.perf_counter() - began


@dataclasses.dataclass
class CaseResult:
    name: str
    size: int
    tool: str
    tool_s: list[float]
    task_s: list[float]  # the task's startedAt -> endedAt
    caller_s: list[float]  # startTask -> waitTask

    @property
    def ratio(self) -> float:
        """Task throughput over the tool's (1.0: as fast; above: faster)."""
        return statistics.median(self.tool_s) / statistics.median(self.task_s)

    @property
    def target(self) -> float:
        return TARGETS[self.name]


def alternate(rounds: int, tool: Callable[[], float],
              task: Callable[[], tuple[float, float]]) -> tuple[list[float], list[float],
                                                               list[float]]:
    tool_s: list[float] = []
    task_s: list[float] = []
    caller_s: list[float] = []
    for index in range(rounds):
        # Alternate who goes first, so neither always meets a warmer cache.
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                tool_s.append(tool())
            else:
                work, caller = task()
                task_s.append(work)
                caller_s.append(caller)
    return tool_s, task_s, caller_s


def bench_wipe(root: Path, agent: Agent, size: int, rounds: int) -> CaseResult:
    image = root / "wipe.img"
    with open(image, "wb") as stream:
        stream.truncate(size)
    with loop_device(image) as device:
        def tool() -> float:
            return timed(["dd", "if=/dev/zero", f"of={device}", "oflag=direct", "bs=4M",
                          f"count={size // (4 * MiB)}", "status=none"])

        def task() -> tuple[float, float]:
            done, caller = agent.run("wipe", device=device)
            if done["result"]["bytes"] != size:
                raise BenchError(f"wipe wiped {done['result']['bytes']} bytes")
            return task_seconds(done), caller

        tool_s, task_s, caller_s = alternate(rounds, tool, task)
    image.unlink()
    return CaseResult("wipe", size, "dd oflag=direct bs=4M", tool_s, task_s, caller_s)


def bench_copy(root: Path, agent: Agent, size: int, rounds: int,
               same_argv: bool = False) -> CaseResult:
    """Against ``qemu-img convert -p`` as an administrator would type it, or (with
    ``same_argv``) against the task's own command line (``-W`` included): the
    latter isolates the task's own overhead."""
    source = root / "images" / "source.img"
    if not source.exists():
        make_data(source, size)
    destination = root / "images" / "copy.img"
    argv = ["qemu-img", "convert", "-p", *(["-W"] if same_argv else []), "-f", "raw",
            "-O", "raw", "--", str(source), str(destination)]

    def tool() -> float:
        destination.unlink(missing_ok=True)
        return timed(argv)

    def task() -> tuple[float, float]:
        destination.unlink(missing_ok=True)
        done, caller = agent.run("copy", source=str(source), destination=str(destination))
        return task_seconds(done), caller

    timed(["cat", str(source)])  # the same page-cache state for both
    tool_s, task_s, caller_s = alternate(rounds, tool, task)
    destination.unlink(missing_ok=True)
    if same_argv:
        source.unlink()
        return CaseResult("copy-W", size, "qemu-img convert -p -W", tool_s, task_s, caller_s)
    return CaseResult("copy", size, "qemu-img convert -p", tool_s, task_s, caller_s)


def bench_checksum(root: Path, agent: Agent, size: int, rounds: int) -> CaseResult:
    image = root / "sum.img"
    make_data(image, size)
    with loop_device(image, read_only=True) as device:
        expected = subprocess.run(["sha256sum", device], check=True, capture_output=True,
                                  text=True).stdout.split()[0]

        def tool() -> float:
            return timed(["sha256sum", device])

        def task() -> tuple[float, float]:
            done, caller = agent.run("checksum", path=device)
            if done["result"]["checksum"] != expected:
                raise BenchError("the checksum task disagrees with sha256sum")
            return task_seconds(done), caller

        tool_s, task_s, caller_s = alternate(rounds, tool, task)
    image.unlink()
    return CaseResult("checksum", size, "sha256sum", tool_s, task_s, caller_s)


def warm_up(root: Path, agent: Agent) -> None:
    """One small task first: its process compiles and caches every module's bytecode."""
    image = root / "images" / "warm.img"
    make_data(image, 4 * MiB)
    agent.run("checksum", path=str(image))
    image.unlink()


def machine_line() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")), model)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs ({model}), "
            f"kernel {platform.release()}, Python {platform.python_version()}, load {load}")


def report(results: Sequence[CaseResult], settings: str, enforce: bool) -> None:
    print(machine_line())
    print(f"task settings: {settings}" + ("" if enforce else "; targets not enforced "
                                              "(a smoke run: too small for them)"))
    print(f"{'case':<9} {'size':>9} {'tool':<22} {'tool s':>8} {'task s':>8} "
          f"{'caller s':>8} {'MiB/s tool/task':>16} {'ratio':>6} {'target':>6}")
    for result in results:
        tool = statistics.median(result.tool_s)
        task = statistics.median(result.task_s)
        caller = statistics.median(result.caller_s)
        speeds = f"{result.size / MiB / tool:.0f}/{result.size / MiB / task:.0f}"
        verdict = ("info" if not result.target or not enforce
                   else "ok" if result.ratio >= result.target else "LOW")
        print(f"{result.name:<9} {result.size // MiB:>5} MiB {result.tool:<22} {tool:>8.2f} "
              f"{task:>8.2f} {caller:>8.2f} {speeds:>16} {result.ratio:>6.2f} "
              f"{result.target:>5.2f} {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_device_ops",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB instead of 1 GiB, 2 rounds instead of 3")
    parser.add_argument("--only", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--size", type=int, metavar="MIB",
                        help="data size in MiB (default 1024, --quick 256)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3, --quick 2)")
    parser.add_argument("--task-nice", type=int,
                        help="the agent's task_nice (default: the agent's default, 10)")
    parser.add_argument("--task-ionice-class", choices=("idle", "best-effort", "none"),
                        help="the agent's task_ionice_class (default: idle)")
    args = parser.parse_args(argv)
    only = [case for case in CASES if case in set(args.only.split(","))]
    unknown = set(args.only.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    if os.geteuid() != 0:
        print("bench_device_ops: needs root (loop devices)", file=sys.stderr)
        return 1
    for tool in ("dd", "qemu-img", "sha256sum", "losetup"):
        if shutil.which(tool) is None:
            print(f"bench_device_ops: {tool} is not installed", file=sys.stderr)
            return 1
    size = (args.size * MiB if args.size else 256 * MiB if args.quick else GiB)
    size -= size % (4 * MiB)
    rounds = args.rounds or (2 if args.quick else 3)
    benches = {"wipe": bench_wipe, "copy": bench_copy, "checksum": bench_checksum}
    flags: list[str] = []
    if args.task_nice is not None:
        flags += ["--task-nice", str(args.task_nice)]
    if args.task_ionice_class is not None:
        flags += ["--task-ionice-class", args.task_ionice_class]
    results: list[CaseResult] = []
    try:
        with workdir() as root, agent_in(root, flags) as agent:
            warm_up(root, agent)
            for case in only:
                results.append(benches[case](root, agent, size, rounds))
                if case == "copy":
                    results.append(bench_copy(root, agent, size, rounds, same_argv=True))
    except (BenchError, subprocess.CalledProcessError, OSError) as exc:
        print(f"bench_device_ops: {exc}", file=sys.stderr)
        return 1
    # Targets hold for full-size runs; with --quick (or a small --size) the
    # task's fixed start-up dominates and the run is a smoke test only.
    enforce = size >= GiB
    report(results, " ".join(flags) or "agent defaults (task_nice 10, ionice idle)", enforce)
    if not enforce:
        return 0
    return 0 if all(result.ratio >= result.target for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
