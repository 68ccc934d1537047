"""GET /metrics of real agent and engine processes, scraped by a real Prometheus.

* A Prometheus server (Debian's ``prometheus``) on loopback, with a temporary
  config and storage directory, scrapes an agent and an engine every second;
  a real checksum task is started through the engine, and Prometheus' own
  HTTP API (``/api/v1/query``) must show what changed: the task finished and
  its bytes on the agent, the call, the host and the resource lock on the
  engine.
* ``promtool check metrics`` passes on both expositions.
* Who may read it: ``read`` over TLS (403 for a certificate without a role),
  an anonymous loopback TCP caller only with ``loopback_metrics`` (the
  default), root on the Unix socket.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine_process import EngineProcess, stop_process
from tests.engine_support import fleet
from tests.security_support import ROLE_FLAGS, client_context, https_get, make_pki, start_agent
from tests.support import free_port, until
from tests.tasks_support import become_subreaper, kill_task_processes, make_image
from vdsm_agent.client.transport import UnixHTTPConnection

pytestmark = [pytest.mark.tool("prometheus"), pytest.mark.slow]

IMAGE_SIZE = 3 * 1024 * 1024
# A resync every 2 s: the scrapes see a task soon after it ends.
ENGINE_FLAGS = ("--resync-interval", "2", "--retry-interval", "0.2", "--retry-max", "1")


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def promtool_check(exposition: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=exposition.decode(),
                          capture_output=True, text=True, timeout=60, check=False)


class Prometheus:
    """A Prometheus server on loopback scraping ``targets`` (job -> port) every second."""

    def __init__(self, root: Path, targets: dict[str, int]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            for job, port in targets.items())
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                          f"scrape_configs:\n{jobs}", encoding="utf-8")
        self.port = free_port()
        self.log = root / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT)
        until(lambda: self.proc.poll() is not None or self._ready(), timeout=60,
              what="prometheus is ready")
        assert self.proc.poll() is None, self.log.read_text()

    def _ready(self) -> bool:
        try:
            return http_get(self.port, "/-/ready")[0] == 200
        except OSError:
            return False

    def query(self, expression: str) -> float | None:
        """The value of an instant query with one series (None: no series)."""
        status, _, body = http_get(
            self.port, "/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
        answer = json.loads(body)
        assert status == 200, answer
        assert answer["status"] == "success", answer
        series = answer["data"]["result"]
        assert len(series) <= 1, series
        return float(series[0]["value"][1]) if series else None

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)


@pytest.fixture
def engine_and_agent(tmp_path: Path) -> Iterator[tuple[EngineProcess, Any]]:
    with fleet(tmp_path / "agents", 1) as agents:
        engine = EngineProcess(tmp_path, *ENGINE_FLAGS).start()
        try:
            agent = agents[0]
            engine.rpc("addHost", name=agent.name, url=agent.url)
            until(lambda: engine.rpc("getHost", name=agent.name)["status"] == "up",
                  timeout=20, interval=0.2)
            yield engine, agent
        finally:
            engine.stop()


def test_prometheus_scrapes_an_agent_and_an_engine_and_sees_a_task(tmp_path, engine_and_agent):
    engine, agent = engine_and_agent
    prometheus = Prometheus(tmp_path / "prometheus", {"agent": agent.port,
                                                      "engine": engine.port})
    try:
        for job in ("agent", "engine"):
            until(lambda job=job: prometheus.query(f'up{{job="{job}"}}') == 1, timeout=30,
                  interval=0.5, what=f"prometheus scrapes the {job}")
        done = 'vdsm_agent_tasks_finished_total{kind="checksum",state="done"}'
        assert prometheus.query(done) == 0
        assert prometheus.query('vdsm_engine_hosts{status="up"}') == 1

        image = make_image(agent.images / "disk.img", IMAGE_SIZE)
        job = engine.rpc("startTask", host=agent.name, kind="checksum",
                          params={"path": str(image)})
        task_id = job["steps"][0]["taskID"]
        # The engine sends the step on its own time: the host has the task soon.
        until(lambda: any(task.get("id", task.get("taskID")) == task_id
                          for task in agent.call("listTasks")["tasks"]), timeout=20)
        assert agent.call("waitTask", taskID=task_id, timeout=60)["state"] == "done"

        expected = {
            done: 1,
            'vdsm_agent_task_processed_bytes_total{kind="checksum"}': IMAGE_SIZE,
            'vdsm_agent_tasks_accepted_total{kind="checksum"}': 1,
            'vdsm_agent_task_duration_seconds_count{kind="checksum",state="done"}': 1,
            'vdsm_agent_rpc_calls_total{method="startTask",outcome="ok"}': 1,
            'vdsm_agent_tasks{kind="checksum",state="running"}': 0,
            'vdsm_engine_rpc_calls_total{method="startTask",outcome="ok"}': 1,
            # The lock taken for the task (and replaced by what the host said it
            # holds) is released once the engine learns that it ended.
            'sum(vdsm_engine_resource_lock_changes_total{change="taken"}) - '
            'sum(vdsm_engine_resource_lock_changes_total{change="released"})': 0,
        }
        def differences() -> dict[str, float | None]:
            return {query: seen for query, value in expected.items()
                    if (seen := prometheus.query(query)) != value}

        with contextlib.suppress(AssertionError):
            until(lambda: not differences(), timeout=30, interval=0.5)
        assert differences() == {}
        for query, least in (('vdsm_engine_resource_lock_changes_total{change="taken"}', 1),
                             ('vdsm_agent_events_published_total{type="task"}', 3),
                             ("vdsm_engine_resync_duration_seconds_count", 1)):
            value = prometheus.query(query)
            assert value is not None, query
            assert value >= least, (query, value)
    finally:
        prometheus.stop()

    for port in (agent.port, engine.port):
        status, content_type, exposition = http_get(port, "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        checked = promtool_check(exposition)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def _unix_get(socket_path: Path, path: str) -> int:
    conn = UnixHTTPConnection(str(socket_path), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_who_may_read_metrics(tmp_path):
    become_subreaper()
    pki = make_pki(tmp_path / "pki")
    tls_port, port = free_port(), free_port()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    agent = start_agent(tmp_path / "a", port, "--tls-listen", f"127.0.0.1:{tls_port}",
                        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                        "--tls-ca", str(pki.ca_file), *ROLE_FLAGS)
    try:
        # A certificate the roles do not list: role none, like any other route.
        status, body = https_get(tls_port, client_context(pki, pki.clients["stranger.example.com"]),
                                 "/metrics")
        assert status == 403
        assert json.loads(body)["error"]["name"] == "Forbidden"
        status, body = https_get(tls_port, client_context(pki, pki.clients["reader.example.com"]),
                                 "/metrics")
        assert status == 200
        assert b"vdsm_agent_rpc_calls_total" in body
        # Anonymous on loopback TCP (role none): a Prometheus on the host.
        assert http_get(port, "/metrics")[0] == 200
        assert _unix_get(agent.socket_path, "/metrics") == 200  # root
    finally:
        agent.stop()
        kill_task_processes(agent.state_dir)

    closed = start_agent(tmp_path / "b", free_port(), "--loopback-metrics", "false")
    try:
        status, _, body = http_get(closed.port, "/metrics")
        assert status == 403
        assert json.loads(body)["error"]["name"] == "Forbidden"
        assert _unix_get(closed.socket_path, "/metrics") == 200
    finally:
        closed.stop()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_the_exposition_counts_calls_by_outcome(tmp_path):
    agent = start_agent(tmp_path, free_port())
    try:
        for body in (b'{"jsonrpc":"2.0","method":"ping","id":1}', b"{not json",
                     b'{"jsonrpc":"2.0","method":"noSuchVerb","id":2}',
                     b'{"jsonrpc":"2.0","method":"getTask","params":{},"id":3}'):
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
            conn.request("POST", "/jsonrpc", body=body)
            conn.getresponse().read()
            conn.close()
        time.sleep(0.1)
        _, _, exposition = http_get(agent.port, "/metrics")
        text = exposition.decode()
        for line in ('vdsm_agent_rpc_calls_total{method="ping",outcome="ok"} 1.0',
                     'vdsm_agent_rpc_calls_total{method="other",outcome="ParseError"} 1.0',
                     'vdsm_agent_rpc_calls_total{method="other",outcome="MethodNotFound"} 1.0',
                     'vdsm_agent_rpc_calls_total{method="getTask",outcome="Forbidden"} 1.0',
                     'vdsm_agent_rpc_duration_seconds_count{method="ping"} 1.0'):
            assert line in text.splitlines(), line
        checked = promtool_check(exposition)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        agent.stop()
