"""HTTP streams that follow something: ``GET /events?follow=1`` and
``GET /tasks/{id}/output?follow=1`` (docs/events.md, docs/tasks.md).

A follower costs the agent a bounded amount of memory, whatever its client does:

* **Back-pressure.** Data goes out in pieces of at most ``PIECE`` bytes, and a
  piece waits until the connection's write buffer is at most ``BUFFER_LIMIT``.
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
* **Memory handed back.** Buffers freed when followers go land in the C
  allocator's free lists, where glibc keeps them (59 -> 120 MB RSS after slow
  followers, and it stayed there). ``Follower.close`` asks glibc to give them
  back (``malloc_trim``) in a worker thread soon after, at most once per
  ``TRIM_INTERVAL``.
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

PIECE = 16 * 1024  # bytes per write to the connection
BUFFER_LIMIT = 64 * 1024  # a follower's unsent bytes before its stream waits
STALL_CHECK = 1.0  # seconds between looks at a held-back follower's progress
TRIM_DELAY = 0.5  # seconds after a follower ended (the others of a burst end too)
TRIM_INTERVAL = 5.0  # seconds between two malloc_trim calls at most

T = TypeVar("T")


class Stalled(ConnectionError):
    """The client took nothing for ``stall_timeout`` seconds while data waited."""


class Follower:
    """One streaming response: writes with back-pressure and a stall timeout.

    Use as ``async with Follower(request, response, stall_timeout) as follower``
    after ``response.prepare``; ``send`` raises ConnectionError when the client
    went away, ``Stalled`` (also a ConnectionError, after aborting the
    connection) when it stopped reading.
    """

    def __init__(self, request: web.Request, response: web.StreamResponse,
                 stall_timeout: float) -> None:
        self._request = request
        self._response = response
        self._stall_timeout = stall_timeout
        self._limits: tuple[int, int] | None = None
        self.sent = 0

    async def __aenter__(self) -> Follower:
        transport = self._request.transport
        if transport is not None:
            # The protocol pauses above BUFFER_LIMIT and ``drain`` waits until the
            # buffer is under a quarter of it (what asyncio does by default).
            self._limits = transport.get_write_buffer_limits()
            transport.set_write_buffer_limits(high=BUFFER_LIMIT)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
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
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        if transport.get_write_buffer_size() > BUFFER_LIMIT:
            # Until the client has taken enough: the buffer is under the low-water mark.
            await self._while_taking(transport, self._request.writer.drain())
        write = self._response.write(piece)
        if transport.get_write_buffer_size() + len(piece) <= BUFFER_LIMIT:
            await write  # the protocol will not pause: aiohttp waits for no one
        else:
            await self._while_taking(transport, write)  # aiohttp may wait for the client
        self.sent += len(piece)

    async def _while_taking(self, transport: asyncio.Transport,
                            step: Awaitable[None]) -> None:
        """Await ``step``, which waits for the client to read, as long as the client
        takes something at least every ``stall_timeout`` seconds; else drop it."""
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(step)
        try:
            unsent = transport.get_write_buffer_size()
            deadline = loop.time() + self._stall_timeout
            while not waiting.done():
                check = min(STALL_CHECK, max(deadline - loop.time(), 0.0))
                await asyncio.wait((waiting,), timeout=check)
                if waiting.done():
                    break
                if transport.get_write_buffer_size() < unsent:  # it took some: more time
                    unsent = transport.get_write_buffer_size()
                    deadline = loop.time() + self._stall_timeout
                elif loop.time() >= deadline:
                    self._drop(transport)
        finally:
            waiting.cancel()  # when dropped or cancelled; a no-op when done
        failure = waiting.exception()
        if isinstance(failure, ConnectionError):
            # A new exception, not the task's: that one (or its cause) is in a
            # reference cycle of asyncio's (transport, protocol, frames) that only
            # the cyclic collector frees, and it runs rarely here (server/runner.py).
            # Raised through the frames above, it would take their data (a batch,
            # a 1 MiB output chunk) into that cycle until then: measured, 17 MB
            # after 20 output followers left.
            raise ConnectionResetError(f"the client went away ({failure})")
        if failure is not None:
            raise failure

    def _drop(self, transport: asyncio.Transport) -> None:
        peer = self._request.remote or "the Unix socket"
        log.info("%s %s: dropped a follower (%s) that took nothing for %g s "
                 "(stream_stall_timeout)", self._request.method, self._request.path,
                 peer, self._stall_timeout)
        transport.abort()  # what it did not take is dropped with it
        raise Stalled(f"the client took nothing for {self._stall_timeout:g} s")


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
                del finished  # no cycle through the task (see Follower._while_taking)
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
