"""HTTP benchmark: ``ping`` against the real agent versus a bare aiohttp handler.

Both servers run as subprocesses pinned to core 0 (``taskset -c 0``); wrk is
pinned to core 1 (``taskset -c 1 wrk -t1 -c32 --latency``) and POSTs
``{"jsonrpc":"2.0","method":"ping","id":1}`` (``post.lua``). After one warm-up
run per server, the two are measured in alternating rounds so that drift in
the machine's load hits both alike. Each round gives requests/s, latency p50
and p99 and the server's CPU time per request (from ``/proc/PID/stat``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from benchmarks.agents import free_port

POST_LUA = Path(__file__).with_name("post.lua")
ROOT = Path(__file__).resolve().parents[1]  # servers run from here: ``-m benchmarks...``
PING = b'{"jsonrpc":"2.0","method":"ping","id":1}'
SERVER_CPU = "0"
LOAD_CPU = "1"


class BenchError(RuntimeError):
    """The benchmark cannot run or produced nonsense; the message says why."""


@dataclasses.dataclass(frozen=True)
class WrkRun:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors plus non-2xx answers
    cpu_us_per_request: float | None


@dataclasses.dataclass(frozen=True)
class Summary:
    name: str
    runs: tuple[WrkRun, ...]

    @property
    def rps(self) -> list[float]:
        return [run.requests_per_s for run in self.runs]

    @property
    def median_rps(self) -> float:
        return statistics.median(self.rps)

    def median_of(self, field: Callable[[WrkRun], float | None]) -> float | None:
        values = [value for value in map(field, self.runs) if value is not None]
        return statistics.median(values) if values else None


@dataclasses.dataclass(frozen=True)
class HttpResult:
    rpc: Summary
    bare: Summary
    connections: int
    duration_s: float

    @property
    def ratio(self) -> float:
        """Median rpc req/s over median bare req/s."""
        return self.rpc.median_rps / self.bare.median_rps

    @property
    def paired_ratios(self) -> list[float]:
        """rpc/bare per round (the two runs of a round are back to back)."""
        return [rpc.requests_per_s / bare.requests_per_s
                for rpc, bare in zip(self.rpc.runs, self.bare.runs, strict=True)]


def check_tools() -> None:
    """Raise BenchError unless wrk, taskset and two CPUs are available."""
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        raise BenchError(
            f"{' and '.join(missing)} not found on PATH: the HTTP benchmark needs them "
            "(Debian: apt-get install wrk util-linux)")
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        raise BenchError(f"needs CPUs 0 and 1 (server on 0, wrk on 1); usable: {sorted(cpus)}")


def _post_ping(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("POST", "/jsonrpc", body=PING, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, name: str, log: Path,
                timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}; log:\n{log.read_text()}")
        try:
            status, body = _post_ping(port)
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{name} not answering on port {port} after {timeout}s"
                                 ) from None
            time.sleep(0.05)
            continue
        answer = json.loads(body)
        if status != 200 or "result" not in answer or answer.get("id") != 1:
            raise BenchError(f"{name} answered ping with {status}: {body!r}")
        return


@contextlib.contextmanager
def server(name: str, argv: Sequence[str], port: int, workdir: Path,
           cpus: str = SERVER_CPU) -> Iterator[int]:
    """Start ``argv`` pinned to ``cpus``; yield its pid once it answers ping; stop it
    afterwards."""
    log = workdir / f"{name}.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(["taskset", "-c", cpus, *argv], cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, port, name, log)
        yield proc.pid  # taskset execs the command: same pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process, from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> tuple[float, float, float, int, int]:
    """Requests/s, p50 ms, p99 ms, requests and errors from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"cannot parse wrk output:\n{output}")
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return (float(rps.group(1)), _latency_ms(p50.group(1)), _latency_ms(p99.group(1)),
            int(total.group(1)), errors)


def run_wrk(port: int, duration_s: float, connections: int, pid: int | None = None,
            script: Path = POST_LUA, script_args: Sequence[str] = ()) -> WrkRun:
    """One wrk run on the load CPU; CPU per request measured on ``pid`` if given.
    A line ``ERROR ...`` printed by the script counts as an error."""
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}",
            f"-d{max(1, round(duration_s))}s", "--latency", "-s", str(script),
            f"http://127.0.0.1:{port}/jsonrpc"]
    if script_args:
        argv += ["--", *script_args]
    cpu_before = cpu_seconds(pid) if pid is not None else None
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    cpu_after = cpu_seconds(pid) if pid is not None else None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    rps, p50, p99, total, errors = parse_wrk(done.stdout)
    errors += done.stdout.count("\nERROR ") + done.stdout.startswith("ERROR ")
    cpu_us = None
    if cpu_before is not None and cpu_after is not None and total:
        cpu_us = (cpu_after - cpu_before) / total * 1e6
    return WrkRun(requests_per_s=rps, p50_ms=p50, p99_ms=p99, requests=total, errors=errors,
                  cpu_us_per_request=cpu_us)


def run(rounds: int = 4, duration_s: float = 10.0, warmup_s: float = 3.0,
        connections: int = 32, progress: Callable[[str], None] | None = None) -> HttpResult:
    """Measure the agent and the bare handler in ``rounds`` alternating rounds."""
    check_tools()
    say = progress or (lambda _: None)
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="vdsm-agent-bench-") as tmp:
        workdir = Path(tmp)
        rpc_port, bare_port = free_port(), free_port()
        rpc_argv = [python, "-m", "vdsm_agent.main", "--state-dir", str(workdir / "state"),
                    "--listen", f"127.0.0.1:{rpc_port}", "--unix-socket", "none"]
        bare_argv = [python, "-m", "benchmarks.bare_server", "--port", str(bare_port)]
        with server("rpc", rpc_argv, rpc_port, workdir) as rpc_pid, \
                server("bare", bare_argv, bare_port, workdir) as bare_pid:
            servers = (("rpc", rpc_port, rpc_pid), ("bare", bare_port, bare_pid))
            for name, port, _ in servers:
                say(f"warm-up {name} ({warmup_s:g}s)")
                run_wrk(port, warmup_s, connections)
            runs: dict[str, list[WrkRun]] = {"rpc": [], "bare": []}
            for index in range(rounds):
                # Alternate which server goes first, so neither always follows the other.
                order = servers if index % 2 == 0 else servers[::-1]
                for name, port, pid in order:
                    result = run_wrk(port, duration_s, connections, pid)
                    if result.errors:
                        raise BenchError(f"{name}: {result.errors} errors in round {index + 1}")
                    runs[name].append(result)
                    say(f"round {index + 1}/{rounds} {name}: {result.requests_per_s:,.0f} req/s,"
                        f" p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")
    return HttpResult(rpc=Summary("rpc", tuple(runs["rpc"])),
                      bare=Summary("bare", tuple(runs["bare"])),
                      connections=connections, duration_s=duration_s)
