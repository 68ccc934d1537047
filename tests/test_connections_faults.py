"""Real faults against a real agent process: a GlusterFS brick killed and
frozen, sshd sessions killed, an sshfs daemon killed, and agent restarts
(SIGTERM and kill -9) that must adopt what is attached, not attach it again.

Measured numbers are printed with a ``MEASURED`` prefix (``pytest -s``)."""

from __future__ import annotations

import datetime
import itertools
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.connections_support import (
    FAST,
    MOUNTINFO,
    GlusterServer,
    SshServer,
    cleanup_under,
    kill9,
    mount_entry,
    sh,
    start_agent,
    wait_for,
)
from tests.support import AgentProcess
from vdsm_agent.connections.backends.loop import bound_loop_devices
from vdsm_agent.system import mountinfo

# The fixtures (session-scoped servers) are registered once, as a plugin, so
# that every module shares one glusterd and one sshd.
pytest_plugins = ["tests.connections_support"]

pytestmark = [pytest.mark.root, pytest.mark.slow]


def measured(what: str, value: float, unit: str = "s") -> None:
    print(f"\nMEASURED {what}: {value:.3f} {unit}")


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def fuse_daemon_pid(mount_point: str) -> int | None:
    """The live process serving a FUSE mount (its command line names the mount point)."""
    wanted = mount_point.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            return int(entry)
    return None


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    """Agent processes started by a test; stopped by PID, mounts cleaned, at the end."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()
    cleanup_under(tmp_path)


def launch(agents: list[AgentProcess], tmp_path: Path, settings: dict[str, Any]) -> AgentProcess:
    agent = start_agent(tmp_path, {**FAST, **settings}, log_name=f"agent{len(agents)}.log")
    agents.append(agent)
    return agent


def status(agent: AgentProcess, connection_id: str) -> dict[str, Any]:
    result: dict[str, Any] = agent.call("getStorageConnection", connectionID=connection_id)
    return result


def wait_status(agent: AgentProcess, connection_id: str,
                predicate: Callable[[dict[str, Any]], bool], timeout: float,
                what: str) -> tuple[dict[str, Any], float]:
    """The first status meeting ``predicate`` and how long it took."""
    started = time.monotonic()
    found = wait_for(lambda: (lambda s: s if predicate(s) else None)(
        status(agent, connection_id)), timeout, interval=0.02, what=what)
    return found, time.monotonic() - started


def is_state(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["state"] in states


@pytest.mark.tool("glusterd")
@pytest.mark.tool("gluster")
def test_killed_brick_is_noticed_and_recovered_without_a_call(agents, tmp_path, gluster_server):
    server: GlusterServer = gluster_server
    agent = launch(agents, tmp_path, {})
    agent.call("manageStorageConnection", uri=server.uri, connectionID="gl")
    connected, _ = wait_status(agent, "gl", is_state("connected"), 20, "connected")
    mount_point = connected["connectionInfo"]["mountPoint"]
    client = fuse_daemon_pid(mount_point)
    brick = server.kill_brick()
    try:
        _, noticed = wait_status(agent, "gl", is_state("degraded", "disconnected"), 10,
                                 "degraded")
        down, gone = wait_status(agent, "gl", is_state("disconnected"), 10, "disconnected")
        measured("killed brick -> degraded", noticed)
        measured("killed brick -> disconnected", gone)
        assert noticed < FAST["probe_interval"] * 2 + 0.5
        assert gone < FAST["probe_interval"] * (FAST["probe_failures"] + 1) + 1
        assert down["lastError"]["code"] == "ENOTCONN"
        assert down["connected"] is True  # still mounted; the client keeps trying
    finally:
        restart_took = server.restart_brick(brick)
    back, recovered = wait_status(agent, "gl", is_state("connected"), 30, "connected again")
    measured("brick restarted (incl. reaping the zombie) ", restart_took)
    measured("brick online -> connected", recovered)
    # The client reconnected by itself: same mount, same FUSE daemon, no remount.
    assert fuse_daemon_pid(mount_point) == client
    assert back["attempts"] >= 1
    assert agent.call("unmanageStorageConnection", connectionID="gl")["disconnected"]
    assert mount_entry(mount_point) is None


@pytest.mark.tool("glusterd")
@pytest.mark.tool("gluster")
def test_frozen_brick_times_out_the_probe_and_blocks_nothing_else(agents, tmp_path,
                                                                 gluster_server):
    server: GlusterServer = gluster_server
    local = tmp_path / "local"
    local.mkdir()
    agent = launch(agents, tmp_path, {})
    agent.call("manageStorageConnection", uri=server.uri, connectionID="gl")
    agent.call("manageStorageConnection", uri=f"file://{local}", connectionID="local")
    wait_status(agent, "gl", is_state("connected"), 20, "gluster connected")
    wait_status(agent, "local", is_state("connected"), 20, "local connected")
    baseline = []
    for _ in range(20):
        started = time.perf_counter()
        agent.call("ping")
        baseline.append(time.perf_counter() - started)
    measured("ping before the freeze, median", statistics.median(baseline) * 1000, "ms")
    brick = server.brick_pid()
    os.kill(brick, signal.SIGSTOP)
    pings: list[float] = []
    checks: list[float] = []
    try:
        frozen = time.monotonic()
        _hung, noticed = wait_status(
            agent, "gl", lambda s: (s["lastError"] or {}).get("code") in (
                "ProbeTimeout", "ProbeBlocked"), 10, "probe timeout")
        measured("frozen brick -> probe timeout reported", noticed)
        assert noticed < FAST["probe_interval"] * 2 + 0.5
        while time.monotonic() - frozen < 3.0:
            started = time.perf_counter()
            agent.call("ping")
            pings.append(time.perf_counter() - started)
            last = status(agent, "local")["lastCheck"]
            if not checks or parse_time(last) != checks[-1]:
                checks.append(parse_time(last))
            time.sleep(0.02)
        during = status(agent, "gl")
        assert during["state"] in ("degraded", "disconnected")
        assert during["connectionInfo"]["probeInFlight"] is True
    finally:
        os.kill(brick, signal.SIGCONT)
        thawed = time.monotonic()
    measured("ping while a probe hangs, median", statistics.median(pings) * 1000, "ms")
    measured("ping while a probe hangs, max", max(pings) * 1000, "ms")
    gaps = [b - a for a, b in itertools.pairwise(checks)]
    measured("local connection probe gap while gluster hangs, max", max(gaps))
    assert max(pings) < 0.2, pings
    assert max(gaps) < FAST["probe_interval"] + 0.25, gaps
    assert status(agent, "local")["state"] == "connected"
    _, recovered = wait_status(agent, "gl", is_state("connected"), 30, "connected again")
    measured("brick thawed -> connected", time.monotonic() - thawed)
    assert recovered < 30
    agent.call("unmanageStorageConnection", connectionID="gl")
    agent.call("unmanageStorageConnection", connectionID="local")


@pytest.mark.tool("sshfs")
@pytest.mark.tool("sshd")
@pytest.mark.tool("ssh-keygen")
def test_sshfs_recovers_from_killed_sessions_and_a_killed_daemon(agents, tmp_path, ssh_server):
    server: SshServer = ssh_server
    agent = launch(agents, tmp_path, server.settings)
    agent.call("manageStorageConnection", uri=server.uri, connectionID="ss")
    connected, _ = wait_status(agent, "ss", is_state("connected"), 20, "connected")
    mount_point = connected["connectionInfo"]["mountPoint"]
    daemon = fuse_daemon_pid(mount_point)
    assert daemon is not None
    # 1. sessions and listener killed: probes fail (EIO) until sshd is back.
    server.kill_everything()
    try:
        down, noticed = wait_status(agent, "ss", is_state("degraded", "disconnected"), 10,
                                    "degraded")
        measured("sshd killed -> degraded", noticed)
        assert down["lastError"]["code"] in ("EIO", "ECONNABORTED", "ENOTCONN")
    finally:
        server.start()
    _, recovered = wait_status(agent, "ss", is_state("connected"), 20, "connected again")
    measured("sshd restarted -> connected", recovered)
    assert fuse_daemon_pid(mount_point) == daemon  # sshfs reconnected; no remount
    # 2. the sshfs daemon killed: ENOTCONN, the mount is unmounted lazily and mounted again.
    os.kill(daemon, signal.SIGKILL)
    after, remounted = wait_status(
        agent, "ss", lambda s: s["state"] == "connected"
        and (s["lastError"] or {}).get("code") == "ENOTCONN", 20, "remounted")
    measured("sshfs daemon killed -> mounted again and connected", remounted)
    assert "FUSE daemon gone" in after["lastError"]["message"]
    assert mount_entry(mount_point) is not None  # (mount IDs are reused: not compared)
    new_daemon = fuse_daemon_pid(mount_point)
    assert new_daemon not in (None, daemon)
    assert (Path(mount_point) / "hello.txt").read_text() == "hello\n"
    assert agent.call("unmanageStorageConnection", connectionID="ss")["disconnected"]


def _snapshot(agent: AgentProcess, ids: list[str]) -> dict[str, Any]:
    """What each connection is attached as on the host: mount IDs, daemons, devices."""
    snap: dict[str, Any] = {}
    for connection_id in ids:
        info = status(agent, connection_id)["connectionInfo"]
        if "mountPoint" in info:
            entry = mount_entry(info["mountPoint"])
            snap[connection_id] = (entry.mount_id, fuse_daemon_pid(info["mountPoint"]))
        else:
            snap[connection_id] = info.get("device") or info.get("path")
    return snap


@pytest.mark.tool("losetup")
@pytest.mark.tool("glusterd")
@pytest.mark.tool("sshfs")
@pytest.mark.tool("sshd")
def test_restart_adopts_what_is_attached(agents, tmp_path, gluster_server, ssh_server):
    image = tmp_path / "disk.img"
    sh(["truncate", "-s", "16M", str(image)])
    directory = tmp_path / "dir"
    directory.mkdir()
    uris = {"lo": f"loop://{image}", "fi": f"file://{directory}", "gl": gluster_server.uri,
            "ss": ssh_server.uri}
    ids = sorted(uris)
    # The image is resolved beneath an allowed root at every connect, adoption included.
    settings = {**ssh_server.settings, "allowed_root": str(tmp_path)}
    agent = launch(agents, tmp_path, settings)
    for connection_id, uri in uris.items():
        agent.call("manageStorageConnection", uri=uri, connectionID=connection_id)
    agent.call("manageStorageConnection", uri=uris["gl"], connectionID="gl-2")
    for connection_id in ids:
        wait_status(agent, connection_id, is_state("connected"), 20, f"{connection_id} up")
    before = _snapshot(agent, ids)
    loops_before = [d for d, b in bound_loop_devices(Path("/sys")).items() if b == str(image)]
    for how in ("kill -9", "SIGTERM"):
        if how == "kill -9":
            kill9(agent)
        else:
            agent.stop()
        started = time.monotonic()
        agent = launch(agents, tmp_path, settings)
        listed = agent.call("getStorageConnectionList")
        assert {cid for cid, s in listed.items() if s["managed"]} == {*ids, "gl-2"}
        for connection_id in ids:
            up, _ = wait_status(agent, connection_id, is_state("connected"), 20,
                                f"{connection_id} after {how}")
            assert up["connectionInfo"]["adopted"] is True or connection_id == "fi", up
        measured(f"restart after {how} -> all connected", time.monotonic() - started)
        assert _snapshot(agent, ids) == before, how  # same mounts, daemons, loop device
        loops = [d for d, b in bound_loop_devices(Path("/sys")).items() if b == str(image)]
        assert loops == loops_before
        assert status(agent, "gl")["connectionInfo"]["sharedWith"] == ["gl-2"]
        listed = agent.call("getStorageConnectionList")
        assert not [s for s in listed.values() if not s["managed"] and s["uri"] in uris.values()]
    for connection_id in [*ids, "gl-2"]:
        agent.call("unmanageStorageConnection", connectionID=connection_id)
    assert not [d for d, b in bound_loop_devices(Path("/sys")).items() if b == str(image)]
    mounts = [e.mount_point for e in mountinfo.read(MOUNTINFO)
              if e.mount_point.startswith(str(tmp_path))]
    assert mounts == []
