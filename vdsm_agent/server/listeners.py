"""Start the application on its TCP address, its Unix socket and, when configured, TLS.

Plain HTTP is served on loopback only; any other address needs the TLS
listener (``tls_listen``), which requires client certificates
(``vdsm_agent.security.tls``). Every configuration problem is a
``ListenError`` with a message, checked before anything starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from vdsm_agent.security import tls
from vdsm_agent.settings import Config

log = logging.getLogger(__name__)


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


def check_listen_address(config: Config) -> None:
    check_plain_http(config.listen[0])


def check_config(config: Config) -> ssl.SSLContext | None:
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


async def setup_runner(app: web.Application,
                       access_log: logging.Logger | None) -> web.AppRunner:
    """A set-up runner for ``app`` that leaves signals to the caller."""
    runner = web.AppRunner(app, access_log=access_log, handle_signals=False)
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


async def start_tcp(app: web.Application, listen: tuple[str, int],
                    access_log: logging.Logger | None) -> tuple[web.AppRunner, str]:
    """Serve ``app`` with plain HTTP on ``listen`` only; the runner and its URL."""
    runner = await setup_runner(app, access_log)
    host, port = listen
    async with cleaned_up_on_failure(runner):
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner, f"http://{bound_address(runner)}/jsonrpc"


async def start(app: web.Application, config: Config) -> tuple[web.AppRunner, list[str]]:
    """Start serving; return the runner and the URLs it answers on."""
    tls_context = check_config(config)
    runner = await setup_runner(app, log if config.access_log else None)
    host, port = config.listen
    async with cleaned_up_on_failure(runner):
        tcp = web.TCPSite(runner, host, port, reuse_address=True)
        await tcp.start()
        socket_path = config.unix_socket_path
        if socket_path is not None:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_socket(socket_path)
            unix = web.UnixSite(runner, str(socket_path))
            await unix.start()
            os.chmod(socket_path, 0o660)
        tls_addresses: list[str] = []
        if tls_context is not None:
            tls_host, tls_port = config.tls_listen
            before = list(runner.addresses)
            secure = web.TCPSite(runner, tls_host, tls_port, ssl_context=tls_context,
                                 reuse_address=True)
            await secure.start()
            tls_addresses = [_format(address) for address in runner.addresses
                             if address not in before and isinstance(address, tuple)]
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
