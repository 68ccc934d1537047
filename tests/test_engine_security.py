"""The engine's own API, secured by the agent's code: a real ``vdsm-engine serve``
process with real certificates (``trustme``, tests/security_support.py).

One engine serves the module: plain HTTP on loopback (anonymous: no
``loopback_role``, so ``default_role`` none), a Unix socket (``SO_PEERCRED``:
the test runs as the engine's own user, so it is admin there) and TLS with our
test CA, the reader/operator/admin certificates mapped to roles with
``--role`` and the stranger's (same CA) not listed. Small limits (body,
batch, long-polls) so that each is reached in a few calls.

What the module checks: each verb's role as ``rpc_schema/engine.json`` says
(read views, operate jobs, admin the registry), refusals as ``Forbidden``
with who and what was needed; certificates of another CA, expired ones and
none at all refused in the handshake; ``GET /metrics`` and a task's output
stream need read; the audit log of mutating calls and refusals, with the
certificate's identity; oversize bodies, batches and long-polls answered
``LimitExceeded`` (never HTTP 500); and start-up refusals (plain HTTP off
loopback, half-configured TLS) with exit status 2, as the agent's.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.engine_support import engine_config
from tests.security_support import (
    ROLE_FLAGS,
    Pki,
    client_context,
    https_call,
    https_get,
    make_pki,
)
from tests.support import AgentProcess
from vdsm_agent import errors
from vdsm_agent.security import gate
from vdsm_agent.security.roles import Role

REFUSED = (ssl.SSLError, ConnectionError, OSError)
NO_TASK = "00000000-0000-4000-8000-000000000000"
MAX_BODY = 4096
MAX_BATCH = 3
MAX_LONG_POLLS = 2
READER, OPERATOR, ADMIN, STRANGER = ("reader.example.com", "operator.example.com",
                                     "admin.example.com", "stranger.example.com")


def engine_argv(state: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vdsm_agent.engine.main", "serve", "--state-dir",
            str(state), "--listen", f"127.0.0.1:{port}", "--log-level", "info", *extra]


class SecuredEngine:
    """The module's engine process (an ``AgentProcess`` holds any of our daemons)."""

    def __init__(self, process: AgentProcess, tls_port: int, pki: Pki, audit: Path) -> None:
        self.process = process
        self.tls_port = tls_port
        self.pki = pki
        self.audit = audit

    def context(self, identity: str) -> ssl.SSLContext:
        return client_context(self.pki, self.pki.clients[identity])

    def call(self, identity: str, method: str, **params: Any) -> dict[str, Any]:
        """The whole answer of a call over TLS with ``identity``'s certificate
        (``https_call`` takes ``timeout`` for itself: waitJob has one too)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.tls_port, timeout=30,
                                           context=self.context(identity))
        try:
            conn.request("POST", "/jsonrpc", body=json.dumps(
                {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}))
            response = conn.getresponse()
            data = response.read()
            assert response.status == 200, (response.status, data)
            return dict(json.loads(data))
        finally:
            conn.close()

    def post_plain(self, body: bytes, unix: bool = False) -> tuple[int, Any]:
        """POST /jsonrpc over loopback TCP (anonymous) or the Unix socket."""
        status, data = self.process.http("POST", "/jsonrpc", body, unix=unix)
        return status, json.loads(data) if data else None

    def plain(self, method: str, unix: bool = False, **params: Any) -> dict[str, Any]:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        status, answer = self.post_plain(body.encode(), unix=unix)
        assert status == 200, answer
        return dict(answer)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]


def forbidden(answer: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` of a Forbidden answer (fails on anything else)."""
    assert "error" in answer, answer
    error = answer["error"]
    assert error["code"] == errors.Forbidden.code, error
    assert error["data"]["name"] == "Forbidden", error
    return dict(error["data"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def engine(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredEngine]:
    tmp = tmp_path_factory.mktemp("engine")
    port, tls_port = free_port(), free_port()
    socket_path, audit = tmp / "engine.sock", tmp / "audit.log"
    argv = engine_argv(
        tmp / "state", port, "--unix-socket", str(socket_path),
        "--tls-listen", f"127.0.0.1:{tls_port}", "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca_file), *ROLE_FLAGS,
        "--audit-log", str(audit), "--max-body-size", str(MAX_BODY),
        "--max-batch", str(MAX_BATCH), "--max-long-polls", str(MAX_LONG_POLLS),
        "--loopback-metrics", "true")
    log_path = tmp / "engine.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    process = AgentProcess(proc=proc, port=port, socket_path=socket_path,
                           state_dir=tmp / "state", log_path=log_path, argv=argv)
    try:
        process.wait_ready(timeout=30)
        secured = SecuredEngine(process, tls_port, pki, audit)
        # A host in maintenance (never polled): jobs on it stay pending, so
        # waitJob waits and nothing is called on an agent.
        added = secured.call(ADMIN, "addHost", name="m", url="http://127.0.0.1:1",
                             maintenance=True)
        assert "result" in added, added
        yield secured
    finally:
        process.stop()
    assert "Traceback" not in log_path.read_text()


# -- roles per verb, as the schema declares ----------------------------------------------


def test_a_reader_may_read_and_nothing_more(engine):
    for method, params in [("ping", {}), ("listHosts", {}), ("getHost", {"name": "m"}),
                           ("listTasks", {}), ("listJobs", {}), ("rpc.discover", {})]:
        answer = engine.call(READER, method, **params)
        assert "result" in answer, (method, answer)
    data = forbidden(engine.call(READER, "startTask", host="m", kind="test.sleep", params={}))
    assert (data["identity"], data["role"], data["required"]) == (READER, "read", "operate")
    data = forbidden(engine.call(READER, "addHost", name="x", url="http://127.0.0.1:2"))
    assert data["required"] == "admin"
    assert "error" in engine.call(READER, "getHost", name="x")  # nothing was added


def test_an_operator_runs_jobs_but_does_not_change_the_registry(engine):
    started = engine.call(OPERATOR, "startTask", host="m", kind="test.sleep", params={})
    assert started["result"]["jobID"], started
    assert "result" in engine.call(OPERATOR, "manageStorageConnection", hosts=["m"],
                                   uri="nfs://nfs.example.com/export", connectionID="c1")
    for method, params in [("addHost", {"name": "y", "url": "http://127.0.0.1:3"}),
                           ("removeHost", {"name": "m"}),
                           ("setHostMaintenance", {"name": "m", "maintenance": False})]:
        data = forbidden(engine.call(OPERATOR, method, **params))
        assert (data["role"], data["required"]) == ("operate", "admin"), method
    host = engine.call(ADMIN, "getHost", name="m")["result"]
    assert host["maintenance"] is True  # the refused call changed nothing


def test_an_admin_may_change_the_registry(engine):
    assert "result" in engine.call(ADMIN, "addHost", name="a1", url="http://127.0.0.1:4",
                                   maintenance=True)
    assert "result" in engine.call(ADMIN, "removeHost", name="a1")


def test_an_unlisted_certificate_gets_the_default_role_none(engine):
    data = forbidden(engine.call(STRANGER, "ping"))
    assert (data["identity"], data["role"]) == (STRANGER, "none")


@pytest.mark.parametrize("client", ["another CA", "expired", "no certificate"])
def test_other_clients_are_refused_in_the_handshake(engine, client):
    pki = engine.pki
    cert = {"another CA": pki.intruder, "expired": pki.expired, "no certificate": None}[client]
    with pytest.raises(REFUSED):
        https_call(engine.tls_port, client_context(pki, cert), "ping")
    assert "result" in engine.call(READER, "ping")  # and the engine serves on


def test_a_loopback_tcp_caller_is_anonymous(engine):
    """No loopback_role: an anonymous caller has default_role (none) on plain HTTP."""
    data = forbidden(engine.plain("listHosts"))
    assert (data["identity"], data["role"]) == ("anonymous", "none")
    data = forbidden(engine.plain("addHost", name="z", url="http://127.0.0.1:5"))
    assert data["required"] == "admin"
    status, _ = engine.process.http("GET", "/health", unix=False)
    assert status == 200  # public: load balancers and systemd checks


def test_a_default_engine_gives_an_anonymous_caller_nothing(tmp_path):
    """The attack: any local process adds a host (or removes one, or starts jobs on
    every host) through the engine's plain loopback HTTP. With the defaults it is
    anonymous, role none: Forbidden, audited, nothing added."""
    port = free_port()
    argv = engine_argv(tmp_path / "state", port)
    with open(tmp_path / "engine.log", "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    # No Unix socket here: wait_ready's "socket exists" check is given the state dir.
    process = AgentProcess(proc=proc, port=port, socket_path=tmp_path / "state",
                           state_dir=tmp_path / "state", log_path=tmp_path / "engine.log",
                           argv=argv)
    try:
        process.wait_ready(timeout=30)
        body = json.dumps({"jsonrpc": "2.0", "method": "addHost", "id": 1,
                           "params": {"name": "evil", "url": "http://127.0.0.1:9"}})
        status, data = process.http("POST", "/jsonrpc", body.encode(), unix=False)
        assert status == 200
        data = forbidden(json.loads(data))
        assert (data["identity"], data["role"], data["required"]) == (
            "anonymous", "none", "admin")
        body = json.dumps({"jsonrpc": "2.0", "method": "listHosts", "id": 1})
        status, data = process.http("POST", "/jsonrpc", body.encode(), unix=False)
        forbidden(json.loads(data))
        assert process.http("GET", "/health", unix=False)[0] == 200
    finally:
        process.stop()
    assert '"event":"forbidden","identity":"anonymous"' in (tmp_path / "engine.log").read_text()


def test_the_engines_own_user_is_admin_on_the_unix_socket(engine):
    """SO_PEERCRED: the kernel says who the peer is (here the engine's own uid)."""
    assert "result" in engine.plain("addHost", unix=True, name="u1",
                                    url="http://127.0.0.1:6", maintenance=True)
    assert "result" in engine.plain("removeHost", unix=True, name="u1")


def test_the_command_line_client_calls_over_tls_with_a_certificate(engine):
    """``vdsm-engine call --url https://... --cacert --cert`` (docs/engine.md)."""
    def call(identity: str, *words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vdsm_agent.engine.main", "call", "--url",
             f"https://127.0.0.1:{engine.tls_port}/jsonrpc", "--cacert",
             str(engine.pki.ca_file), "--cert", str(engine.pki.clients[identity]),
             "--compact", *words], capture_output=True, text=True, timeout=60, check=False)

    listed = call(READER, "listHosts")
    assert listed.returncode == 0, listed.stderr
    assert "m" in [host["name"] for host in json.loads(listed.stdout)["hosts"]]
    refused = call(READER, "addHost", "name=cli", "url=http://127.0.0.1:8")
    assert refused.returncode == 1
    assert "Forbidden" in refused.stderr
    assert "needs admin" in refused.stderr


# -- the HTTP routes: metrics and task output need read ------------------------------------


def test_metrics_need_read_on_tls_and_answer_loopback_with_loopback_metrics(engine):
    status, body = https_get(engine.tls_port, engine.context(READER), "/metrics")
    assert status == 200
    assert b"vdsm_engine_build_info" in body
    status, body = https_get(engine.tls_port, engine.context(STRANGER), "/metrics")
    assert status == 403
    assert json.loads(body)["error"]["name"] == "Forbidden"
    status, body = engine.process.http("GET", "/metrics", unix=False)
    assert status == 200
    assert b"vdsm_engine_build_info" in body


def test_a_tasks_output_stream_needs_read(engine):
    path = f"/hosts/m/tasks/{NO_TASK}/output"
    status, body = engine.process.http("GET", path, unix=False)
    assert status == 403
    assert json.loads(body)["error"]["identity"] == "anonymous"
    status, body = https_get(engine.tls_port, engine.context(STRANGER), path)
    assert status == 403
    # A reader gets through the gate: the host is in maintenance, so the stream
    # itself answers 503 HostUnreachable.
    status, body = https_get(engine.tls_port, engine.context(READER), path)
    assert status == 503
    assert json.loads(body)["error"]["name"] == "HostUnreachable"


# -- the audit log --------------------------------------------------------------------------


def test_mutating_calls_and_refusals_are_audited_with_the_identity(engine):
    engine.call(ADMIN, "addHost", name="audited", url="http://127.0.0.1:7", maintenance=True)
    job = engine.call(OPERATOR, "startTask", host="audited", kind="test.sleep", params={})
    engine.call(OPERATOR, "cancelTask", host="audited", taskID=NO_TASK)
    engine.call(READER, "removeHost", name="audited")
    engine.call(READER, "listHosts")
    lines = engine.audit_lines()
    added = [line for line in lines if line["verb"] == "addHost"
             and line["params"].get("name") == "audited"]
    assert len(added) == 1
    assert (added[0]["event"], added[0]["identity"], added[0]["transport"],
            added[0]["role"], added[0]["outcome"]) == ("call", ADMIN, "tls", "admin", "ok")
    started = [line for line in lines if line["verb"] == "startTask"
               and line["params"].get("host") == "audited"]
    assert [(line["identity"], line["result"]) for line in started] == [
        (OPERATOR, {"jobID": job["result"]["jobID"], "state": "pending"})]
    canceled = [line for line in lines if line["verb"] == "cancelTask"]
    assert (canceled[-1]["identity"], canceled[-1]["role"]) == (OPERATOR, "operate")
    assert canceled[-1]["params"] == {"host": "audited", "taskID": NO_TASK}
    refused = [line for line in lines if line["verb"] == "removeHost"
               and line["params"].get("name") == "audited"]
    assert [(line["event"], line["identity"], line["required"]) for line in refused] == [
        ("forbidden", READER, "admin")]
    # A read is not audited (its refusals are: test_a_loopback_tcp_caller_is_anonymous).
    assert not [line for line in lines if line["verb"] == "listHosts"
                and line["event"] == "call"]


# -- limits --------------------------------------------------------------------------------


def test_an_oversize_body_is_limit_exceeded_not_500(engine):
    body = json.dumps({"jsonrpc": "2.0", "method": "listHosts", "id": 1,
                       "params": {"pageToken": "x" * (2 * MAX_BODY)}}).encode()
    for unix in (True, False):
        status, answer = engine.post_plain(body, unix=unix)
        assert status == 413
        assert answer["error"]["code"] == errors.INVALID_REQUEST
        assert answer["error"]["data"]["name"] == "LimitExceeded"
        assert answer["error"]["data"]["limit"] == "max_body_size"
    conn = http.client.HTTPSConnection("127.0.0.1", engine.tls_port, timeout=20,
                                       context=engine.context(READER))
    try:
        conn.request("POST", "/jsonrpc", body=body)
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["data"]["limit"] == "max_body_size"
    finally:
        conn.close()


def test_an_oversize_batch_is_limit_exceeded(engine):
    batch = [{"jsonrpc": "2.0", "method": "ping", "id": index}
             for index in range(MAX_BATCH + 1)]
    status, answer = engine.post_plain(json.dumps(batch).encode(), unix=True)
    assert status == 200
    assert answer["error"]["data"]["name"] == "LimitExceeded"
    assert answer["error"]["data"]["limit"] == "max_batch"
    status, answer = engine.post_plain(json.dumps(batch[:MAX_BATCH]).encode(), unix=True)
    assert [member["id"] for member in answer] == list(range(MAX_BATCH))


def test_long_polls_beyond_max_long_polls_answer_at_once(engine):
    """MAX_LONG_POLLS + 1 waitJob at once: whichever comes last is refused at once
    (LimitExceeded naming max_long_polls); the others wait their 2 s."""
    job = engine.call(OPERATOR, "startTask", host="m", kind="test.sleep", params={})
    job_id = job["result"]["jobID"]

    def wait() -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        answer = engine.call(READER, "waitJob", jobID=job_id, timeout=2)
        return answer, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(MAX_LONG_POLLS + 1) as pool:
        answers = [future.result() for future in
                   [pool.submit(wait) for _ in range(MAX_LONG_POLLS + 1)]]
    refused = [(answer, took) for answer, took in answers if "error" in answer]
    served = [(answer, took) for answer, took in answers if "result" in answer]
    assert len(refused) == 1, answers
    assert len(served) == MAX_LONG_POLLS, answers
    answer, took = refused[0]
    assert took < 1.5  # at once, not after a wait
    data = answer["error"]["data"]
    assert (data["name"], data["limit"], data["max"]) == (
        "LimitExceeded", "max_long_polls", MAX_LONG_POLLS)
    assert "the engine is serving its limit" in data["detail"]
    assert "waitJob" in data["detail"]
    assert all(answer["result"]["state"] == "pending" and took >= 1.9
               for answer, took in served)
    # The slots are free again.
    assert "result" in engine.call(READER, "waitJob", jobID=job_id, timeout=0.1)


# -- start-up -------------------------------------------------------------------------------


def run_engine(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdsm_agent.engine.main", "serve", "--state-dir",
         str(tmp_path / "state"), *args], capture_output=True, text=True, timeout=30,
        check=False)


