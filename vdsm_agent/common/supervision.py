"""Background work that outlives a bug: restarting loops and logged jobs.

A long-lived loop (the task manager's scheduler, monitor, retention and
disk-room loops; each engine host worker's events, sync and steps loops)
runs under ``keep_running``: an exception in it is a bug, logged with its
traceback, and the loop starts again after a pause instead of dying
silently (``LoopEnded``: it stops, quietly, its reason already logged).
``Background`` holds an owner's loops and one-off background jobs
so that ``close`` cancels them all and waits for them (uvicorn's
``ServerState.tasks``: a strong reference keeps a running task from being
garbage-collected).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


class LoopEnded(Exception):
    """Raised by a loop (or a job) that must stop for a reason already told in the
    logs (a host worker whose lease was lost): it ends quietly, no traceback, no
    restart."""


async def keep_running(loop: Callable[[], Awaitable[None]], what: str, restart_delay: float,
                       log: logging.Logger) -> None:
    """Run ``loop`` until it returns. An exception in it is logged ("``what`` failed;
    restarting it") and the loop starts again after ``restart_delay`` seconds;
    cancellation ends it."""
    while True:
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except LoopEnded as exc:
            log.debug("%s ended: %s", what, exc)
            return
        except Exception:
            log.exception("%s failed; restarting it", what)
            await asyncio.sleep(restart_delay)


class Background:
    """An owner's background loops and jobs, cancelled together by ``close``."""

    def __init__(self, owner: str, log: logging.Logger) -> None:
        self.owner = owner  # names the owner in log lines, e.g. "task manager"
        self.log = log
        self._running: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        """Whether any loop or job is still running."""
        return bool(self._running)

    def loop(self, loop: Callable[[], Awaitable[None]], name: str,
             restart_delay: float) -> None:
        """Start ``loop`` under ``keep_running``; ``name`` says which in its log lines."""
        what = f"{self.owner}: {name}"
        self._track(asyncio.create_task(keep_running(loop, what, restart_delay, self.log),
                                        name=what))

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; its failure is logged, not raised."""
        job = asyncio.create_task(self._logged(coro))
        self._track(job)
        # A job cancelled at close before its first step never starts ``coro``:
        # close it so it is not reported as "never awaited" (a no-op once it ran).
        job.add_done_callback(lambda _: coro.close())

    async def close(self) -> None:
        """Cancel every loop and job, and wait until they have ended."""
        running, self._running = list(self._running), set()
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _track(self, job: asyncio.Task[None]) -> None:
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    async def _logged(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except LoopEnded as exc:
            self.log.debug("%s: background job ended: %s", self.owner, exc)
        except Exception:
            self.log.exception("%s: background job failed", self.owner)
