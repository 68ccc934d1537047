"""Helpers for the several-engines tests and the failover benchmark: real
``vdsm-engine serve`` processes on one real PostgreSQL database, driven over
their JSON-RPC API, and what the database says of their leases.

Every engine started here is stopped by PID (SIGCONT first for a frozen one,
SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.engine_process import stop_process
from tests.engine_support import PostgresServer, until

CONSOLE_SCRIPT = Path(sys.executable).parent / "vdsm-engine"


def engine_command() -> list[str]:
    if CONSOLE_SCRIPT.exists():
        return [str(CONSOLE_SCRIPT)]
    return [sys.executable, "-m", "vdsm_agent.engine.main"]


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error)
        self.error = error
        data = error.get("data")
        self.name = data.get("name") if isinstance(data, dict) else None


class EngineProcess:
    """One ``vdsm-engine serve`` on the shared database (restartable)."""

    def __init__(self, root: Path, name: str, database_url: str, **flags: Any) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.database_url = database_url
        self.flags = {"request-timeout": "1", "connect-timeout": "0.5", "retry-interval": "0.2",
                      "retry-max": "1", "unresponsive-after": "2", "resync-interval": "5",
                      "events-timeout": "2", "lease-time": "2", "log-level": "debug",
                      **{key.replace("_", "-"): str(value) for key, value in flags.items()}}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.frozen = False

    @property
    def log_path(self) -> Path:
        return self.dir / f"engine{self.starts}.log"

    def logs(self) -> str:
        return "".join(path.read_text(errors="replace")
                       for path in sorted(self.dir.glob("engine*.log")))

    def start(self, timeout: float = 30) -> None:
        self.starts += 1
        argv = [*engine_command(), "serve", "--state-dir", str(self.dir / "state"),
                "--listen", f"127.0.0.1:{self.port}", "--database", self.database_url,
                "--loopback-role", "admin"]
        for key, value in self.flags.items():
            argv += [f"--{key}", value]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        until(lambda: self.healthy() or not self.alive(), timeout=timeout)
        assert self.alive(), self.logs()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False

    def call(self, method: str, http_timeout: float = 30, **params: Any) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=http_timeout)
        try:
            body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
            conn.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if "error" in answer:
            raise RpcError(answer["error"])
        return answer["result"]

    def kill(self) -> None:
        """SIGKILL: no lease given back."""
        if self.alive():
            assert self.proc is not None
            self.thaw()
            self.proc.kill()
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM: the engine gives its leases back; its exit code."""
        assert self.proc is not None
        if self.alive():
            self.thaw()
            stop_process(self.proc, timeout)
        return int(self.proc.returncode)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.terminate(timeout=10)


class Database:
    """Reads of the engines' shared database (the tests' view of the leases)."""

    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name
        self.connect()

    def connect(self) -> None:
        import psycopg2

        self.conn = psycopg2.connect(host="127.0.0.1", port=self.server.port, user="postgres",
                                     dbname=self.name, connect_timeout=10)
        self.conn.autocommit = True

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def owners(self) -> dict[str, str]:
        """host -> the PID of the engine that holds its live lease."""
        rows = self.query("SELECT l.host, e.pid FROM host_leases AS l JOIN engines AS e "
                          "ON e.id = l.owner WHERE l.expires_at > extract(epoch from now())")
        return {str(host): str(pid) for host, pid in rows}

    def spread(self) -> list[int]:
        """Hosts leased per live engine, sorted."""
        counts: dict[str, int] = {}
        for pid in self.owners().values():
            counts[pid] = counts.get(pid, 0) + 1
        return sorted(counts.values())

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def engines(root: Path, database_url: str, count: int,
            **flags: Any) -> Iterator[list[EngineProcess]]:
    started = [EngineProcess(root, f"engine{index + 1}", database_url, **flags)
               for index in range(count)]
    try:
        for engine in started:
            engine.start()
        yield started
    finally:
        for engine in started:
            engine.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` is truthy (AssertionError after ``timeout``)."""
    began = time.monotonic()
    until(predicate, timeout=timeout, interval=interval)
    return time.monotonic() - began
