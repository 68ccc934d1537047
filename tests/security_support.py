"""Helpers for the security tests: certificates made on the spot, TLS and local clients.

Certificates come from ``trustme`` (throwaway CAs, ECDSA keys, made in
milliseconds): our CA with a server certificate for 127.0.0.1/localhost and
client certificates for reader/operator/admin/stranger identities, a second
CA with its own client (an intruder), and a client of our CA that expired
yesterday. Nothing is written outside the test's temp directory.

``https_call`` speaks JSON-RPC over ``http.client`` with an ``ssl`` client
context, so that a refused handshake shows as the ``ssl``/socket error it is.
``run_as`` runs a small stdlib-only client as another uid (root tests only),
to prove what the agent makes of a local caller that is not root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.client
import json
import os
import pwd
import secrets
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trustme
from hypothesis import strategies as st

from tests.support import AgentProcess

NOBODY = 65534
CLIENTS = ("reader.example.com", "operator.example.com", "admin.example.com",
           "stranger.example.com")
ROLE_FLAGS = ("--role", "reader.example.com=read", "--role", "operator.example.com=operate",
              "--role", "admin.example.com=admin")


@dataclasses.dataclass
class Pki:
    """Files of a small PKI under ``root``."""

    root: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, Path]  # identity -> PEM with key and certificate
    intruder: Path  # a client of another CA
    expired: Path  # a client of our CA whose certificate has expired
    other_ca_file: Path
    other_server_cert: Path  # a server certificate of the other CA (key mismatch tests)


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="vdsm-agent test CA")
    other = trustme.CA(organization_name="someone else's CA")
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other_ca_file = root / "other-ca.pem"
    other.cert_pem.write_to_path(str(other_ca_file))
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="agent.example.com")
    server_cert, server_key = root / "server.pem", root / "server.key"
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    server.private_key_pem.write_to_path(str(server_key))
    os.chmod(server_key, 0o600)
    clients = {}
    for name in CLIENTS:
        path = root / f"{name}.pem"
        ca.issue_cert(name, common_name=name).private_key_and_cert_chain_pem.write_to_path(
            str(path))
        clients[name] = path
    intruder = root / "intruder.pem"
    other.issue_cert("admin.example.com", common_name="admin.example.com") \
        .private_key_and_cert_chain_pem.write_to_path(str(intruder))
    now = datetime.datetime.now(datetime.UTC)
    expired = root / "expired.pem"
    ca.issue_cert("admin.example.com", common_name="admin.example.com",
                  not_before=now - datetime.timedelta(days=30),
                  not_after=now - datetime.timedelta(days=1)) \
        .private_key_and_cert_chain_pem.write_to_path(str(expired))
    other_server_cert = root / "other-server.pem"
    other.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(other_server_cert))
    return Pki(root, ca_file, server_cert, server_key, clients, intruder, expired,
               other_ca_file, other_server_cert)


def client_context(pki: Pki, cert: Path | None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context trusting our CA, presenting ``cert`` (None: no certificate)."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert))
    if max_version is not None:
        # An old client on purpose (Python warns that TLS < 1.2 is deprecated).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = max_version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def https_call(port: int, context: ssl.SSLContext, method: str, timeout: float = 20,
               **params: Any) -> dict[str, Any]:
    """The whole JSON-RPC answer (result or error) of one call over HTTPS."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        conn.request("POST", "/jsonrpc", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, (response.status, data)
        return dict(json.loads(data))
    finally:
        conn.close()


def https_get(port: int, context: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_agent(tmp: Path, port: int, *extra: str, socket_path: Path | None = None,
                timeout: float = 30) -> AgentProcess:
    """A real agent process with extra flags (plain HTTP on loopback for readiness)."""
    state = tmp / "agent-state"
    socket_path = socket_path or tmp / "agent.sock"
    argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(state),
            "--listen", f"127.0.0.1:{port}", "--unix-socket", str(socket_path),
            "--log-level", "debug", *extra]
    log_path = tmp / f"agent-{int(time.monotonic() * 1000)}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    agent = AgentProcess(proc=proc, port=port, socket_path=socket_path, state_dir=state,
                         log_path=log_path, argv=argv)
    try:
        agent.wait_ready(timeout=timeout)
    except BaseException:
        agent.stop()
        raise
    return agent


