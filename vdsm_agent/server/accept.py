"""Accepting connections so that no client can make the agent unreachable.

Every listener (plain TCP, TLS, the Unix socket) has an accept loop of its
own instead of asyncio's (docs/security.md, "Limits"):

* a cap on open connections per listener (``max_connections`` for each TCP
  listener, ``unix_max_connections`` for the Unix socket, whose last
  ``ROOT_RESERVE`` are kept for root and the agent's own user). A connection
  beyond it is accepted and closed at once, unread;
* TCP connections also stop short of the file-descriptor limit: one whose
  descriptor number comes within the head-room of ``RLIMIT_NOFILE`` (the Unix
  socket's connections plus a reserve for the agent's own files, pipes and
  tasks) is closed the same way. Descriptors are allocated lowest first, so
  a descriptor's number is a free lower bound of how many are open;
* a deadline for the first request head (``header_timeout``; for TLS also
  for the handshake): a connection that has not sent a complete head by then
  is aborted. Later requests on the connection have aiohttp's
  ``keepalive_timeout``, which runs from each answer to the next head and is
  not extended by bytes that trickle in either;
* when ``accept()`` itself fails for lack of descriptors or memory (EMFILE,
  ENFILE, ...), the listener pauses for ``ACCEPT_PAUSE`` seconds and tries
  again. asyncio's own loop logged a traceback for each failed accept and, in
  Python 3.11, scheduled one more retry each time: the log grew by gigabytes.
  The Unix socket keeps a spare descriptor for that moment: it closes the
  spare, accepts the waiting connection (root's, most likely) and serves it,
  and takes a spare again once a descriptor is free. Meanwhile, and for
  ``SHORTAGE_HOLD`` seconds after the last such failure, the TCP listeners
  close every connection they accept, so that a descriptor freed by anyone
  goes back to the Unix socket's spare rather than to the flood.

Refusals, deadlines and failed accepts are logged once per interval per
listener (``logs.StormLog``), never once per connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from vdsm_agent.logs import StormLog

log = logging.getLogger(__name__)

# accept() failures that mean "no resources now", not "this connection failed".
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE = 0.25  # seconds between accept() tries while out of resources
SHORTAGE_HOLD = 2.0  # seconds TCP sheds connections after accept() last ran out
ACCEPT_BATCH = 128  # connections accepted per readable event (then others get a turn)
# Unix socket connections kept for root and the agent's own user.
ROOT_RESERVE = 8
# Descriptors TCP connections leave for the agent's own work (the store, task
# pipes and output files, probes, /proc reads), beside the Unix socket's cap.
WORK_RESERVE = 256

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """The accept-side settings (the agent's and the engine's come from their
    configs: ``listeners.connection_limits``)."""

    max_connections: int = 1000
    unix_max_connections: int = 64
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = _nr_open(soft)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, hard,
                    exc)
        return soft
    return hard


def _nr_open(fallback: int) -> int:
    # With an unlimited hard limit the kernel's per-process ceiling applies.
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as stream:
            return int(stream.read())
    except (OSError, ValueError):
        return fallback


def tcp_fd_ceiling(fd_limit: int, unix_max_connections: int) -> int:
    """Lowest descriptor number a TCP connection may not have: what stays free above
    it is the Unix socket's and the agent's own (at most a quarter of the limit
    for the latter, so that a small limit still leaves room for TCP)."""
    return fd_limit - unix_max_connections - min(WORK_RESERVE, fd_limit // 4)


def _open_spare() -> int:
    """A descriptor to give up when accept() finds none free (-1 if none can be had)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _peer_uid(conn: socket.socket) -> int | None:
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    return int.from_bytes(raw[4:8], "little", signed=True)


@dataclasses.dataclass
class Shortage:
    """Shared by one daemon's listeners: until when (loop time) descriptors are short."""

    until: float = 0.0


