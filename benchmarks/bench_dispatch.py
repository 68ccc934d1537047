"""In-process microbenchmark: ``Dispatcher.dispatch`` of one ``ping`` body.

The Dispatcher is built the way ``vdsm_agent.server.app`` builds it: the real
schema (compiled params validators), the real methods table and a real Agent
over a Store in a temporary state directory. The process is pinned to CPU 0
while measuring, like the HTTP servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import rpc_schema
from vdsm_agent import settings
from vdsm_agent.agent import Agent
from vdsm_agent.api import methods_table
from vdsm_agent.devices.inventory import Inventory
from vdsm_agent.server.jsonrpc import Dispatcher
from vdsm_agent.store import Store

PING = b'{"jsonrpc":"2.0","method":"ping","id":1}'


@dataclasses.dataclass(frozen=True)
class DispatchResult:
    body: str
    calls: int
    best_us: float  # best of the repeats, µs per call
    median_us: float


async def _measure(dispatcher: Dispatcher, body: bytes, calls: int, repeats: int) -> list[float]:
    dispatch = dispatcher.dispatch
    for _ in range(min(calls, 2000)):  # warm-up
        await dispatch(body)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            await dispatch(body)
        timings.append((time.perf_counter() - start) / calls * 1e6)
    return timings


async def _run(bodies: list[bytes], calls: int, repeats: int) -> list[DispatchResult]:
    with tempfile.TemporaryDirectory(prefix="vdsm-agent-bench-") as tmp:
        config = settings.defaults().replace(state_dir=tmp, unix_socket="none")
        store = await Store.open(Path(tmp) / "agent.db")
        try:
            schema = rpc_schema.load("agent")
            agent = Agent(config=config, schema=schema, store=store,
                          inventory=Inventory(config), started=time.monotonic())
            dispatcher = Dispatcher(schema, methods_table(), agent, max_batch=config.max_batch)
            answer = await dispatcher.dispatch(PING)
            if answer is None or b'"result"' not in answer:
                raise RuntimeError(f"ping did not succeed: {answer!r}")
            results = []
            for body in bodies:
                timings = sorted(await _measure(dispatcher, body, calls, repeats))
                results.append(DispatchResult(body=body.decode(), calls=calls,
                                              best_us=timings[0],
                                              median_us=timings[len(timings) // 2]))
            return results
        finally:
            await store.close()


def run(calls: int = 20_000, repeats: int = 5, bodies: list[bytes] | None = None,
        cpu: int | None = 0) -> list[DispatchResult]:
    """Time ``Dispatcher.dispatch`` for each body (default: one ping).

    The process is pinned to ``cpu`` while measuring (as the HTTP servers are),
    then given back its previous CPU set.
    """
    previous = os.sched_getaffinity(0)
    if cpu is not None and cpu in previous:
        os.sched_setaffinity(0, {cpu})
    try:
        return asyncio.run(_run(bodies or [PING], calls, repeats))
    finally:
        os.sched_setaffinity(0, previous)


def main() -> None:
    for result in run():
        print(f"{result.body}: best {result.best_us:.1f} µs/call, "
              f"median {result.median_us:.1f} µs/call ({result.calls} calls)")


if __name__ == "__main__":
    main()
