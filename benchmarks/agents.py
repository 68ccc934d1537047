"""Real agent processes for the benchmarks: a free loopback port, the agent's
command line, the spawn, a call, the health check, and killing task processes."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from vdsm_agent.tasks.process import CHILD_MODULE
from vdsm_agent.tasks.zygote import ZYGOTE_MODULE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(port: int, method: str, params: dict[str, Any], *, timeout: float,
         error: type[Exception]) -> Any:
    """One JSON-RPC call to the agent on 127.0.0.1:port (a new connection); its
    result, or ``error`` naming the method and the agent's error."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        connection.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
        answer = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    if "error" in answer:
        raise error(f"{method}: {answer['error']}")
    return answer["result"]


def healthy(port: int) -> bool:
    """Whether the agent on 127.0.0.1:port answers GET /health with 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def agent_argv(state_dir: Path, port: int, images: Path, log_level: str,
               **flags: Any) -> list[str]:
    """An agent on 127.0.0.1:port, no Unix socket, test kinds on, ``images`` allowed;
    each flag as ``--name value`` (underscores in names become dashes). Loopback TCP
    callers are anonymous: the load generators get admin by ``loopback_role``."""
    argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(state_dir),
            "--listen", f"127.0.0.1:{port}", "--unix-socket", "none",
            "--allowed-root", str(images), "--log-level", log_level,
            "--enable-test-kinds", "true", "--loopback-role", "admin"]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its stdout and stderr in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def kill_task_processes(state_dirs: tuple[str, ...]) -> None:
    """SIGKILL the process group of every task process (spawned, or forked by a
    zygote) and every zygote of agents with these state dirs, found by command
    line: a spawned one names its task dir, a zygote and its forks the state dir."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if ((CHILD_MODULE in cmdline or ZYGOTE_MODULE in cmdline)
                and any(arg.startswith(state_dirs) for arg in cmdline)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
