"""Helpers for the engine tests: a throwaway PostgreSQL server, fleets of real
agent processes on loopback, an in-process engine with a schema-checking
client, and a proxy that drops replies.

Everything started here is stopped by PID: agents (SIGKILL, after SIGCONT for
a frozen one), their task processes (``tasks_support.kill_task_processes``)
and the PostgreSQL postmaster (SIGINT: fast shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest
from aiohttp import web

import rpc_schema
from tests import support
from tests.support import AgentProcess, RpcFailure, agent_argv, free_port, spawn_agent
from tests.tasks_support import kill_task_processes
from vdsm_agent.engine.settings import EngineConfig

ENGINE_SCHEMA = rpc_schema.load("engine")
PG_BIN = Path("/usr/lib/postgresql/15/bin")

# Short timings: a dead host is non-responsive within ~1-2 s, a frozen one
# within ~3 s, and retries come every 0.2-1 s.
FAST_ENGINE = {
    "connect_timeout": 0.5,
    "request_timeout": 1.0,
    "events_timeout": 2.0,
    "resync_interval": 5.0,
    "poll_interval": 0.5,
    "unresponsive_after": 2,
    "retry_interval": 0.2,
    "retry_max": 1.0,
}


def until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    return support.until(predicate, timeout, interval)


async def async_until(predicate: Callable[[], Any], timeout: float = 15.0,
                      interval: float = 0.05) -> Any:
    """Wait for ``await predicate()`` to be truthy, without blocking the loop."""
    return await support.async_until(predicate, timeout, interval)


# -- PostgreSQL -------------------------------------------------------------------------


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # ours only if we are its (sub)reaper
            if done:
                return True
        except ChildProcessError:
            pass
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@dataclasses.dataclass
class PostgresServer:
    """A throwaway cluster on 127.0.0.1 (trust auth), its socket in its own directory."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self) -> Any:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname="postgres", connect_timeout=10)
        conn.autocommit = True
        return conn

    def create_database(self) -> str:
        name = f"engine_{uuid.uuid4().hex[:12]}"
        with contextlib.closing(self.admin()) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.closing(self.admin()) as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # fast shutdown
            if not _wait_gone(pid, 30):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb + pg_ctl start as the postgres user (initdb refuses root)."""
    in_ci = os.environ.get("CI") == "true"
    if os.geteuid() != 0 and not in_ci:
        pytest.skip("PostgreSQL tests need root (runuser -u postgres); CI runs as root")
    if not (PG_BIN / "initdb").exists() and not in_ci:
        pytest.skip("PostgreSQL 15 is not installed (scripts/bootstrap --with-system)")
    user = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="vdsm-engine-pg-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    server = PostgresServer(root=root, port=free_port())
    runuser = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run(
            [*runuser, str(PG_BIN / "initdb"), "-D", str(server.data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120)
        options = (f"-c listen_addresses=127.0.0.1 -p {server.port} "
                   f"-c unix_socket_directories={root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        subprocess.run(
            [*runuser, str(PG_BIN / "pg_ctl"), "-D", str(server.data), "-l",
             str(root / "postgres.log"), "-w", "-t", "60", "-o", options, "start"],
            check=True, capture_output=True, timeout=90)
    except subprocess.CalledProcessError as exc:
        log = (root / "postgres.log").read_text() if (root / "postgres.log").exists() else ""
        server.stop()
        raise AssertionError(f"PostgreSQL did not start: {exc.stderr.decode()} {log}") from None
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The engine's database: sqlite in tmp_path, or a fresh database on the real server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'engine.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


# -- real agents ----------------------------------------------------------------------------


class FleetAgent:
    """One real agent process with a fixed port and state dir (restartable)."""

    def __init__(self, root: Path, name: str, **flags: Any) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.images = self.dir / "images"
        self.images.mkdir(exist_ok=True)
        self.port = free_port()
        self.flags = {"allowed-root": str(self.images), "heartbeat-interval": "0.2",
                      "stale-after": "10", "cancel-grace": "1", "enable-test-kinds": "true",
                      "log-level": "info",
                      # The engine calls its agents over loopback TCP here, where a
                      # caller is anonymous: grant it what the engine's certificate
                      # would get in production.
                      "loopback-role": "operate",
                      **{key.replace("_", "-"): str(value) for key, value in flags.items()}}
        self.process: AgentProcess | None = None
        self.starts = 0
        self.frozen = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jsonrpc"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.process is not None
        return self.process.proc

    def spawn(self) -> AgentProcess:
        self.starts += 1
        socket_path = self.dir / f"agent{self.starts}.sock"
        argv = agent_argv(self.state_dir, self.port, socket_path, self.flags, log_level=None)
        self.process = spawn_agent(argv, self.port, socket_path, self.state_dir,
                                   self.dir / f"agent{self.starts}.log")
        return self.process

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.process is not None
        self.process.wait_ready(timeout)

    def start(self, timeout: float = 30) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL (its tasks survive, as they do in production)."""
        if self.process is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.kill()
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.process is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def call(self, method: str, **params: Any) -> Any:
        """A direct call to the agent (as an administrator with curl would)."""
        assert self.process is not None
        return self.process.call(method, **params)

    def close(self) -> None:
        self.kill()
        kill_task_processes(self.state_dir)


