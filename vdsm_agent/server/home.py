"""What a person gets who points a browser or curl at the server: ``GET /`` and ``GET /jsonrpc``.

``GET /`` answers a short page: the program and its version, how to call it
(curl over the Unix socket for privileged calls, since a loopback TCP caller
is anonymous; the client) and where the documentation is. Plain text, or
HTML when the client accepts ``text/html`` (a browser). ``GET /jsonrpc``
answers 405 with one line saying to POST JSON-RPC, with a curl example.

Both are public (``security/gate.py``, like ``/health``) and cost the same
whoever asks: the bodies are built once, when the application is made, from
the configuration, and never read anything per request.
"""

from __future__ import annotations

import dataclasses
import html
import shlex
from collections.abc import Sequence

from aiohttp import web

from vdsm_agent import __version__
from vdsm_agent.settings import Config

PING = '{"jsonrpc":"2.0","method":"ping","id":1}'
HOME_ROUTE = "/"
JSONRPC_ROUTE = "/jsonrpc"


def curl(url: str, method: str = "ping", unix_socket: str | None = None) -> str:
    """A curl command line that calls ``method`` at ``url`` (through ``unix_socket``)."""
    body = f'{{"jsonrpc":"2.0","method":"{method}","id":1}}'
    words = ["curl", "-s"]
    if unix_socket:
        words += ["--unix-socket", unix_socket]
    return " ".join([*words, "-d", shlex.quote(body), url])


@dataclasses.dataclass(frozen=True)
class Page:
    """What ``GET /`` says: a title, paragraphs, example commands and documents."""

    title: str  # "vdsm-agent 0.1.0"
    summary: str
    paragraphs: Sequence[str]
    examples: Sequence[str]
    documents: Sequence[tuple[str, str]]  # (name, what it is)

    def text(self) -> bytes:
        lines = [f"{self.title}: {self.summary}", ""]
        for paragraph in self.paragraphs:
            lines += [paragraph, ""]
        lines += [f"  {example}" for example in self.examples]
        lines += ["", "Documentation:"]
        lines += [f"  {name}: {what}" for name, what in self.documents]
        return ("\n".join(lines) + "\n").encode()

    def html(self) -> bytes:
        escape = html.escape
        parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
                 f"<title>{escape(self.title)}</title></head><body>",
                 f"<h1>{escape(self.title)}</h1>", f"<p>{escape(self.summary)}</p>"]
        parts += [f"<p>{escape(paragraph)}</p>" for paragraph in self.paragraphs]
        parts.append(f"<pre>{escape(chr(10).join(self.examples))}</pre>")
        parts.append("<h2>Documentation</h2><ul>")
        for name, what in self.documents:
            target = name if name.startswith("/") else None
            shown = (f'<a href="{escape(target)}">{escape(name)}</a>' if target
                     else f"<code>{escape(name)}</code>")
            parts.append(f"<li>{shown}: {escape(what)}</li>")
        parts.append("</ul></body></html>")
        return ("\n".join(parts) + "\n").encode()


def install(app: web.Application, page: Page, hint: str) -> None:
    """``GET /`` (``page``) and ``GET /jsonrpc`` (405 with the one-line ``hint``)."""
    text, markup, hint_body = page.text(), page.html(), (hint + "\n").encode()

    async def home(request: web.Request) -> web.Response:
        if "text/html" in request.headers.get("Accept", ""):
            return web.Response(body=markup, content_type="text/html", charset="utf-8")
        return web.Response(body=text, content_type="text/plain", charset="utf-8")

    async def jsonrpc_get(request: web.Request) -> web.Response:
        return web.Response(status=405, body=hint_body, content_type="text/plain",
                            charset="utf-8", headers={"Allow": "POST"})

    app.router.add_get(HOME_ROUTE, home)
    app.router.add_get(JSONRPC_ROUTE, jsonrpc_get)


