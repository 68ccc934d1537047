"""Start the application on its TCP address and Unix socket."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from pathlib import Path

from aiohttp import web

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


def check_listen_address(config: Config) -> None:
    host, _ = config.listen
    if not is_loopback(host):
        raise ListenError(
            f"refusing to serve plain HTTP on {host}: only loopback addresses "
            "(127.0.0.0/8, ::1, localhost) may be used without TLS")


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


async def start(app: web.Application, config: Config) -> tuple[web.AppRunner, list[str]]:
    """Start serving; return the runner and the URLs it answers on."""
    check_listen_address(config)
    runner = web.AppRunner(app, access_log=log if config.access_log else None,
                           handle_signals=False)
    await runner.setup()
    host, port = config.listen
    try:
        tcp = web.TCPSite(runner, host, port, reuse_address=True)
        await tcp.start()
        socket_path = config.unix_socket_path
        if socket_path is not None:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_socket(socket_path)
            unix = web.UnixSite(runner, str(socket_path))
            await unix.start()
            os.chmod(socket_path, 0o660)
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen: {exc.strerror or exc}") from None
    except ListenError:
        await runner.cleanup()
        raise
    urls = [f"http://{_bound_address(runner)}/jsonrpc"]
    if socket_path is not None:
        urls.append(f"unix:{socket_path}")
    return runner, urls


def _bound_address(runner: web.AppRunner) -> str:
    # With port 0 the kernel picks one: report what was really bound.
    for site_address in runner.addresses:
        if isinstance(site_address, tuple):
            host, port = site_address[0], site_address[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise ListenError("no TCP address bound")