def test_plain_http_off_loopback_is_refused_at_start(tmp_path, pki):
    result = run_engine(tmp_path, "--listen", "0.0.0.0:0", "--tls-listen", "0.0.0.0:0",
                        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                        "--tls-ca", str(pki.ca_file))
    assert result.returncode == 2, result
    assert "refusing to serve plain HTTP on 0.0.0.0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "engine.db").exists()


@pytest.mark.parametrize(("case", "message"), [
    ("files without listener", "tls_listen is not"),
    ("no ca", "tls_ca is required"),
    ("key mismatch", "does not match"),
])
def test_tls_configuration_problems_are_clear_start_up_errors(tmp_path, pki, case, message):
    listen = [] if case == "files without listener" else ["--tls-listen", "127.0.0.1:0"]
    cert = pki.other_server_cert if case == "key mismatch" else pki.server_cert
    args = [*listen, "--listen", "127.0.0.1:0", "--tls-cert", str(cert),
            "--tls-key", str(pki.server_key)]
    if case != "no ca":
        args += ["--tls-ca", str(pki.ca_file)]
    result = run_engine(tmp_path, *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -- who calls, for the engine's handlers and the web console -----------------------------


async def test_caller_of_tells_a_handler_who_calls(aiohttp_client, tmp_path):
    from vdsm_agent.engine.app import make_app

    async def whoami(request: web.Request) -> web.Response:
        caller = gate.caller_of(request)
        return web.json_response({"identity": caller.identity, "transport": caller.transport,
                                  "role": str(caller.role),
                                  "operate": caller.role >= Role.OPERATE})

    app = make_app(engine_config(tmp_path, loopback_role="read"))
    app.router.add_get("/whoami", whoami)
    client = await aiohttp_client(app)
    response = await client.get("/whoami")
    assert response.status == 200
    assert await response.json() == {"identity": "anonymous", "transport": "tcp",
                                     "role": "read", "operate": False}
