"""A real ``vdsm-engine serve`` process on loopback, as the engine's users meet it.

One class for the tests that run the engine's own program (the console in a
browser, task output through the engine, Prometheus scraping it), instead of a
copy in each. Its plain loopback TCP callers are anonymous: the role they get is
the engine's ``--loopback-role`` grant, given at ``start``.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import free_port, until

BIN = Path(sys.executable).parent
ENGINE = str(BIN / "vdsm-engine")
# Quick to notice a host going down or coming back; a resync every 5 s.
QUICK = ("--retry-interval", "0.2", "--retry-max", "1", "--poll-interval", "0.5",
         "--request-timeout", "2", "--connect-timeout", "0.5", "--unresponsive-after", "2",
         "--resync-interval", "5")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EngineProcess:
    def __init__(self, root: Path, *flags: str) -> None:
        self.root = root
        self.flags = flags or QUICK
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/jsonrpc"
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.root / f"engine{self.starts}.log"

    def start(self, role: str = "admin") -> EngineProcess:
        self.starts += 1
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [ENGINE, "serve", "--state-dir", str(self.root / "engine"), "--listen",
                f"127.0.0.1:{self.port}", *self.flags, "--loopback-role", role]
        with open(self.log, "wb") as out:
            proc = self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        until(lambda: proc.poll() is not None or self.get("/health")[0] == 200,
              timeout=30, what="the engine answers")
        assert proc.poll() is None, self.log.read_text()
        return self

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None,
                timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def get(self, path: str, accept: str = "*/*",
            timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        """``GET path``; status 0 when the engine does not answer."""
        try:
            return self.request("GET", path, headers={"Accept": accept}, timeout=timeout)
        except OSError:
            return 0, {}, b""

    def cli(self, *words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``vdsm-engine call`` with ``words`` (JSON out)."""
        done = subprocess.run([ENGINE, "call", "--url", self.url, "--compact", *words],
                              capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def call(self, *words: str) -> Any:
        return json.loads(self.cli(*words).stdout)

    def rpc(self, method: str, **params: Any) -> Any:
        """One JSON-RPC call over HTTP; its result (an error fails the test)."""
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        _, _, data = self.request("POST", "/jsonrpc", body.encode(), timeout=30)
        answer = json.loads(data)
        assert "result" in answer, answer
        return answer["result"]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
