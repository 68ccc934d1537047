"""Start the application on its TCP address, its Unix socket and, when configured, TLS.

Plain HTTP is served on loopback only; any other address needs the TLS
listener (``tls_listen``), which requires client certificates
(``vdsm_agent.security.tls``). Every configuration problem is a
``ListenError`` with a message, checked before anything starts.

The agent and the engine are served alike: ``start`` and ``check_config``
take any config with the listener settings (``ServedConfig``: both
programs' tables have these rows).

Each listener is an aiohttp site served by its own accept loop
(``server.accept``): a cap on open connections, a deadline for request heads,
file descriptors kept for the Unix socket, and storms logged once per
interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from vdsm_agent.logs import StormLog
from vdsm_agent.security import tls
from vdsm_agent.server.accept import (
    ROOT_RESERVE,
    ConnectionLimits,
    Listener,
    ProtocolFactory,
    Shortage,
    raise_fd_limit,
    tcp_fd_ceiling,
)

log = logging.getLogger(__name__)

BACKLOG = 128  # listen(2) backlog of every listening socket


class ServedConfig(Protocol):
    """What the listeners read of a program's config (the agent's ``Config``, the
    engine's ``EngineConfig``): read-only attributes of the same names."""

    @property
    def listen(self) -> tuple[str, int]: ...
    @property
    def unix_socket_path(self) -> Path | None: ...
    @property
    def tls_listen(self) -> tuple[str, int] | None: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def tls_key(self) -> str: ...
    @property
    def tls_ca(self) -> str: ...
    @property
    def access_log(self) -> bool: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def unix_max_connections(self) -> int: ...
    @property
    def header_timeout(self) -> float: ...
    @property
    def keepalive_timeout(self) -> float: ...


class ListenError(RuntimeError):
    """The configured listeners cannot be used; the message says why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain_http(host: str) -> None:
    """Plain HTTP is served on loopback only."""
    if not is_loopback(host):
        raise ListenError(
            f"refusing to serve plain HTTP on {host}: only loopback addresses "
            "(127.0.0.0/8, ::1, localhost) may be used without TLS")


def check_listen_address(config: ServedConfig) -> None:
    check_plain_http(config.listen[0])


def check_config(config: ServedConfig) -> ssl.SSLContext | None:
    """Check the listeners' settings; the TLS context when TLS is configured."""
    check_listen_address(config)
    try:
        return tls.check_settings(config.tls_listen, config.tls_cert, config.tls_key,
                                  config.tls_ca)
    except tls.TlsConfigError as exc:
        raise ListenError(str(exc)) from None


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


async def setup_runner(app: web.Application, access_log: logging.Logger | None,
                       keepalive_timeout: float = ConnectionLimits.keepalive_timeout
                       ) -> web.AppRunner:
    """A set-up runner for ``app`` that leaves signals to the caller.

    aiohttp's ``keepalive_timeout`` runs from a connection's start and from each
    answer until the next request head has arrived: it closes idle connections
    and bounds how long a later request head may take."""
    runner = web.AppRunner(app, access_log=access_log, handle_signals=False,
                           keepalive_timeout=keepalive_timeout)
    await runner.setup()
    return runner


@contextlib.asynccontextmanager
async def cleaned_up_on_failure(runner: web.AppRunner) -> AsyncIterator[None]:
    """Starting sites: on failure clean ``runner`` up; an OSError becomes a ListenError."""
    try:
        yield
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen: {exc.strerror or exc}") from None
    except ListenError:
        await runner.cleanup()
        raise