class Listener:
    """One listening socket: its accept loop, its cap and its open connections."""

    def __init__(self, name: str, sock: socket.socket, factory: ProtocolFactory, *,
                 cap: int, cap_name: str, storms: StormLog, header_timeout: float,
                 fd_ceiling: int | None = None, fd_limit: int = 0,
                 ssl_context: ssl.SSLContext | None = None,
                 reserved_for: frozenset[int] = frozenset(), spare_fd: bool = False,
                 shortage: Shortage | None = None) -> None:
        self.name = name
        self.sock = sock
        self.factory = factory
        self.cap = cap
        self.cap_name = cap_name
        self.storms = storms
        self.header_timeout = header_timeout
        self.fd_ceiling = fd_ceiling
        self.fd_limit = fd_limit
        self.ssl_context = ssl_context
        # Unix socket: uids that may take the last ROOT_RESERVE connections.
        self.reserved_for = reserved_for
        self.shortage = shortage or Shortage()
        self.open = 0  # connections accepted and not yet closed
        self.refused = 0  # connections closed unread since start (any reason)
        self._loop = asyncio.get_running_loop()
        self._paused: asyncio.TimerHandle | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        # A descriptor held back for accept() at EMFILE (-1: none held now).
        self._spare_wanted = spare_fd
        self._spare = _open_spare() if spare_fd else -1

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._paused is not None:
            self._paused.cancel()
        else:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
        for task in self._starting:
            task.cancel()

    # -- accepting -------------------------------------------------------------------

    def _accept(self) -> None:
        if self._spare_wanted and self._spare < 0:
            self._spare = _open_spare()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    continue  # that one connection failed (ECONNABORTED, ...)
                self.shortage.until = self._loop.time() + SHORTAGE_HOLD
                spared = self._accept_with_spare()
                if spared is None:
                    self._pause(exc)
                    return
                conn = spared
            reason = self._refusal(conn)
            if reason is None:
                self._serve(conn)
            else:
                conn.close()
                self.refused += 1
                self.storms.note(f"refused {self.name}",
                                 f"refused connections on {self.name}: {reason}")

    def _refusal(self, conn: socket.socket) -> str | None:
        """Why ``conn`` is closed unread, or None to serve it."""
        if self.open >= self.cap:
            return f"{self.cap_name} ({self.cap}) reached"
        if self.fd_ceiling is not None:  # a TCP listener
            if conn.fileno() >= self.fd_ceiling:
                return (f"open file descriptors near RLIMIT_NOFILE ({self.fd_limit}), the "
                        "rest kept for the Unix socket and the agent's own work")
            if self._loop.time() < self.shortage.until:
                return ("out of file descriptors: TCP connections are closed until "
                        "accept() has not failed for " f"{SHORTAGE_HOLD:g} s")
        if (self.reserved_for and self.open >= self.cap - ROOT_RESERVE
                and _peer_uid(conn) not in self.reserved_for):
            return (f"{self.cap_name} ({self.cap}) reached for callers other than root "
                    f"(the last {ROOT_RESERVE} are theirs)")
        return None

    def _accept_with_spare(self) -> socket.socket | None:
        """Out of descriptors: give the spare up for one connection (None without one)."""
        if self._spare < 0:
            return None
        os.close(self._spare)
        self._spare = -1
        self.storms.note(f"spare {self.name}",
                         f"out of file descriptors: accepting on {self.name} with the "
                         "spare descriptor kept for it")
        try:
            conn, _address = self.sock.accept()
        except OSError:
            return None
        return conn

    def _pause(self, exc: OSError) -> None:
        # The listening socket stays readable while accept() fails: stop asking
        # for a while instead of spinning (and never log each failure).
        self.storms.note(f"accept {self.name}",
                         f"cannot accept connections on {self.name}: {exc.strerror}; "
                         f"retrying every {ACCEPT_PAUSE:g} s")
        self._loop.remove_reader(self.sock.fileno())
        self._paused = self._loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._accept()

    def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.open += 1
        guarded = Guarded(self.factory(), self)
        task = self._loop.create_task(self._connect(conn, guarded))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket, guarded: Guarded) -> None:
        tls = self.ssl_context is not None
        try:
            await self._loop.connect_accepted_socket(
                lambda: guarded, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=self.header_timeout if tls else None)
        except BaseException as exc:
            # A failed or timed-out TLS handshake (the protocol never hears of it).
            guarded.release()
            conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, ConnectionAbortedError):  # asyncio's handshake timeout
                self.storms.note(f"deadline {self.name}",
                                 f"closed connections on {self.name} that did not finish "
                                 f"the TLS handshake within {self.header_timeout:g} s")
            else:
                log.debug("connection on %s failed to start: %s", self.name, exc)


class Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with its listener's slot and the
    deadline for its first request head."""

    __slots__ = ("_deadline", "_inner", "_listener", "_tail")

    def __init__(self, inner: asyncio.BaseProtocol, listener: Listener) -> None:
        self._inner: Any = inner
        self._listener: Listener | None = listener
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""

    def release(self) -> None:
        """Give the listener's slot back (once)."""
        listener = self._listener
        if listener is not None:
            self._listener = None
            listener.open -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        if listener is not None:
            self._deadline = listener._loop.call_later(
                listener.header_timeout, self._expire, cast(asyncio.Transport, transport))
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            self._watch(data)
        self._inner.data_received(data)

    def _watch(self, data: bytes) -> None:
        # A request head ends at its first empty line (CRLF CRLF; aiohttp's parser
        # also takes bare LFs). Only the first head is watched: later ones have
        # aiohttp's keepalive_timeout. Bytes that merely trickle in change nothing.
        seen = self._tail + data
        if b"\n\n" in seen or b"\n\r\n" in seen:
            assert self._deadline is not None
            self._deadline.cancel()
            self._deadline = None
            self._tail = b""
        else:
            self._tail = seen[-2:]

    def _expire(self, transport: asyncio.Transport) -> None:
        self._deadline = None
        listener = self._listener
        if listener is not None:
            listener.storms.note(
                f"deadline {listener.name}",
                f"closed connections on {listener.name} that sent no complete request "
                f"head within {listener.header_timeout:g} s (header_timeout)")
        transport.abort()  # unread: nothing of it is worth a graceful close

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

