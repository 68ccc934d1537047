"""HTTP streams that follow something: ``GET /events?follow=1`` and
``GET /tasks/{id}/output?follow=1`` (docs/events.md, docs/tasks.md).

A follower costs the agent a bounded amount of memory, whatever its client does:

* **Back-pressure.** Data goes out in pieces of at most ``PIECE`` bytes, and a
  piece waits until the connection's write buffer is at most ``BUFFER_LIMIT``
  (then until it is under a quarter of it, asyncio's low-water mark).
  A client that reads slowly holds its stream back: the agent keeps at most
  ``BUFFER_LIMIT + PIECE`` bytes for it (plus one batch of its source); what it
  falls behind meanwhile is its source's business (the events feed sends a
  ``gap`` line). Before, every batch went to the connection whole (a 1,000-event
  batch: 0.2-1 MB) and waited there for the client, once per follower.
* **Stall.** A client that takes nothing for ``stream_stall_timeout`` seconds
  while data waits for it is disconnected (one log line): it cannot hold a
  request slot and its buffers for ever. One that reads, however slowly, is not.
* **Keep-alive.** While the source has nothing to send, ``with_keepalive``
  yields None every ``stream_keepalive_interval`` seconds and the handler sends
  a keep-alive, so that proxies and clients with idle timeouts keep the stream
  open (and a client that went away is noticed).
* **Memory handed back.** What a follower held is freed when it goes: its
  handler's frames are kept out of asyncio's reference cycles (see
  ``Follower._write``), and the C heap pages freed land in glibc's free lists,
  where glibc keeps them (59 -> 120 MB RSS after slow followers, and it stayed
  there): a follower's end asks glibc to give them back (``malloc_trim``), in
  a worker thread, soon after and at most once per ``TRIM_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

log = logging.getLogger(__name__)

PIECE = 64 * 1024  # bytes per write to the connection (16 KiB cost 50% more CPU per MiB)
BUFFER_LIMIT = 64 * 1024  # a follower's unsent bytes before its stream waits
STALL_CHECK = 1.0  # seconds between two looks of the watchdog at a follower's progress
TRIM_DELAY = 0.5  # seconds after a follower ended (the others of a burst end too)
TRIM_INTERVAL = 5.0  # seconds between two malloc_trim calls at most

T = TypeVar("T")


class Stalled(ConnectionError):
    """The client took nothing for ``stall_timeout`` seconds while data waited."""


class Follower:
    """One streaming response: writes with back-pressure and a stall watchdog.

    Use as ``async with Follower(request, response, stall_timeout) as follower``
    after ``response.prepare``; ``send`` raises ConnectionError when the client
    went away, ``Stalled`` (also a ConnectionError) when it was dropped for
    taking nothing. The watchdog is one timer per follower, every STALL_CHECK
    seconds: it compares what the connection has sent with what waits in its
    buffer, so writes cost nothing more than aiohttp's own.
    """

    def __init__(self, request: web.Request, response: web.StreamResponse,
                 stall_timeout: float) -> None:
        self._request = request
        self._response = response
        self._stall_timeout = stall_timeout
        self._check_every = min(STALL_CHECK, stall_timeout / 2)
        self._limits: tuple[int, int] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._taken = -1  # bytes the connection had sent at the last progress
        self._progress_at = 0.0  # loop time of that progress
        self._stalled = False

    async def __aenter__(self) -> Follower:
        transport = self._request.transport
        if transport is not None:
            # The protocol pauses above BUFFER_LIMIT and ``drain`` waits until the
            # buffer is under a quarter of it (what asyncio does by default).
            self._limits = transport.get_write_buffer_limits()
            transport.set_write_buffer_limits(high=BUFFER_LIMIT)
            loop = asyncio.get_running_loop()
            self._progress_at = loop.time()
            self._watchdog = loop.call_later(self._check_every, self._check)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        transport = self._request.transport
        if self._limits is not None and transport is not None and not transport.is_closing():
            low, high = self._limits
            transport.set_write_buffer_limits(high=high, low=low)  # a kept-alive connection
        _trimmer.follower_ended()

    async def send(self, data: bytes) -> None:
        """Write ``data``, a piece at a time, each once the client has taken enough."""
        for start in range(0, len(data), PIECE):
            await self._write(data[start:start + PIECE])

    async def _write(self, piece: bytes) -> None:
        transport = self._request.transport
        if transport is not None and not transport.is_closing():
            try:
                if transport.get_write_buffer_size() > BUFFER_LIMIT:
                    # Until the client has taken enough: under the low-water mark.
                    await self._request.writer.drain()
                await self._response.write(piece)  # aiohttp may wait for the client too
                return
            except ConnectionError:
                pass
        # A new exception, not aiohttp's: that one sits in a reference cycle (its
        # drain waiter, asyncio's transport and frames) that only the cyclic
        # collector frees, and it runs rarely here (server/runner.py). Raised
        # through the frames above, it took their data (a batch, a 1 MiB output
        # read) into that cycle until then: measured, 17 MB after 20 output
        # followers left.
        if self._stalled:
            raise Stalled(f"the client took nothing for {self._stall_timeout:g} s")
        raise ConnectionResetError("the client went away")

    def _check(self) -> None:
        """The watchdog: drop the client if data has waited for it, untaken, for
        stall_timeout seconds; a client that takes anything, however little, stays."""
        self._watchdog = None
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        unsent = transport.get_write_buffer_size()
        taken = self._request.writer.output_size - unsent
        if taken != self._taken or unsent == 0:
            self._taken, self._progress_at = taken, loop.time()
        elif loop.time() - self._progress_at >= self._stall_timeout:
            self._drop(transport)
            return
        self._watchdog = loop.call_later(self._check_every, self._check)

    def _drop(self, transport: asyncio.Transport) -> None:
        peer = self._request.remote or "the Unix socket"
        log.info("%s %s: dropped a follower (%s) that took nothing for %g s "
                 "(stream_stall_timeout)", self._request.method, self._request.path,
                 peer, self._stall_timeout)
        self._stalled = True
        transport.abort()  # what it did not take is dropped with it; send raises


async def with_keepalive(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """The items of ``source``, and None whenever ``interval`` seconds pass
    without one (the caller sends a keep-alive). ``source`` is not interrupted
    while it waits, only closed at the end; close this one (``closing``)."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            await asyncio.wait((pending,), timeout=interval)
            if not pending.done():
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            finally:
                # The task holds the exception whose traceback holds this frame:
                # no cycle for the cyclic collector (see Follower._write).
                del finished
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait((pending,))  # never raises, unlike awaiting it
            if not pending.cancelled():
                pending.exception()  # retrieved: the stream is over anyway
            pending = None
        await _aclose(source)