# A stdlib-only JSON-RPC client run by /usr/bin/python3 as another user: argv is
# [unix-socket-path | "tcp:PORT", method, params-json]; prints the JSON answer.
_CLIENT = r"""
import http.client, json, socket, sys
target, method, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(target)
if target.startswith("tcp:"):
    conn = http.client.HTTPConnection("127.0.0.1", int(target[4:]), timeout=20)
else:
    conn = Unix("localhost", timeout=20)
body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
conn.request("POST", "/jsonrpc", body=body, headers={"Content-Type": "application/json"})
response = conn.getresponse()
print(json.dumps({"status": response.status, "answer": json.loads(response.read())}))
"""


@contextlib.contextmanager
def created_user(prefix: str = "vdsmtest") -> Iterator[tuple[str, int]]:
    """A real, throwaway non-root user (``useradd``; needs root), removed afterwards."""
    name = f"{prefix}{os.getpid() % 100000}{secrets.token_hex(2)}"[:31]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", name], check=True, capture_output=True, timeout=60)
    try:
        yield name, pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)


def run_as(uid: int, target: str, method: str, **params: Any) -> dict[str, Any]:
    """Call ``method`` as user ``uid`` (needs root) over a Unix socket path or "tcp:PORT"."""
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", _CLIENT, target, method, json.dumps(params)],
        user=uid, group=uid, extra_groups=[], cwd="/", capture_output=True, text=True,
        timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == 200, answer
    return dict(answer["answer"])


# -- an in-process agent in a thread, for synchronous (hypothesis) tests -----------------


class ThreadedAgent:
    """``make_app(config)`` served on 127.0.0.1 from a thread with its own event loop.

    Hypothesis drives synchronous tests; this lets them post bodies to a real
    aiohttp server in this process, so that monkeypatches (no task processes,
    a fake command runner, no device probing) apply to the agent.
    """

    def __init__(self, config: Any) -> None:
        import asyncio
        import threading

        from aiohttp import web

        from vdsm_agent.server.app import AGENT, make_app

        self.app = make_app(config)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        failure: list[BaseException] = []

        async def start() -> None:
            self.runner = web.AppRunner(self.app, handle_signals=False)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = int(self.runner.addresses[0][1])

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, name="threaded-agent", daemon=True)
        self.thread.start()
        ready.wait(60)
        if failure:
            raise failure[0]
        self.agent = self.app[AGENT]
        self._conn: http.client.HTTPConnection | None = None

    def on_loop(self, fn: Any) -> Any:
        """Run ``fn()`` on the agent's loop and wait for its result."""
        import asyncio

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def post(self, body: bytes, path: str = "/jsonrpc") -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                self._conn.request("POST", path, body=body,
                                   headers={"Content-Type": "application/json"})
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        status, data = self.post(body.encode())
        assert status == 200, (status, data)
        return dict(json.loads(data))

    def stop(self) -> None:
        import asyncio

        if self._conn is not None:
            self._conn.close()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


# -- JSON Schema -> hypothesis strategy (the subset rpc_schema and the kinds use) ---------


