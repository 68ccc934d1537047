"""JSON-RPC calls to one host's agent over aiohttp (HTTP, or HTTPS with client certs).

Each host gets its own ``ClientSession`` and connection pool, so a frozen
host can only hold its own connections; every call has its own timeout
(``aiohttp.ClientTimeout``). Outcomes are sorted in two:

* ``AgentError``: the agent answered with a JSON-RPC error (it is alive);
* ``AgentUnreachable``: no usable answer (refused, reset, timeout, not
  JSON-RPC) — a failed attempt that counts towards non-responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson


class AgentUnreachable(Exception):
    """No usable answer from the agent; the message says why."""


class AgentError(Exception):
    """A JSON-RPC error answer from the agent."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        self.code = int(error.get("code", 0))
        data = error.get("data")
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        self.name = str(self.data.get("name") or error.get("message") or "Error")
        super().__init__(f"{self.code} {self.name}: {error.get('message')}")

    def to_record(self) -> dict[str, Any]:
        """What a step keeps of it."""
        return {"code": self.code, "name": self.name, "message": self.error.get("message"),
                **{k: v for k, v in self.data.items() if k != "name"}}


METHOD_NOT_FOUND = -32601


def _strerror(error: OSError | None) -> str:
    """An OS error in words, lower case: "connection refused"."""
    if error is None:
        return "no reason given"
    if isinstance(error, ssl.SSLError):  # its errno is the TLS library's, not the OS's
        return str(error.reason or error).lower().replace("_", " ")
    text = os.strerror(error.errno) if error.errno and error.errno > 0 else (
        error.strerror or str(error))
    return text[:1].lower() + text[1:]


def describe(exc: BaseException) -> str:
    """Why a call reached no agent, in words: aiohttp's own text carries its
    internals ("Cannot connect to host h:p ssl:default [Connect call failed ...]",
    ssl:default even on plain HTTP), which say nothing to a person."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None)
        return (f"the TLS certificate of {exc.host}:{exc.port} was not accepted: "
                f"{reason or exc.certificate_error}")
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake with {exc.host}:{exc.port} failed: {_strerror(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host}: {_strerror(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {_strerror(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the agent closed the connection before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    if isinstance(exc, OSError):  # aiohttp.ClientOSError too: reset, broken pipe
        return _strerror(exc)
    return str(exc) or type(exc).__name__


def ssl_context(ca_file: str | None, cert_file: str | None,
                key_file: str | None) -> ssl.SSLContext:
    """Verify the agent with ``ca_file`` (else the system CAs); present a client cert."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


async def tls_context_of(host: str, url: str, tls: tuple[str | None, str | None, str | None]
                         ) -> ssl.SSLContext | None:
    """The TLS context to reach ``url`` with (None for http), its files read off the
    loop; AgentUnreachable naming the host when they cannot be read."""
    if not url.startswith("https:"):
        return None
    try:
        return await asyncio.to_thread(ssl_context, *tls)
    except (OSError, ssl.SSLError) as exc:
        raise AgentUnreachable(f"TLS files of host {host}: {exc}") from None


class AgentClient:
    """Calls one agent's verbs; ``close`` when the host is removed or the engine stops."""

    def __init__(self, url: str, *, connect_timeout: float, request_timeout: float,
                 ssl_context: ssl.SSLContext | None = None, pool_size: int = 8) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._ssl: ssl.SSLContext | bool = ssl_context or True
        self._ids = itertools.count(1)
        connector = aiohttp.TCPConnector(limit=pool_size, ssl=self._ssl,
                                         enable_cleanup_closed=True)
        # No User-Agent, Accept or Accept-Encoding (the agent uses none of them):
        # ~90 bytes less of every call, a third of a resync of an unchanged host.
        self._session = aiohttp.ClientSession(
            connector=connector, json_serialize=lambda obj: orjson.dumps(obj).decode(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """The verb's result; AgentError for an error answer, AgentUnreachable otherwise."""
        total = self.request_timeout if timeout is None else timeout
        request_id = next(self._ids)
        body = orjson.dumps({"jsonrpc": "2.0", "method": method, "params": params or {},
                             "id": request_id})
        client_timeout = aiohttp.ClientTimeout(total=total, sock_connect=self.connect_timeout)
        try:
            async with self._session.post(
                    self.url, data=body, timeout=client_timeout,
                    headers={"Content-Type": "application/json"}) as response:
                payload = await response.read()
                status = response.status
        except TimeoutError:
            raise AgentUnreachable(f"{method}: no answer within {total:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise AgentUnreachable(f"{method}: {describe(exc)}") from None
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise AgentUnreachable(
                f"{method}: HTTP {status}, not JSON: {payload[:120]!r}") from None
        if not isinstance(answer, dict) or answer.get("jsonrpc") != "2.0":
            raise AgentUnreachable(f"{method}: HTTP {status}, not a JSON-RPC answer")
        if "error" in answer and isinstance(answer["error"], dict):
            raise AgentError(answer["error"])
        if "result" not in answer:
            raise AgentUnreachable(f"{method}: a JSON-RPC answer without a result")
        return answer["result"]

    @contextlib.asynccontextmanager
    async def stream(self, path: str, query: Mapping[str, str],
                     silence: float) -> AsyncIterator[aiohttp.ClientResponse]:
        """``GET path`` of the agent (a task's output stream), as an open response.

        On a session of its own: a stream may last as long as its task, and must
        not hold one of the pool's connections that the host's polling needs.
        ``silence``: seconds without a byte (not even a keep-alive) that end it.
        AgentUnreachable when the agent cannot be reached."""
        parts = urllib.parse.urlsplit(self.url)
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                        sock_read=silence)
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1, ssl=self._ssl)) as session:
            try:
                response = await session.get(url, params=query, timeout=timeout)
            except TimeoutError:
                raise AgentUnreachable(f"GET {path}: no answer within {silence:g} s") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise AgentUnreachable(f"GET {path}: {describe(exc)}") from None
            async with response:
                yield response

    async def close(self) -> None:
        await self._session.close()
        # Let the connector's transports finish closing (no ResourceWarning).
        await asyncio.sleep(0)