class Fleet:
    """Several agents, started in parallel; ``close`` stops them all."""

    def __init__(self, root: Path, count: int, **flags: Any) -> None:
        self.agents = [FleetAgent(root, f"host{index + 1}", **flags) for index in range(count)]

    def __getitem__(self, index: int) -> FleetAgent:
        return self.agents[index]

    def __iter__(self) -> Iterator[FleetAgent]:
        return iter(self.agents)

    def start(self, timeout: float = 40) -> None:
        for agent in self.agents:
            agent.spawn()
        for agent in self.agents:
            agent.wait_ready(timeout)

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.close()


@contextlib.contextmanager
def fleet(root: Path, count: int, **flags: Any) -> Iterator[Fleet]:
    agents = Fleet(root, count, **flags)
    try:
        agents.start()
        yield agents
    finally:
        agents.close()


# -- the engine, in process -------------------------------------------------------------------


def engine_config(tmp_path: Path, database: str = "", **overrides: Any) -> EngineConfig:
    """An in-process engine's config. Its test calls come over plain loopback HTTP,
    where a caller is anonymous (docs/engine.md, "Security"): they are granted admin
    explicitly (loopback_role), as the agent's tests are; the engines the tests
    start as processes get --loopback-role admin. tests/test_engine_security.py
    tests the roles themselves."""
    values: dict[str, Any] = {"state_dir": str(tmp_path / "engine-state"),
                              "listen": ("127.0.0.1", 0), "database": database,
                              "loopback_role": "admin", **FAST_ENGINE}
    values.update(overrides)
    return EngineConfig.defaults().replace(**values)


def check_result(method: str, result: Any) -> None:
    verb = ENGINE_SCHEMA.verbs[method]
    jsonschema.validate(result, {**verb.result, "components": ENGINE_SCHEMA.components})


class EngineClient:
    """Calls the engine's verbs over HTTP (an aiohttp test client), checking results."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._next_id = 0

    @property
    def engine(self) -> Any:
        from vdsm_agent.engine.app import ENGINE

        return self.client.server.app[ENGINE]

    async def call(self, method: str, **params: Any) -> Any:
        self._next_id += 1
        response = await self.client.post("/jsonrpc", data=json.dumps(
            {"jsonrpc": "2.0", "method": method, "params": params, "id": self._next_id}))
        assert response.status == 200, await response.text()
        answer = await response.json()
        if "error" in answer:
            raise RpcFailure(answer["error"])
        check_result(method, answer["result"])
        return answer["result"]

    async def error(self, method: str, **params: Any) -> RpcFailure:
        try:
            await self.call(method, **params)
        except RpcFailure as failure:
            return failure
        raise AssertionError(f"{method} did not fail")

    async def host(self, name: str) -> dict[str, Any]:
        return dict(await self.call("getHost", name=name))

    async def wait_status(self, name: str, status: str, timeout: float = 15) -> None:
        async def reached() -> bool:
            return (await self.host(name))["status"] == status
        await async_until(reached, timeout)

    async def task(self, host: str, task_id: str) -> dict[str, Any] | None:
        try:
            return dict((await self.call("getTask", host=host, taskID=task_id))["task"])
        except RpcFailure as failure:
            if failure.name in ("TaskNotFound", "HostUnreachable"):
                return None
            raise

    async def wait_job(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        job = await self.call("waitJob", jobID=job_id, timeout=min(timeout, 60))
        return dict(job)


# -- a proxy that drops replies ----------------------------------------------------------------


class DroppingProxy:
    """An HTTP proxy in front of one agent: forwards every request; for the first
    ``drops`` calls of ``method`` it waits for the agent's answer, then closes the
    connection without relaying it (the caller sees a lost reply). Verbs in
    ``missing`` are answered -32601, as by an agent that does not have them."""

    def __init__(self, upstream_port: int, method: str, drops: int = 1,
                 missing: tuple[str, ...] = ()) -> None:
        self.upstream = f"http://127.0.0.1:{upstream_port}/jsonrpc"
        self.method = method
        self.drops = drops
        self.missing = missing  # answered "Method not found", as an older agent would
        self.dropped = 0
        self.forwarded = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jsonrpc"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        request_doc = json.loads(body) if body else {}
        method = request_doc.get("method")
        if method in self.missing:
            return web.json_response({"jsonrpc": "2.0", "id": request_doc.get("id"), "error": {
                "code": -32601, "message": "Method not found", "data": method}})
        async with self._session.post(self.upstream, data=body,
                                      headers={"Content-Type": "application/json"}) as answer:
            payload = await answer.read()
            status = answer.status
        self.forwarded += 1
        if method == self.method and self.dropped < self.drops:
            self.dropped += 1
            assert request.transport is not None
            request.transport.close()  # the agent acted; its reply is lost
            raise asyncio.CancelledError
        return web.Response(body=payload, status=status, content_type="application/json")

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application()
        app.router.add_post("/jsonrpc", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
