"""Running a daemon (the agent's or the engine's) until SIGTERM/SIGINT.

Under systemd (``Type=notify``, docs/packaging.md) the daemon says READY once
its listeners are up (and, for the agent, its tasks re-attached: that is part
of starting the application), STOPPING when it is asked to stop, and feeds
the watchdog from its event loop (``system/sdnotify.py``).
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from vdsm_agent import __version__
from vdsm_agent.logs import StormLog
from vdsm_agent.server.listeners import ListenError
from vdsm_agent.system.sdnotify import Notifier

# systemd's notification socket and watchdog, taken out of the environment by
# run_daemon before anything starts a process (one per daemon process).
_notifier = Notifier(None)


async def serve_until_signalled(runner: web.AppRunner, log: logging.Logger, prog: str,
                                urls: list[str], how_to_reach: str) -> None:
    """Stop on SIGTERM/SIGINT; say where ``runner`` serves (log, and stderr for people);
    wait for the signal, then clean the runner up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.set_exception_handler(storm_safe_exception_handler(StormLog(log)))
    settle_garbage_collector()
    log.info("%s %s serving on %s", prog, __version__, ", ".join(urls))
    print(how_to_reach, file=sys.stderr, flush=True)
    notifier = _notifier
    notifier.ready(f"serving on {', '.join(urls)}")
    notifier.start_watchdog()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        notifier.stopping()
        try:
            await runner.cleanup()
        finally:
            notifier.close()


# What asyncio's own accept loop reports, with a traceback, for every failed
# accept() while out of descriptors (selector_events.py). Our listeners have
# their own accept loop (server/accept.py); any other server still must not
# flood the log.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


def storm_safe_exception_handler(storms: StormLog) -> Callable[
        [asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The loop's exception handler: asyncio's failed-accept reports are counted
    and logged once per interval, without traceback; everything else as usual."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_OUT_OF_RESOURCES:
            exc = context.get("exception")
            reason = exc.strerror if isinstance(exc, OSError) else exc
            storms.note(ACCEPT_OUT_OF_RESOURCES, f"{ACCEPT_OUT_OF_RESOURCES}: {reason}")
            return
        loop.default_exception_handler(context)

    return handle


# Collect the youngest generation every 20,000 allocations instead of 700, and
# the older ones 20 times rarer than that. Every collection walks each live
# container object, and a growing queue of tasks is the biggest set of them:
# with the defaults the full collections paused the loop for 50-70 ms
# (startTask p99 at 16 clients: 66-80 ms before, 17-21 ms after;
# benchmarks/bench_tasks.py "submit"). A queued task now keeps only its
# TaskRecord, its Active and its event dict tracked (see tasks/runtime.py).
GC_THRESHOLDS = (20_000, 20, 20)


def settle_garbage_collector() -> None:
    """Once started: move everything start-up made (modules, schemas, the
    reconciled tasks) out of the collector's sight, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_daemon(prog: str, serve: Coroutine[Any, Any, None],
               failure_log: logging.Logger | None = None) -> int:
    """Run ``serve`` to its end: 0, or 1 when it cannot listen (and, with
    ``failure_log``, when anything else stops it from starting)."""
    global _notifier
    _notifier = Notifier.from_environment()
    # A watchdog timeout is SIGABRT: say where every thread was (the journal).
    faulthandler.enable()
    try:
        asyncio.run(serve)
    except ListenError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if failure_log is None:
            raise
        failure_log.exception("%s failed to start", prog)
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
