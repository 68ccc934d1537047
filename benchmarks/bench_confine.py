"""What confinement by descriptor costs startTask: the new resolution against the old.

The old resolution (``os.path.realpath``, a prefix check, ``stat``, then an
open and ``lseek`` for the size: a copy of it lives here and nowhere else)
against the new one (``vdsm_agent.system.confine``: ``openat2`` beneath a
descriptor of the root, ``fstat`` of the result), both as ``checksum``'s
submit-time checks (``validate`` then ``resources``) in a real agent:

* ``startTask``: throughput of ``startTask(checksum)`` with wrk (agent on CPU
  0, wrk on CPU 1, 16 connections, one call per request), every call on a
  file of its own (a task locks its file) among sparse 1 MiB images, tasks
  kept queued behind one blocker (so this is the checks and the durable
  insert, not process start-up). Both variants run through the same entry
  point (``serve old|new``, which patches the old checks into ``Checksum``
  for ``old``), a fresh agent per run, in alternating rounds (the order
  swapped each round). Target: the new resolution costs less than 5% of the
  throughput (new/old >= 0.95, the ratio of the medians).
* ``resolve``: the two checks alone, in this process, per call (µs), for the
  record.

``python -m benchmarks.bench_confine [--quick] [--rounds N] [--duration S]``;
main returns 0 when the target is met, 3 when missed, 2 when wrk or taskset is
missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import stat
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import agents, bench_http
from benchmarks.agents import free_port, kill_task_processes, spawn
from vdsm_agent import errors
from vdsm_agent.tasks.kinds import KindEnv, checksum
from vdsm_agent.tasks.kinds.checksum import Checksum

MiB = 1024 * 1024
TARGET = 0.95  # new/old startTask throughput
CHECKSUM_LUA = Path(__file__).with_name("start_checksum.lua")
CONNECTIONS = 16
VARIANTS = ("old", "new")


class BenchError(Exception):
    pass


# -- the old resolution (before issue 15), kept here only to measure against ------------------

DEV = "/dev/"


@dataclasses.dataclass(frozen=True)
class OldTarget:
    kind: str
    path: str  # fully resolved

    @property
    def resource(self) -> str:
        return f"{self.kind}:{self.path}"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def old_resolve(path: str, allowed_roots: tuple[str, ...], field: str) -> OldTarget:
    if "\0" in path or not path.startswith("/"):
        raise errors.InvalidParams("must be an absolute path", field=field, rule="path")
    real = os.path.realpath(path)
    if _within(real, DEV.rstrip("/")):
        mode = os.stat(real).st_mode
        if not stat.S_ISBLK(mode):
            raise errors.PathNotAllowed(f"{path} is not a block device", field=field)
        return OldTarget("device", real)
    roots = tuple(os.path.realpath(root) for root in allowed_roots)
    if not any(_within(real, root) for root in roots):
        raise errors.PathNotAllowed(
            f"{path} is not under an allowed root (configured: {', '.join(roots) or 'none'})",
            field=field, path=path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise errors.InvalidParams(f"{path} does not exist", field=field,
                                   rule="exists") from None
    if not stat.S_ISREG(mode):
        raise errors.InvalidParams(f"{path} is not a regular file", field=field,
                                   rule="regularFile")
    return OldTarget("file", real)


def old_size_of(target: OldTarget) -> int:
    try:
        fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.InvalidParams(f"cannot open {target.path}: {exc.strerror or exc}",
                                   rule="open", path=target.path) from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def old_validate(cls: type[Checksum], params: dict[str, Any], env: KindEnv) -> None:
    size = old_size_of(old_resolve(params["path"], env.allowed_roots, "params.params.path"))
    checksum.check_range(params, size)


def old_resources(cls: type[Checksum], params: dict[str, Any], env: KindEnv) -> list[str]:
    return [old_resolve(params["path"], env.allowed_roots, "params.params.path").resource]


def use_old_resolution() -> None:
    """Make ``Checksum``'s submit-time checks the old ones (in this process)."""
    setattr(Checksum, "validate", classmethod(old_validate))  # noqa: B010 - a patch
    setattr(Checksum, "resources", classmethod(old_resources))  # noqa: B010 - a patch


def serve(variant: str, agent_argv: list[str]) -> int:
    """The agent, with the ``variant`` checks (``python -m benchmarks.bench_confine
    serve old|new -- ARGS``)."""
    from vdsm_agent import main as agent_main

    if variant == "old":
        use_old_resolution()
    return agent_main.main(agent_argv)


# -- the measurements -----------------------------------------------------------------------


def make_images(directory: Path, count: int) -> None:
    """``count`` sparse 1 MiB image files, ``f-0.img`` ... (real files on a real fs)."""
    directory.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        fd = os.open(directory / f"f-{number}.img", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, MiB)
        finally:
            os.close(fd)


@dataclasses.dataclass
class Run:
    variant: str
    round: int
    tasks_per_s: float
    p99_ms: float
    cpu_us_per_task: float | None


