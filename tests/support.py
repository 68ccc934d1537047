"""Test helpers: a schema-checking JSON-RPC client and a real agent process handle."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema

import rpc_schema

SCHEMA = rpc_schema.load("agent")


class RpcFailure(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')} {error.get('data')}")
        self.error = error
        self.code = error["code"]
        data = error.get("data")
        self.name = data.get("name") if isinstance(data, dict) else None
        self.data = data


def check_result(method: str, result: Any) -> None:
    """Validate a verb's result against its result schema in rpc_schema."""
    verb = SCHEMA.verbs[method]
    schema = {**verb.result, "components": SCHEMA.components}
    jsonschema.validate(result, schema)


class RpcClient:
    """Calls verbs on an aiohttp test client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._next_id = 0

    @property
    def app(self) -> Any:
        return self.client.server.app

    async def raw(self, body: bytes | str, status: int | None = 200) -> Any:
        response = await self.client.post("/jsonrpc", data=body)
        if status is not None:
            assert response.status == status, await response.text()
        text = await response.text()
        return json.loads(text) if text else None

    async def call(self, method: str, **params: Any) -> Any:
        self._next_id += 1
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params,
                           "id": self._next_id})
        answer = await self.raw(body)
        assert answer["id"] == self._next_id
        if "error" in answer:
            raise RpcFailure(answer["error"])
        check_result(method, answer["result"])
        return answer["result"]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


@dataclasses.dataclass
class AgentProcess:
    """A real agent subprocess, stopped by PID at teardown."""

    proc: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    state_dir: Path
    log_path: Path
    argv: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jsonrpc"

    def http(self, method: str, path: str, body: bytes | None = None,
             unix: bool = False, timeout: float = 30) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection = (
            UnixHTTPConnection(str(self.socket_path), timeout) if unix
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout))
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def call(self, method: str, unix: bool = False, **params: Any) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        status, data = self.http("POST", "/jsonrpc", body.encode(), unix=unix)
        assert status == 200, data
        answer = json.loads(data)
        if "error" in answer:
            raise RpcFailure(answer["error"])
        check_result(method, answer["result"])
        return answer["result"]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log_path.read_text()}")
            try:
                status, _ = self.http("GET", "/health", timeout=1)
                if status == 200 and self.socket_path.exists():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready in {timeout}s: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
