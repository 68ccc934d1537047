"""The TLS listener of a real agent process: client certificates, TLS versions, roles.

One agent serves the module: plain HTTP on loopback (for readiness) and TLS
with our test CA; reader/operator/admin certificates are mapped to roles with
``--role``, the stranger's certificate (same CA) is not listed, so it gets
``default_role`` (none). Certificates from another CA, an expired one, no
certificate at all, and TLS 1.1 are refused in the handshake: the client sees
an ``ssl``/connection error and no HTTP answer, and the agent goes on serving.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import free_port
from tests.security_support import (
    ROLE_FLAGS,
    Pki,
    client_context,
    https_call,
    https_get,
    make_pki,
    start_agent,
)
from tests.support import AgentProcess
from tests.tasks_support import become_subreaper, kill_task_processes, make_image
from vdsm_agent import errors

NO_TASK = "00000000-0000-4000-8000-000000000000"
REFUSED = (ssl.SSLError, ConnectionError, OSError)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsAgent:
    def __init__(self, process: AgentProcess, tls_port: int, pki: Pki, images: Path) -> None:
        self.process = process
        self.tls_port = tls_port
        self.pki = pki
        self.images = images

    def context(self, identity: str) -> ssl.SSLContext:
        return client_context(self.pki, self.pki.clients[identity])

    def call(self, identity: str, method: str, **params: Any) -> dict[str, Any]:
        return https_call(self.tls_port, self.context(identity), method, **params)


@pytest.fixture(scope="module")
def tls_agent(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsAgent]:
    become_subreaper()
    tmp = tmp_path_factory.mktemp("tls-agent")
    images = tmp / "images"
    images.mkdir()
    tls_port = free_port()
    process = start_agent(
        tmp, free_port(), "--tls-listen", f"127.0.0.1:{tls_port}",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-ca", str(pki.ca_file), "--allowed-root", str(images), *ROLE_FLAGS)
    try:
        yield TlsAgent(process, tls_port, pki, images)
    finally:
        process.stop()
        kill_task_processes(process.state_dir)


def test_a_client_certificate_of_our_ca_gets_in(tls_agent):
    answer = tls_agent.call("reader.example.com", "ping")
    assert answer["result"]["version"]


def test_only_tls_12_or_newer_is_spoken(tls_agent):
    context = tls_agent.context("reader.example.com")
    with socket.create_connection(("127.0.0.1", tls_agent.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    old = client_context(tls_agent.pki, tls_agent.pki.clients["admin.example.com"],
                         max_version=ssl.TLSVersion.TLSv1_1)
    with pytest.raises(REFUSED):
        https_call(tls_agent.tls_port, old, "ping")


@pytest.mark.parametrize("client", ["another CA", "expired", "no certificate"])
def test_other_clients_are_refused_in_the_handshake(tls_agent, client):
    pki = tls_agent.pki
    cert = {"another CA": pki.intruder, "expired": pki.expired,
            "no certificate": None}[client]
    with pytest.raises(REFUSED):
        https_call(tls_agent.tls_port, client_context(pki, cert), "ping")
    # The agent is unharmed and still serves the good ones.
    assert "result" in tls_agent.call("admin.example.com", "ping")
    assert "Traceback" not in tls_agent.process.log_path.read_text()


def test_roles_follow_the_certificate(tls_agent):
    image = tls_agent.images / "disk.img"
    make_image(image, 8192)
    start = {"kind": "checksum", "params": {"path": str(image)}}
    reader = tls_agent.call("reader.example.com", "startTask", **start)
    assert reader["error"]["code"] == errors.Forbidden.code
    assert reader["error"]["data"]["identity"] == "reader.example.com"
    managed = tls_agent.call("reader.example.com", "manageStorageConnection",
                             uri=f"file://{tls_agent.images}", connectionID="c")
    assert managed["error"]["code"] == errors.Forbidden.code
    operator = tls_agent.call("operator.example.com", "startTask", **start)
    task_id = operator["result"]["taskID"]
    reset = tls_agent.call("operator.example.com", "resetTaskState", taskID=task_id,
                           state="failed", reason="test")
    assert reset["error"]["code"] == errors.Forbidden.code
    admin = tls_agent.call("admin.example.com", "resetTaskState", taskID=NO_TASK,
                           state="failed", reason="test")
    assert admin["error"]["data"]["name"] == "TaskNotFound"  # allowed; no such task
    done = tls_agent.call("reader.example.com", "waitTask", taskID=task_id, timeout=30)
    assert done["result"]["state"] == "done"


def test_an_unlisted_certificate_gets_the_default_role(tls_agent):
    assert "result" in tls_agent.call("stranger.example.com", "ping")  # public
    answer = tls_agent.call("stranger.example.com", "getTaskKinds")
    assert answer["error"]["code"] == errors.Forbidden.code
    assert answer["error"]["data"]["role"] == "none"
    context = tls_agent.context("stranger.example.com")
    status, body = https_get(tls_agent.tls_port, context, f"/tasks/{NO_TASK}/output")
    assert status == 403
    assert json.loads(body)["error"]["name"] == "Forbidden"
    status, _ = https_get(tls_agent.tls_port, tls_agent.context("reader.example.com"),
                          f"/tasks/{NO_TASK}/output")
    assert status == 404  # read may follow output; this task does not exist


def test_calls_over_tls_are_audited_with_the_certificate_identity(tls_agent):
    tls_agent.call("operator.example.com", "deleteTask", taskID=NO_TASK)
    tls_agent.call("stranger.example.com", "cancelTask", taskID=NO_TASK)
    lines = [json.loads(line.split("[vdsm_agent.audit] ", 1)[1])
             for line in tls_agent.process.log_path.read_text().splitlines()
             if "[vdsm_agent.audit] " in line]
    deleted = [line for line in lines if line["verb"] == "deleteTask"]
    assert deleted[-1]["identity"] == "operator.example.com"
    assert deleted[-1]["transport"] == "tls"
    assert deleted[-1]["error"] == "TaskNotFound"
    refused = [line for line in lines if line["verb"] == "cancelTask"]
    assert refused[-1]["event"] == "forbidden"
    assert refused[-1]["identity"] == "stranger.example.com"


# -- start-up: configuration problems are clear errors -----------------------------------


def run_agent(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(tmp_path / "state"),
         "--listen", "127.0.0.1:0", "--unix-socket", "none", *args],
        capture_output=True, text=True, timeout=30, check=False)


def _encrypted_key(pki: Pki, path: Path) -> Path:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("missing cert", "tls_cert: cannot read"),
    ("key mismatch", "does not match"),
    ("encrypted key", "encrypted"),
    ("ca not pem", "tls_ca"),
    ("no ca", "tls_ca is required"),
    ("files without listener", "tls_listen is not"),
])
def test_tls_configuration_problems_are_clear_start_up_errors(tmp_path, pki, case, message):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    files = {"cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca_file}
    listen: list[str] = ["--tls-listen", "127.0.0.1:0"]
    if case == "missing cert":
        files["cert"] = tmp_path / "nope.pem"
    elif case == "key mismatch":
        files["cert"] = pki.other_server_cert
    elif case == "encrypted key":
        files["key"] = _encrypted_key(pki, tmp_path / "encrypted.key")
    elif case == "ca not pem":
        files["ca"] = not_pem
    elif case == "files without listener":
        listen = []
    args = [*listen, "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    if case != "no ca":
        args += ["--tls-ca", str(files["ca"])]
    result = run_agent(tmp_path, *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "state" / "agent.db").exists()


def test_plain_http_stays_loopback_only_even_with_tls(tmp_path, pki):
    result = subprocess.run(
        [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(tmp_path / "state"),
         "--listen", "0.0.0.0:54321", "--tls-listen", "0.0.0.0:0",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--tls-ca", str(pki.ca_file)],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "refusing to serve plain HTTP" in result.stderr
