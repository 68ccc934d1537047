"""``vdsm-engine serve`` and ``vdsm-engine call`` as real processes: the daemon on
a real PostgreSQL server following a real agent, driven from the command line."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.engine_support import fleet, postgres_server, until  # noqa: F401

pytestmark = pytest.mark.slow

CONSOLE_SCRIPT = Path(sys.executable).parent / "vdsm-engine"


def engine_command() -> list[str]:
    if CONSOLE_SCRIPT.exists():
        return [str(CONSOLE_SCRIPT)]
    return [sys.executable, "-m", "vdsm_agent.engine.main"]


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def call(url: str, *words: str, timeout: float = 30) -> tuple[int, str, str]:
    result = subprocess.run([*engine_command(), "call", "--url", url, *words],
                            capture_output=True, text=True, timeout=timeout, check=False)
    return result.returncode, result.stdout, result.stderr


def test_daemon_on_postgresql_with_the_cli(tmp_path, postgres_server):  # noqa: F811
    database = postgres_server.create_database()
    port = free_port()
    url = f"http://127.0.0.1:{port}/jsonrpc"
    log_path = tmp_path / "engine.log"
    argv = [*engine_command(), "serve", "--state-dir", str(tmp_path / "engine"),
            "--listen", f"127.0.0.1:{port}", "--database", postgres_server.url(database),
            "--request-timeout", "2", "--retry-interval", "0.2", "--log-level", "debug",
            "--loopback-role", "admin"]
    with fleet(tmp_path / "agents", 1) as agents, open(log_path, "wb") as log_file:
        engine = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            until(lambda: healthy(port) or engine.poll() is not None, timeout=30)
            assert engine.poll() is None, log_path.read_text()
            code, out, _ = call(url, "ping")
            assert code == 0
            assert json.loads(out)["database"] == "postgresql"
            code, out, err = call(url, "addHost", "name=host1", f"url={agents[0].url}")
            assert code == 0, err
            assert json.loads(out)["url"] == agents[0].url

            def host_up() -> bool:
                code, out, _ = call(url, "getHost", "name=host1")
                return code == 0 and json.loads(out)["status"] == "up"
            until(host_up, timeout=20, interval=0.2)
            code, out, _ = call(url, "listHosts", "--table", "--columns", "name,status")
            assert code == 0
            assert out.split("\n")[1].split() == ["host1", "up"]
            code, out, err = call(url, "startTask", "host=host1", "kind=test.sleep",
                                  'params:={"seconds": 0.2}', "--compact")
            assert code == 0, err
            job: dict[str, Any] = json.loads(out)
            code, out, err = call(url, "waitJob", f"jobID={job['jobID']}", "timeout=20")
            assert code == 0, err
            assert json.loads(out)["state"] == "done"
            code, out, _ = call(url, "listTasks", "--compact")
            tasks = json.loads(out)["tasks"]
            assert [task["id"] for task in tasks] == [job["steps"][0]["taskID"]]
            code, _, err = call(url, "getHost", "name=nope")
            assert code == 1
            assert "HostNotFound" in err
            code, _, err = call(url, "addHost", "name=bad name", "url=http://127.0.0.1:1")
            assert code == 3
            assert "-32602" in err
        finally:
            if engine.poll() is None:
                engine.send_signal(signal.SIGTERM)
                try:
                    engine.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    engine.kill()
                    engine.wait()
        assert engine.returncode == 0, log_path.read_text()
    # What the engine learned is in PostgreSQL.
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=postgres_server.port, user="postgres",
                            dbname=database)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT name, status FROM host")
            assert cursor.fetchall() == [("host1", "up")]
            cursor.execute("SELECT state FROM job")
            assert cursor.fetchall() == [("done",)]
    finally:
        conn.close()
        postgres_server.drop_database(database)