@contextlib.asynccontextmanager
async def closing(source: AsyncIterator[Any]) -> AsyncIterator[None]:
    """Close the async generator ``source`` on leaving, however it is left."""
    try:
        yield
    finally:
        await _aclose(source)


async def _aclose(source: AsyncIterator[Any]) -> None:
    aclose: Callable[[], Awaitable[None]] | None = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


class _Trimmer:
    """``malloc_trim(0)`` in a worker thread once followers have ended: TRIM_DELAY
    after the first of them ends, then at most once per TRIM_INTERVAL (a no-op
    without glibc). It hands the free pages of the C heap back to the system."""

    def __init__(self) -> None:
        self._last = -TRIM_INTERVAL
        self._scheduled: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._malloc_trim = _find_malloc_trim()

    def follower_ended(self) -> None:
        loop = asyncio.get_running_loop()
        if self._malloc_trim is None or (self._scheduled is not None and self._loop is loop):
            return
        delay = max(self._last + TRIM_INTERVAL - time.monotonic(), TRIM_DELAY)
        self._loop = loop
        self._scheduled = loop.call_later(delay, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = None
        self._last = time.monotonic()
        task = loop.create_task(self._trim(), name="streams-malloc-trim")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _trim(self) -> None:
        if self._malloc_trim is not None:
            began = time.perf_counter()
            await asyncio.to_thread(self._malloc_trim, 0)
            log.debug("malloc_trim after followers ended: %.1f ms",
                      (time.perf_counter() - began) * 1000)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        function: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    return function


_trimmer = _Trimmer()