@contextlib.contextmanager
def agent_serving(variant: str, root: Path, images: Path) -> Iterator[tuple[int, int]]:
    """A fresh agent (state dir of its own) on CPU 0 running ``variant``, its one run
    slot held by a blocker; (port, pid)."""
    state = Path(tempfile.mkdtemp(prefix=f"{variant}-state-", dir=root))
    port = free_port()
    argv = ["taskset", "-c", bench_http.SERVER_CPU, sys.executable, "-m",
            "benchmarks.bench_confine", "serve", variant, "--",
            *agents.agent_argv(state, port, images, "warning", max_running_tasks=1,
                               max_queued_tasks=1_000_000)[3:]]
    proc = spawn(argv, root / f"agent-{variant}-{port}.log")
    try:
        deadline = time.monotonic() + 60
        while not agents.healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the {variant} agent did not start (see its log in {root})")
            time.sleep(0.02)
        agents.call(port, "startTask", {"kind": "test.sleep", "params": {"seconds": 3600}},
                    timeout=30, error=BenchError)
        yield port, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        kill_task_processes((str(state),))
        shutil.rmtree(state, ignore_errors=True)


def measure(variant: str, number: int, root: Path, images: Path, seconds: float,
            warmup: float, per_run: int) -> Run:
    with agent_serving(variant, root, images) as (port, pid):
        warm = bench_http.run_wrk(port, warmup, CONNECTIONS, script=CHECKSUM_LUA,
                                  script_args=[str(images), "0"])
        measured = bench_http.run_wrk(port, seconds, CONNECTIONS, pid=pid,
                                      script=CHECKSUM_LUA,
                                      script_args=[str(images), str(per_run // 4)])
    for run in (warm, measured):
        if run.errors:
            raise BenchError(f"{variant}: {run.errors} startTask errors (too few image files "
                             "for this rate? see --files)")
    return Run(variant, number, measured.requests_per_s, measured.p99_ms,
               measured.cpu_us_per_request)


def resolve_cost(images: Path, calls: int) -> dict[str, float]:
    """µs per validate+resources of one checksum, in this process, each variant."""
    env = KindEnv(allowed_roots=(str(images),))
    params = {"path": str(images / "f-0.img"), "algorithm": "sha256", "offset": 0,
              "force": False}

    def old() -> None:
        old_validate(Checksum, params, env)
        old_resources(Checksum, params, env)

    def new() -> None:
        Checksum.validate(params, env)
        Checksum.resources(params, env)

    checks: dict[str, Callable[[], None]] = {"old": old, "new": new}
    best: dict[str, float] = {}
    for _ in range(5):
        for variant, check in checks.items():
            began = time.perf_counter()
            for _ in range(calls):
                check()
            took = (time.perf_counter() - began) / calls * 1e6
            best[variant] = min(best.get(variant, took), took)
    return best


def report(runs: list[Run], cost: dict[str, float], seconds: float) -> float:
    print(f"\nstartTask(checksum), wrk -t1 -c{CONNECTIONS} -d{seconds:g}s, a fresh agent per "
          "run (CPU 0; wrk on CPU 1), alternating")
    header = f"{'round':>5} {'variant':<7} {'tasks/s':>9} {'p99 ms':>7} {'CPU µs/task':>11}"
    print(header)
    print("-" * len(header))
    for run in runs:
        cpu = "-" if run.cpu_us_per_task is None else f"{run.cpu_us_per_task:.0f}"
        print(f"{run.round:>5} {run.variant:<7} {run.tasks_per_s:>9,.0f} {run.p99_ms:>7.2f} "
              f"{cpu:>11}")
    medians = {variant: statistics.median(run.tasks_per_s for run in runs
                                          if run.variant == variant) for variant in VARIANTS}
    ratio = medians["new"] / medians["old"]
    paired = [new.tasks_per_s / old.tasks_per_s for old, new in zip(
        [run for run in runs if run.variant == "old"],
        [run for run in runs if run.variant == "new"], strict=True)]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"new/old: {ratio:.3f} (medians {medians['new']:,.0f} / {medians['old']:,.0f} "
          f"tasks/s; per round {', '.join(f'{value:.3f}' for value in paired)}); cost "
          f"{(1 - ratio) * 100:+.1f}% of throughput; target < 5%: {verdict}")
    print(f"validate+resources alone, best of 5: old {cost['old']:.1f} µs, new "
          f"{cost['new']:.1f} µs per startTask")
    return ratio


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        variant, rest = argv[1], argv[argv.index("--") + 1:]
        return serve(variant, rest)
    parser = argparse.ArgumentParser(prog="benchmarks.bench_confine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 4)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 8)")
    parser.add_argument("--files", type=int, default=120_000,
                        help="image files (each startTask takes one; default 120,000)")
    args = parser.parse_args(argv)
    try:
        bench_http.check_tools()
    except bench_http.BenchError as exc:
        print(f"bench_confine: {exc}", file=sys.stderr)
        return 2
    rounds = args.rounds or (2 if args.quick else 4)
    seconds = args.duration or (3.0 if args.quick else 8.0)
    root = Path(tempfile.mkdtemp(prefix="bench-confine-"))
    try:
        images = root / "images"
        make_images(images, args.files)
        cost = resolve_cost(images, 2_000 if args.quick else 20_000)
        runs = []
        for number in range(1, rounds + 1):
            order = VARIANTS if number % 2 else tuple(reversed(VARIANTS))
            for variant in order:
                print(f"  round {number}: {variant} ...", file=sys.stderr, flush=True)
                runs.append(measure(variant, number, root, images, seconds, 1.0, args.files))
        runs.sort(key=lambda run: (run.round, VARIANTS.index(run.variant)))
        ratio = report(runs, cost, seconds)
    except BenchError as exc:
        print(f"bench_confine: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ratio >= TARGET else 3


if __name__ == "__main__":
    sys.exit(main())
