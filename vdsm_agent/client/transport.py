"""One JSON-RPC POST to the agent over TCP (HTTP or HTTPS) or a Unix socket.

Standard library only (``http.client``): the client is a short-lived process
and aiohttp alone would cost more to import than the whole call.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import urllib.parse
from typing import Any

from vdsm_agent.client.params import UsageError

DEFAULT_PORT = 54321
DEFAULT_PATH = "/jsonrpc"
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}{DEFAULT_PATH}"
SOCKET_ENV = "VDSM_AGENT_SOCKET"
# The packaged agent's Unix socket (packaging/generate.py): privileged calls go
# there, since a loopback TCP caller is anonymous (docs/security.md).
INSTALLED_SOCKET = "/run/vdsm-agent/agent.sock"


class TransportError(Exception):
    """The agent could not be reached or did not answer HTTP sensibly."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where requests go: ``scheme`` is http, https or unix."""

    scheme: str
    host: str = "localhost"
    port: int = DEFAULT_PORT
    path: str = DEFAULT_PATH
    socket_path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None


def parse_url(url: str, default_port: int = DEFAULT_PORT) -> Target:
    """``http(s)://host[:port][/path]``; the port defaults to ``default_port`` (the
    agent's 54321), the path to /jsonrpc."""
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"--url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"--url {url!r}: the scheme must be http or https")
    if not parts.hostname:
        raise UsageError(f"--url {url!r}: no host")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, parts.hostname, port or default_port, path)


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Where a program's requests go when the command line does not say."""

    url: str = DEFAULT_URL
    port: int = DEFAULT_PORT
    url_env: str | None = None  # an environment variable with a URL
    socket_env: str | None = SOCKET_ENV  # one with a Unix socket path
    installed_socket: str | None = INSTALLED_SOCKET  # used when it exists


def choose_target(url: str | None, unix_socket: str | None, environ: dict[str, str],
                  installed_socket: str | None = INSTALLED_SOCKET,
                  defaults: Defaults | None = None) -> Target:
    """--url, else --unix-socket, else $URL_ENV, else $SOCKET_ENV, else the
    installed socket when it exists, else the loopback default URL."""
    defaults = defaults or Defaults(installed_socket=installed_socket)
    if url is not None:
        return parse_url(url, defaults.port)
    if unix_socket is not None:
        if not unix_socket:
            raise UsageError("--unix-socket: empty path")
        return Target("unix", socket_path=unix_socket)
    env_url = environ.get(defaults.url_env) if defaults.url_env else None
    if env_url:
        return parse_url(env_url, defaults.port)
    env_socket = environ.get(defaults.socket_env) if defaults.socket_env else None
    if env_socket:
        return Target("unix", socket_path=env_socket)
    if defaults.installed_socket and os.path.exists(defaults.installed_socket):
        return Target("unix", socket_path=defaults.installed_socket)
    return parse_url(defaults.url, defaults.port)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over an AF_UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connection(target: Target, timeout: float, tls: TlsFiles) -> http.client.HTTPConnection:
    if target.scheme == "unix":
        return UnixHTTPConnection(target.socket_path, timeout)
    if target.scheme == "https":
        import ssl  # only when needed: it is the slowest import of the lot

        try:
            context = ssl.create_default_context(cafile=tls.cacert)
            if tls.cert:
                context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"TLS files: {exc}") from None
        return http.client.HTTPSConnection(target.host, target.port, timeout=timeout,
                                           context=context)
    return http.client.HTTPConnection(target.host, target.port, timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    body: bytes


def post(target: Target, body: bytes, timeout: float, tls: TlsFiles | None = None,
         server: str = "agent") -> Answer:
    """POST ``body`` and return the HTTP answer; TransportError if there is none.
    ``server`` names what answers there, in messages ("is the agent running?")."""
    conn = _connection(target, timeout, tls or TlsFiles())
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.reason, response.read())
    except TimeoutError:
        raise TransportError(f"no answer within {timeout:g} s (see --timeout)") from None
    except OSError as exc:
        raise TransportError(_describe_os_error(exc, target, server)) from None
    except http.client.HTTPException as exc:
        raise TransportError(f"bad HTTP answer: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def _describe_os_error(exc: OSError, target: Target, server: str = "agent") -> str:
    reason: Any = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and target.scheme == "unix":
        return f"no socket at {target.socket_path} (is the {server} running?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused (is the {server} running and listening there?)"
    if isinstance(exc, PermissionError) and target.scheme == "unix":
        return f"{reason} (the socket is for its owner and group only)"
    return str(reason)
