"""What a resync of an unchanged host costs a real agent (issue 18, point 2).

One agent process (pinned to core 0) holding ``--tasks`` finished tasks and
one managed ``file://`` connection; this process, on core 1, resyncs it as
the engine does (``HostWorker.resync``): ``listTasks`` (page size 1000) and
``getStorageConnectionList`` at once, ``--rounds`` times, with the engine's own
client (``AgentClient``: its pool keeps the connections alive) through a
loopback relay that counts the bytes. Two modes, alternating in blocks so that drift hits both:

* **conditional**: each call passes the ``changeToken`` of the first answer
  as ``changedSince`` (the engine's steady state for a quiet host): both
  answer ``notModified``;
* **full**: the old resync, every task and connection each time.

Per resync: the agent's CPU (user + system from /proc, over all rounds,
divided) and the bytes on the wire (requests and responses, HTTP headers
included). Targets: ≤ 0.3 ms of agent CPU and ≤ 1 KB for the conditional
resync.

    python -m benchmarks.bench_resync [--tasks 100] [--rounds 2000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.agents import agent_argv, call, free_port
from benchmarks.bench_http import BenchError, cpu_seconds, server
from vdsm_agent.engine.agentclient import AgentClient

TARGET_CPU_MS = 0.3
TARGET_BYTES = 1024
BLOCKS = 4  # blocks of each mode, alternating


@dataclasses.dataclass
class ModeResult:
    name: str
    resyncs: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    bytes: int = 0

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s / self.resyncs * 1000

    @property
    def bytes_each(self) -> float:
        return self.bytes / self.resyncs


class CountingProxy(threading.Thread):
    """A loopback TCP relay to the agent that counts the bytes of both directions:
    the bytes on the wire of the engine's own client, HTTP headers included."""

    def __init__(self, target: int) -> None:
        super().__init__(name="proxy", daemon=True)
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.bytes = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                with self._lock:
                    self.bytes += len(chunk)
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


async def resync(client: AgentClient, tokens: tuple[str, str] | None) -> tuple[str, str]:
    """One resync as the engine's worker does it (``HostWorker.resync``: both lists at
    once, with its client); (tasks token, connections token)."""
    params: dict[str, Any] = {"pageSize": 1000}
    if tokens:
        params["changedSince"] = tokens[0]

    async def tasks() -> dict[str, Any]:
        page: dict[str, Any] = await client.call("listTasks", params)
        first = page
        while page.get("nextPageToken"):
            page = await client.call("listTasks", {"pageSize": 1000,
                                                   "pageToken": page["nextPageToken"]})
        return first

    page, listing = await asyncio.gather(tasks(), client.call(
        "getStorageConnectionList", {"changedSince": tokens[1] if tokens else ""}))
    if tokens and not (page.get("notModified") and listing.get("notModified")):
        raise BenchError("the unchanged host answered modified")
    return page["changeToken"], listing["changeToken"]


def seed(port: int, images: Path, tasks: int) -> None:
    for _ in range(tasks):
        call(port, "startTask", {"kind": "test.sleep", "params": {"seconds": 0}}, timeout=30,
             error=BenchError)
    export = images / "export"
    export.mkdir(exist_ok=True)
    call(port, "manageStorageConnection", {"uri": f"file://{export}", "connectionID": "sd-1"},
         timeout=30, error=BenchError)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = call(port, "listTasks", {"pageSize": 1000, "filter": {
            "state": ["accepted", "initializing", "running", "stale"]}}, timeout=30,
            error=BenchError)
        connection = call(port, "getStorageConnection", {"connectionID": "sd-1"}, timeout=30,
                          error=BenchError)
        if not listing["tasks"] and connection["state"] == "connected":
            return
        time.sleep(0.2)
    raise BenchError("the seeded tasks did not finish")


def measure(tasks: int, rounds: int) -> tuple[ModeResult, ModeResult]:
    with tempfile.TemporaryDirectory(prefix="bench-resync-") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        port = free_port()
        argv = agent_argv(root / "state", port, images, "warning")
        with server("agent", argv, port, root) as pid:
            seed(port, images, tasks)
            proxy = CountingProxy(port)
            proxy.start()
            try:
                return asyncio.run(_rounds(pid, proxy, rounds))
            finally:
                proxy.close()


async def _rounds(pid: int, proxy: CountingProxy, rounds: int) -> tuple[ModeResult, ModeResult]:
    client = AgentClient(f"http://127.0.0.1:{proxy.port}/jsonrpc", connect_timeout=5,
                         request_timeout=30)
    try:
        tokens = await resync(client, None)
        results = {"conditional": ModeResult("conditional"), "full": ModeResult("full")}
        per_block = max(rounds // BLOCKS, 1)
        for block in range(BLOCKS * 2):
            name = ("conditional", "full")[(block + block // 2) % 2]
            result = results[name]
            sent = proxy.bytes
            cpu = cpu_seconds(pid) or 0.0
            began = time.perf_counter()
            for _ in range(per_block):
                await resync(client, tokens if name == "conditional" else None)
            result.wall_s += time.perf_counter() - began
            result.cpu_s += (cpu_seconds(pid) or 0.0) - cpu
            await asyncio.sleep(0.05)  # the relay has counted the last answer
            result.bytes += proxy.bytes - sent
            result.resyncs += per_block
        return results["conditional"], results["full"]
    finally:
        await client.close()


def report(tasks: int, conditional: ModeResult, full: ModeResult) -> bool:
    print(f"\nResync of an unchanged host: a real agent with {tasks} finished tasks and 1 "
          f"managed connection (agent on core 0, caller on core 1)")
    print(f"{'mode':>12} {'resyncs':>8} {'agent CPU/resync':>17} {'bytes/resync':>13} "
          f"{'wall/resync':>12}")
    for result in (conditional, full):
        print(f"{result.name:>12} {result.resyncs:>8} {result.cpu_ms:>14.3f} ms "
              f"{result.bytes_each:>13.0f} {result.wall_s / result.resyncs * 1000:>9.3f} ms")
    cpu_ok = conditional.cpu_ms <= TARGET_CPU_MS
    bytes_ok = conditional.bytes_each <= TARGET_BYTES
    print(f"target: agent CPU <= {TARGET_CPU_MS} ms: {conditional.cpu_ms:.3f} ms "
          f"{'met' if cpu_ok else 'MISSED'}; bytes <= {TARGET_BYTES}: "
          f"{conditional.bytes_each:.0f} {'met' if bytes_ok else 'MISSED'}")
    return cpu_ok and bytes_ok


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.__main__ import machine_line

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_resync",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100, help="finished tasks (default 100)")
    parser.add_argument("--rounds", type=int, default=2000,
                        help="resyncs of each mode (default 2000)")
    parser.add_argument("--check", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--quick", action="store_true", help="10 tasks, 200 rounds")
    args = parser.parse_args(argv)
    tasks, rounds = (10, 200) if args.quick else (args.tasks, args.rounds)
    print(machine_line())
    try:
        conditional, full = measure(tasks, rounds)
    except BenchError as exc:
        print(f"bench resync: {exc}", file=sys.stderr)
        return 1
    met = report(tasks, conditional, full)
    return 3 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