class _Serving(asyncio.AbstractServer):
    """What aiohttp's runner sees of a GuardedSite's listeners (sockets, close)."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(listener.sock for listener in self.listeners)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def is_serving(self) -> bool:
        return any(not listener.sock._closed  # type: ignore[attr-defined]
                   for listener in self.listeners)

    async def start_serving(self) -> None:
        return None  # serving from GuardedSite.start on

    async def serve_forever(self) -> None:
        raise NotImplementedError("a GuardedSite serves from its runner")

    async def wait_closed(self) -> None:
        return None  # Listener.close closes at once


class GuardedSite(web.BaseSite):
    """An aiohttp site whose listening sockets are served by ``accept.Listener``s."""

    __slots__ = ("_make", "_name")

    def __init__(self, runner: web.BaseRunner, name: str,
                 make: Callable[[ProtocolFactory], list[Listener]]) -> None:
        super().__init__(runner)
        self._name = name
        self._make = make

    @property
    def name(self) -> str:
        return self._name

    @property
    def listeners(self) -> list[Listener]:
        return self._server.listeners if isinstance(self._server, _Serving) else []

    async def start(self) -> None:
        await super().start()
        factory = self._runner.server
        assert factory is not None
        listeners = self._make(factory)
        self._server = _Serving(listeners)
        for listener in listeners:
            listener.start()


class Guard:
    """Makes the guarded sites of one daemon: its limits, its descriptor budget
    and one storm log for all of its listeners."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.fd_limit = raise_fd_limit()
        self.tcp_fd_ceiling = tcp_fd_ceiling(self.fd_limit, limits.unix_max_connections)
        self.storms = StormLog(log)
        self.shortage = Shortage()
        self.tcp_listeners = 0
        if self.tcp_fd_ceiling < 64:
            log.warning("the file descriptor limit (RLIMIT_NOFILE %d) leaves almost no "
                        "descriptors for TCP connections: raise it", self.fd_limit)

    def tcp(self, runner: web.BaseRunner, host: str, port: int,
            ssl_context: ssl.SSLContext | None = None) -> GuardedSite:
        scheme = "tls" if ssl_context is not None else "tcp"
        self.tcp_listeners += 1

        def make(factory: ProtocolFactory) -> list[Listener]:
            return [Listener(f"{scheme} {_format(sock.getsockname())}", sock, factory,
                             cap=self.limits.max_connections, cap_name="max_connections",
                             storms=self.storms, header_timeout=self.limits.header_timeout,
                             fd_ceiling=self.tcp_fd_ceiling, fd_limit=self.fd_limit,
                             ssl_context=ssl_context, shortage=self.shortage)
                    for sock in tcp_sockets(host, port)]

        return GuardedSite(runner, f"{scheme}://{host}:{port}", make)

    def unix(self, runner: web.BaseRunner, path: Path) -> GuardedSite:
        def make(factory: ProtocolFactory) -> list[Listener]:
            return [Listener(f"unix {path}", unix_socket(str(path)), factory,
                             cap=self.limits.unix_max_connections,
                             cap_name="unix_max_connections", storms=self.storms,
                             header_timeout=self.limits.header_timeout,
                             reserved_for=own_uids(), spare_fd=True,
                             shortage=self.shortage)]

        return GuardedSite(runner, f"unix:{path}", make)

    def describe(self) -> str:
        """One line for the log: the caps and the descriptor budget."""
        limits = self.limits
        budget = self.tcp_fd_ceiling
        binding = (f", but the descriptor limit stops TCP connections near {budget} open "
                   "descriptors" if limits.max_connections * max(self.tcp_listeners, 1) > budget
                   else "")
        return (f"connections: at most {limits.max_connections} on each TCP listener"
                f"{binding}, {limits.unix_max_connections} on the Unix socket (the last "
                f"{ROOT_RESERVE} for root); RLIMIT_NOFILE {self.fd_limit}; request heads within "
                f"{limits.header_timeout:g} s, idle connections closed after "
                f"{limits.keepalive_timeout:g} s")


def connection_limits(config: ServedConfig) -> ConnectionLimits:
    return ConnectionLimits(max_connections=config.max_connections,
                            unix_max_connections=config.unix_max_connections,
                            header_timeout=config.header_timeout,
                            keepalive_timeout=config.keepalive_timeout)


async def start(app: web.Application, config: ServedConfig
                ) -> tuple[web.AppRunner, list[str]]:
    """Start serving; return the runner and the URLs it answers on."""
    tls_context = check_config(config)
    limits = connection_limits(config)
    runner = await setup_runner(app, log if config.access_log else None,
                                limits.keepalive_timeout)
    guard = Guard(limits)
    host, port = config.listen
    async with cleaned_up_on_failure(runner):
        await guard.tcp(runner, host, port).start()
        socket_path = config.unix_socket_path
        if socket_path is not None:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_socket(socket_path)
            await guard.unix(runner, socket_path).start()
            os.chmod(socket_path, 0o660)
        tls_addresses: list[str] = []
        if tls_context is not None:
            assert config.tls_listen is not None  # a TLS context is made for tls_listen only
            tls_host, tls_port = config.tls_listen
            before = list(runner.addresses)
            await guard.tcp(runner, tls_host, tls_port, tls_context).start()
            tls_addresses = [_format(address) for address in runner.addresses
                             if address not in before and isinstance(address, tuple)]
    log.info("%s", guard.describe())
    urls = [f"http://{bound_address(runner)}/jsonrpc"]
    if socket_path is not None:
        urls.append(f"unix:{socket_path}")
    urls += [f"https://{address}/jsonrpc" for address in tls_addresses[:1]]
    return runner, urls


def _format(address: tuple[object, ...]) -> str:
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bound_address(runner: web.AppRunner) -> str:
    # With port 0 the kernel picks one: report what was really bound.
    for site_address in runner.addresses:
        if isinstance(site_address, tuple):
            return _format(site_address)
    raise ListenError("no TCP address bound")


# -- listening sockets (each served by an accept.Listener) -------------------------------


def tcp_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port`` (one per address
    ``host`` resolves to, as asyncio's create_server makes them)."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def unix_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def own_uids() -> frozenset[int]:
    """Who may take the Unix socket's reserved connections: root and the agent's user."""
    return frozenset({0, os.getuid()})