def jsonrpc_hint(example: str) -> str:
    """The 405's one line: POST JSON-RPC, e.g. ``example``."""
    return f"{JSONRPC_ROUTE} takes JSON-RPC 2.0 by POST, not GET; try: {example}"


def jsonrpc_url(address: tuple[str, int], scheme: str = "http") -> str:
    host, port = address
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{JSONRPC_ROUTE}"


def agent_page(listen: str, unix_socket: str | None, tls_url: str | None) -> tuple[Page, str]:
    """The agent's page and 405 hint; ``listen`` is its plain HTTP URL (``/jsonrpc``)."""
    examples = [curl(listen)]
    paragraphs = [
        "Call it with JSON-RPC 2.0 by POST to /jsonrpc. A loopback TCP caller is anonymous "
        "and may only ping: everything else goes through the agent's Unix socket (root is "
        "admin there) or TLS with a client certificate, as docs/security.md says.",
    ]
    if unix_socket:
        examples += [curl("http://localhost/jsonrpc", "getCapabilities", unix_socket),
                     f"vdsm-agent-client --unix-socket {shlex.quote(unix_socket)} "
                     "getCapabilities",
                     f"vdsm-agent-client --unix-socket {shlex.quote(unix_socket)} "
                     "listTasks --table"]
    if tls_url:
        examples.append(f"curl -s --cacert CA --cert CERT --key KEY -d '{PING}' {tls_url}")
    page = Page(
        title=f"vdsm-agent {__version__}",
        summary="host-local storage agent (storage connections and long-running "
                "operations on local devices)",
        paragraphs=paragraphs, examples=examples,
        documents=[("/health", "status, version and uptime (JSON)"),
                   ("rpc.discover", "every verb, its params, result and errors "
                                    "(OpenRPC; POST it like any verb)"),
                   ("man vdsm-agent-client", "the command-line client"),
                   ("man vdsm-agent", "the daemon and its settings"),
                   ("docs/api.md, docs/tasks.md, docs/cli.md, docs/security.md",
                    "the reference, in the source")])
    return page, jsonrpc_hint(examples[0])


def install_agent(app: web.Application, config: Config) -> None:
    """The agent's ``GET /`` and ``GET /jsonrpc``, from its listeners' settings."""
    unix_socket = config.unix_socket_path
    tls = config.tls_listen
    install(app, *agent_page(jsonrpc_url(config.listen), str(unix_socket) if unix_socket else None,
                             jsonrpc_url(tls, "https") if tls else None))


def engine_page(listen: str) -> tuple[Page, str]:
    """The engine's page and 405 hint; ``listen`` is its HTTP URL (``/jsonrpc``)."""
    examples = [curl(listen), curl(listen, "listHosts"),
                "vdsm-engine call listHosts --table",
                "vdsm-engine call listTasks state=running --table"]
    page = Page(
        title=f"vdsm-engine {__version__}",
        summary="one view over many vdsm-agent hosts: their tasks, storage connections "
                "and jobs",
        paragraphs=["Call it with JSON-RPC 2.0 by POST to /jsonrpc, or with vdsm-engine "
                    "call. A task's output: getTaskOutput(host, taskID), or GET "
                    "/hosts/HOST/tasks/TASK_ID/output?follow=1.",
                    "A loopback TCP caller is anonymous (loopback_role, else "
                    "default_role): callers with rights come over TLS with a client "
                    "certificate or over the engine's Unix socket, as docs/engine.md "
                    "(Security) says."],
        examples=examples,
        documents=[("/health", "status, version and hosts by status (JSON)"),
                   ("rpc.discover", "every verb (OpenRPC; POST it like any verb)"),
                   ("man vdsm-engine-call", "the command-line client"),
                   ("man vdsm-engine", "the daemon and its settings"),
                   ("docs/engine.md, docs/engine-api.md", "the reference, in the source")])
    return page, jsonrpc_hint(examples[0])
