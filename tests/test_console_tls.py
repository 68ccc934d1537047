"""The console on the engine's TLS listener: the same identities and roles as its API.

A real engine process with a TLS listener and the test CA's certificates
mapped to roles (tests/security_support.py): each certificate's console page
says who it is and shows what its role may do and nothing more; a caller
without a role gets no console; a post by the reader is refused by the server,
a form token is good only for the identity it was given to, and an action
the role allows goes through the engine's dispatcher, audited under the
certificate's identity.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security_support import ROLE_FLAGS, Pki, client_context, https_get, make_pki
from tests.support import AgentProcess, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
READER, OPERATOR, ADMIN, STRANGER = ("reader.example.com", "operator.example.com",
                                     "admin.example.com", "stranger.example.com")
TOKEN = re.compile(r'name="token" value="([0-9a-f]{64})"')


class TlsEngine:
    def __init__(self, process: AgentProcess, tls_port: int, pki: Pki, audit: Path) -> None:
        self.process = process
        self.tls_port = tls_port
        self.pki = pki
        self.audit = audit

    def request(self, identity: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.tls_port, timeout=30,
            context=client_context(self.pki, self.pki.clients[identity]))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode()
        finally:
            conn.close()

    def page(self, identity: str, path: str) -> str:
        status, _, text = self.request(identity, "GET", path, headers={"Accept": "text/html"})
        assert status == 200, (status, text)
        return text

    def post(self, identity: str, **fields: str) -> tuple[int, dict[str, str], str]:
        return self.request(identity, "POST", "/console/action",
                            urllib.parse.urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})

    def call(self, identity: str, method: str, **params: Any) -> dict[str, Any]:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        status, _, text = self.request(identity, "POST", "/jsonrpc", body.encode())
        assert status == 200, text
        return dict(json.loads(text))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEngine]:
    tmp = tmp_path_factory.mktemp("console-tls")
    pki = make_pki(tmp / "pki")
    port, tls_port = free_port(), free_port()
    audit = tmp / "audit.log"
    argv = [sys.executable, "-m", "vdsm_agent.engine.main", "serve", "--state-dir",
            str(tmp / "state"), "--listen", f"127.0.0.1:{port}", "--tls-listen",
            f"127.0.0.1:{tls_port}", "--tls-cert", str(pki.server_cert), "--tls-key",
            str(pki.server_key), "--tls-ca", str(pki.ca_file), *ROLE_FLAGS,
            "--audit-log", str(audit), "--unix-socket", str(tmp / "engine.sock")]
    log_path = tmp / "engine.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    process = AgentProcess(proc=proc, port=port, socket_path=tmp / "engine.sock",
                           state_dir=tmp / "state", log_path=log_path, argv=argv)
    try:
        process.wait_ready(timeout=30)
        secured = TlsEngine(process, tls_port, pki, audit)
        # A host in maintenance, never polled: the console has a row and an action.
        assert "result" in secured.call(ADMIN, "addHost", name="m", url="http://127.0.0.1:1",
                                        maintenance=True)
        yield secured
    finally:
        process.stop()
    assert "Traceback" not in log_path.read_text()


def test_each_certificate_sees_its_identity_and_what_its_role_may_do(engine):
    reader = engine.page(READER, "/console/")
    assert "<strong>reader.example.com</strong>" in reader
    assert '<strong id="role">read</strong>' in reader
    assert 'method="post"' not in reader
    assert 'method="post"' not in engine.page(READER, "/console/connections")
    operator_hosts = engine.page(OPERATOR, "/console/")
    assert '<strong id="role">operate</strong>' in operator_hosts
    assert "maintenance of host m" not in operator_hosts  # setHostMaintenance needs admin
    assert "Manage a storage connection" in engine.page(OPERATOR, "/console/connections")
    admin = engine.page(ADMIN, "/")  # GET / for a browser is the console
    assert 'aria-label="Stop maintenance of host m"' in admin
    # Without a role: no console (the gate's 403 on its pages; the text page at /).
    status, _, text = engine.request(STRANGER, "GET", "/console/")
    assert status == 403
    assert "needs read" in text
    status, _, text = engine.request(STRANGER, "GET", "/", headers={"Accept": "text/html"})
    assert status == 200
    assert "/console/" not in text


def test_posts_are_checked_for_role_token_and_identity(engine):
    forged = {"action": "maintenance-off", "host": "m", "next": "/console/"}
    # The reader: refused for its role, whatever token it sends.
    operator_token = TOKEN.search(engine.page(OPERATOR, "/console/connections")).group(1)
    status, _, text = engine.post(READER, token=operator_token, **forged)
    assert status == 403
    assert "your role is read; setHostMaintenance needs admin" in text
    # The admin with a token given to someone else: refused.
    status, _, text = engine.post(ADMIN, token=operator_token, **forged)
    assert status == 403
    assert "token" in text
    assert engine.call(ADMIN, "getHost", name="m")["result"]["maintenance"] is True
    # The admin with its own token: done, through the dispatcher, audited as the admin.
    admin_token = TOKEN.search(engine.page(ADMIN, "/console/")).group(1)
    status, headers, _ = engine.post(ADMIN, token=admin_token, **forged)
    assert status == 303
    assert headers["Location"] == "/console/"
    assert engine.call(ADMIN, "getHost", name="m")["result"]["maintenance"] is False
    lines = [json.loads(line) for line in engine.audit.read_text().splitlines() if line]
    calls = [(line["event"], line["identity"], line["outcome"]) for line in lines
             if line["verb"] == "setHostMaintenance"]
    assert calls == [("forbidden", READER, "error"), ("call", ADMIN, "ok")]
    # A read of a page that does not exist for the reader: plain 404 page, no traceback.
    status, _, _ = engine.request(READER, "GET", "/console/tasks/m/" + "0" * 32)
    assert status == 404


def test_https_get_of_static_files_needs_read(engine):
    status, body = https_get(engine.tls_port, client_context(engine.pki, engine.pki.clients[
        READER]), "/console/static/console.js")
    assert status == 200
    assert b"EventSource" in body
    status, _ = https_get(engine.tls_port, client_context(engine.pki, engine.pki.clients[
        STRANGER]), "/console/static/console.js")
    assert status == 403