def from_schema(schema: dict[str, Any], components: dict[str, Any] | None = None,
                depth: int = 0) -> Any:
    """A hypothesis strategy of values valid for ``schema``.

    Covers what the agent's schemas use: type (or a list of types), enum, const,
    $ref to #/components/schemas, oneOf/anyOf, string minLength/maxLength/
    pattern/format date-time, number and integer minimum/maximum, object
    properties/required/additionalProperties false/minProperties, array items/
    minItems/maxItems/uniqueItems. (hypothesis-jsonschema does this in general,
    but its last release does not work with current hypothesis.)
    """
    components = components or {}
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return from_schema(components.get("schemas", {})[name], components, depth + 1)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return st.one_of([from_schema(sub, components, depth + 1) for sub in schema[key]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": one}, components, depth)
                          for one in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2 ** 40)), schema.get("maximum", 2 ** 40))
    if kind == "number":
        return st.floats(schema.get("minimum", -1e9), schema.get("maximum", 1e9),
                         allow_nan=False, allow_infinity=False)
    if kind == "string":
        low, high = schema.get("minLength", 0), min(schema.get("maxLength", 64), 300)
        if schema.get("format") == "date-time":
            return st.datetimes(min_value=datetime.datetime(2000, 1, 1),
                                max_value=datetime.datetime(2100, 1, 1)).map(
                lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
        if "pattern" in schema:
            # JSON Schema patterns search (they are not anchored unless they say so).
            top = schema.get("maxLength", 10 ** 6)
            return st.from_regex(schema["pattern"]).map(
                lambda text: text if len(text) >= low else text + "x" * (low - len(text))
            ).filter(lambda text: low <= len(text) <= top)
        return st.text(min_size=low, max_size=max(low, high))
    if kind == "array":
        items = from_schema(schema.get("items", {}), components, depth + 1)
        return st.lists(items, min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4),
                        unique_by=(lambda item: json.dumps(item, sort_keys=True))
                        if schema.get("uniqueItems") else None)
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if depth > 4:
            return st.just({})
        strategy = st.fixed_dictionaries(
            {name: from_schema(sub, components, depth + 1)
             for name, sub in properties.items() if name in required},
            optional={name: from_schema(sub, components, depth + 1)
                      for name, sub in properties.items() if name not in required})
        minimum = schema.get("minProperties", 0)
        return strategy.filter(lambda value: len(value) >= minimum) if minimum else strategy
    # No type: any small JSON value.
    return st.none() | st.booleans() | st.integers() | st.text(max_size=20)


# -- hostile URIs (hypothesis) ------------------------------------------------------------

IQN = "iqn.2024-01.test.lbs:lun1"
HOSTILE_PARTS = ["-oProxyCommand=sh", "--help", "-", "..", ".", "a,b", "a=b", "ro,exec",
                 "%00", "%0A", "%2C", "%2F..%2F", "%20", "a b", "\x00", "\n", "\x1b[31m",
                 "a" * 300, "$(id)", "`id`", ";id", "|id", "&id", "'", '"', "\\", "*",
                 "[::1]", "127.0.0.1", "localhost", "user@host", "a:b", "%", "\u00e9"]
_words = st.sampled_from(HOSTILE_PARTS) | st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}",
                                                        fullmatch=True)
_paths = st.lists(_words, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
# Mostly-valid parts, so that many URIs get past parsing with one hostile part in them.
_good_hosts = st.sampled_from(["server.example.com", "10.0.0.1", "[::1]", "nfs1"])
_good_paths = st.from_regex(r"/[a-z0-9_]{1,8}(/[a-z0-9_.-]{1,8}){0,2}", fullmatch=True)
_queries = st.one_of(
    st.just(""),
    st.lists(st.sampled_from(["soft", "hard", "ro", "rw", "exec", "suid", "timeo=5",
                              "nconnect=17", "vers=3", "-o", "remount", "x=y=z", ",", "",
                              "sec=krb5,rw", "port=2049", "proto=tcp,bind"]), max_size=4)
    .map(lambda options: "?options=" + ",".join(options)),
    _words.map(lambda word: "?version=" + word),
    _words.map(lambda word: f"?{word}={word}"),
)


@st.composite
def hostile_uris(draw: st.DrawFn) -> str:
    """URIs of every scheme built from hostile parts (and some harmless ones)."""
    scheme = draw(st.sampled_from(["nfs", "iscsi", "glusterfs", "sshfs", "file", "loop"]))
    host = draw(st.one_of(_good_hosts, _good_hosts, _words))
    user = draw(st.one_of(st.just(""), _words.map(lambda word: word + "@"),
                          st.just("alice@"), st.just("alice@"), st.just("alice:secret@")))
    port = draw(st.one_of(st.just(""), st.sampled_from([":22", ":0", ":-1", ":99999",
                                                        ":3260", ":a"])))
    if scheme == "iscsi":
        path = "/" + draw(st.sampled_from([IQN, "-" + IQN, IQN + ",x", "iqn.x"]) | _words)
        path += draw(st.one_of(st.just(""), st.sampled_from(["/0", "/-1", "/1,2"]),
                               _words.map(lambda word: "/" + word)))
    else:
        path = draw(st.one_of(_good_paths, _good_paths, _paths))
    query = draw(_queries) if scheme == "nfs" else draw(st.one_of(st.just(""), _queries))
    bare = scheme in ("file", "loop") and draw(st.booleans())
    return f"{scheme}://{'' if bare else user + host + port}{path}{query}"
