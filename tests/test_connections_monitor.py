"""The monitor and the manager with a scriptable fake backend: hung probes,
one probe in flight, schedules of other targets, event-loop responsiveness,
state sequences, backoff bookkeeping, refresh, events, ResourceBusy,
persistence."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vdsm_agent import errors, settings
from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import Attachment, Backend, BackendError
from vdsm_agent.connections.backends.file import FileBackend
from vdsm_agent.connections.manager import ConnectionEvent, ConnectionManager
from vdsm_agent.connections.probes import ProbeResult
from vdsm_agent.store import Store


@dataclasses.dataclass
class FakeTarget:
    connect_error: BackendError | None = None
    disconnect_error: BackendError | None = None
    connect_gate: asyncio.Event | None = None
    script: list[ProbeResult] = dataclasses.field(default_factory=list)
    hang: threading.Event | None = None  # probes block on it while set
    connects: int = 0
    disconnects: int = 0
    probe_starts: list[float] = dataclasses.field(default_factory=list)

    def next_result(self) -> ProbeResult:
        return self.script.pop(0) if self.script else ProbeResult.success()


class FakeBackend(Backend[uris.Endpoint]):
    scheme = "fake"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.targets: dict[str, FakeTarget] = {}

    def target(self, uri: str) -> FakeTarget:
        return self.targets.setdefault(uri, FakeTarget())

    def parse(self, uri: str) -> uris.Endpoint:
        parts = uris.split(uri)
        canonical = f"fake://{uris.host(uri, parts.netloc)}"
        return uris.Endpoint(scheme="fake", uri=canonical, key=canonical)

    async def connect(self, endpoint: uris.Endpoint) -> Attachment:
        target = self.target(endpoint.uri)
        target.connects += 1
        if target.connect_gate is not None:
            await target.connect_gate.wait()
        if target.connect_error is not None:
            raise target.connect_error
        return Attachment(identity=endpoint.uri)

    async def disconnect(self, endpoint: uris.Endpoint, attachment: Attachment | None) -> None:
        target = self.target(endpoint.uri)
        target.disconnects += 1
        if target.disconnect_error is not None:
            raise target.disconnect_error

    def probe(self, endpoint: uris.Endpoint, attachment: Attachment) -> ProbeResult:
        target = self.target(endpoint.uri)
        target.probe_starts.append(time.monotonic())
        if target.hang is not None and target.hang.is_set():
            deadline = time.monotonic() + 30
            while target.hang.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)  # a probe stuck in the kernel, until released
            return ProbeResult.failure("ENOTCONN", "released")
        return target.next_result()

    def describe(self, endpoint: uris.Endpoint, attachment: Attachment | None) -> dict[str, Any]:
        return {"name": endpoint.uri}


def make_config(tmp_path: Path, **changes: Any) -> settings.Config:
    values = {"probe_interval": 0.2, "probe_failures": 2, "probe_recoveries": 2,
              "backoff_base": 0.1, "backoff_cap": 0.4, "backoff_floor": 0.05,
              "backoff_reset": 60.0, **changes}
    return settings.defaults().replace(state_dir=str(tmp_path / "state"), **values)


async def make_manager(tmp_path: Path, store: Store | None = None,
                       **changes: Any) -> tuple[ConnectionManager, FakeBackend]:
    manager = ConnectionManager(make_config(tmp_path, **changes), store,
                                backends={"fake": FakeBackend, "file": FileBackend},
                                rng=random.Random(42))
    await manager.start()
    backend = manager.backends["fake"]
    assert isinstance(backend, FakeBackend)
    return manager, backend


async def wait_state(manager: ConnectionManager, connection_id: str, state: str,
                     timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = manager.get(connection_id)
        if status["state"] == state:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{connection_id}: {status} never became {state}")
        await asyncio.sleep(0.01)


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class LoopLag:
    """Measures how late a 5 ms ticker wakes up: the event loop's responsiveness."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, loop.time() - before - 0.005)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_manage_returns_before_the_connect(tmp_path):
    manager, backend = await make_manager(tmp_path)
    gate = asyncio.Event()
    backend.target("fake://slow").connect_gate = gate
    status = await asyncio.wait_for(manager.manage("slow", "fake://slow"), 1)
    assert (status["state"], status["connected"], status["lastCheck"]) == (
        "connecting", False, None)
    gate.set()
    await wait_state(manager, "slow", "connected")
    await manager.close()


async def test_hung_probe_costs_one_thread_and_blocks_nobody(tmp_path):
    manager, backend = await make_manager(tmp_path, probe_interval=0.1, probe_failures=2)
    healthy = [f"fake://ok{n}" for n in range(8)]
    for n, uri in enumerate(healthy):
        await manager.manage(f"ok{n}", uri)
    await manager.manage("hung", "fake://hung")
    await wait_state(manager, "hung", "connected")
    for n in range(len(healthy)):
        await wait_state(manager, f"ok{n}", "connected")
    hung = backend.target("fake://hung")
    hung.hang = threading.Event()
    hung.hang.set()
    starts_before = len(hung.probe_starts)
    for monitor in manager.monitors.values():
        monitor.delays.clear()
    with LoopLag() as lag:
        status = await wait_state(manager, "hung", "disconnected", timeout=3)
        await asyncio.sleep(1.5)  # 15 intervals with the probe hung
        status = manager.get("hung")
    # One probe started and never a second while it hangs.
    assert len(hung.probe_starts) - starts_before == 1
    assert status["lastError"]["code"] in ("ProbeTimeout", "ProbeBlocked")
    assert status["connectionInfo"]["probeInFlight"] is True
    assert status["attempts"] >= 2  # reconnect attempts went on, each one blocked
    assert manager.pool.busy == 1
    # The others kept their schedule, and the loop stayed responsive.
    for n in range(len(healthy)):
        delays = manager.monitors[f"fake://ok{n}"].delays
        assert len(delays) >= 12, n
        assert max(delays) < 0.05, (n, max(delays))
        assert manager.get(f"ok{n}")["state"] == "connected"
    assert lag.worst < 0.05, lag.worst
    hung.hang.clear()  # the storage answers again: the thread ends
    await wait_state(manager, "hung", "connected", timeout=5)
    assert manager.pool.busy == 0
    await manager.close()


async def test_state_sequence_with_flap_damping_and_events(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vdsm_agent.connections")
    manager, backend = await make_manager(tmp_path, probe_failures=2, probe_recoveries=2)
    events: list[ConnectionEvent] = []
    manager.listeners.append(events.append)
    fail = ProbeResult.failure("EIO", "Input/output error")
    target = backend.target("fake://t")
    # first probe ok; then fail, ok, fail, fail (-> disconnected), then ok ok.
    target.script = [ProbeResult.success(), fail, ProbeResult.success(), fail, fail]
    await manager.manage("vol-7", "fake://t")
    await manager.manage("vol-8", "fake://t")
    await wait_state(manager, "vol-7", "disconnected", timeout=5)
    await wait_state(manager, "vol-7", "connected", timeout=5)
    states = [(event.old_state, event.new_state) for event in events]
    assert states == [("connecting", "connected"), ("connected", "degraded"),
                      ("degraded", "disconnected"), ("disconnected", "degraded"),
                      ("degraded", "connected")]
    assert all(event.connection_ids == ("vol-7", "vol-8") for event in events)
    assert events[2].error is not None
    assert events[2].error.code == "EIO"
    status = manager.get("vol-7")
    assert status["lastError"]["code"] == "EIO"  # kept after recovery
    lines = [record.getMessage() for record in caplog.records]
    assert "connection vol-7: degraded -> disconnected: EIO: Input/output error" in lines
    assert "connection vol-8: degraded -> disconnected: EIO: Input/output error" in lines
    await manager.close()


async def test_a_failing_listener_does_not_stop_monitoring(tmp_path):
    manager, _ = await make_manager(tmp_path)

    def broken(event: ConnectionEvent) -> None:
        raise RuntimeError("listener bug")
    manager.listeners.append(broken)
    await manager.manage("a", "fake://a")
    await wait_state(manager, "a", "connected")
    await manager.close()


async def test_retries_back_off_with_jitter_and_never_stop(tmp_path):
    manager, backend = await make_manager(tmp_path, backoff_base=0.05, backoff_cap=0.4,
                                          backoff_floor=0.02)
    target = backend.target("fake://down")
    target.connect_error = BackendError("MountFailed", "mount: connection refused")
    await manager.manage("down", "fake://down")
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and len(seen) < 9:
        status = manager.get("down")
        if status["nextRetryAt"] and status["attempts"] not in seen:
            delay = parse_time(status["nextRetryAt"]) - parse_time(status["lastError"]["time"])
            seen[status["attempts"]] = delay
        await asyncio.sleep(0.002)
    attempts = sorted(seen)
    assert attempts[:8] == list(range(1, 9)), attempts
    policy = manager.policy.backoff
    for attempt, delay in seen.items():
        assert policy.floor - 0.002 <= delay <= policy.ceiling(attempt) + 0.002, (attempt, delay)
    capped = [seen[n] for n in attempts if n >= 3]
    assert len({round(d, 3) for d in capped}) > 1  # jittered, not a fixed ladder
    assert manager.get("down")["state"] == "disconnected"
    assert target.connects >= 9  # still trying
    target.connect_error = None
    await wait_state(manager, "down", "connected", timeout=5)
    assert manager.get("down")["nextRetryAt"] is None
    await manager.close()


async def test_attempts_reset_only_after_a_healthy_period(tmp_path):
    manager, backend = await make_manager(tmp_path, backoff_reset=0.6, probe_recoveries=1)
    target = backend.target("fake://flaky")
    target.connect_error = BackendError("MountFailed", "refused")
    await manager.manage("flaky", "fake://flaky")
    while manager.get("flaky")["attempts"] < 2:
        await asyncio.sleep(0.01)
    target.connect_error = None
    status = await wait_state(manager, "flaky", "connected", timeout=3)
    assert status["attempts"] >= 2  # one good probe does not reset the backoff
    await asyncio.sleep(0.3)
    assert manager.get("flaky")["attempts"] >= 2
    await asyncio.sleep(0.6)
    assert manager.get("flaky")["attempts"] == 0
    await manager.close()


async def test_refresh_probes_now(tmp_path):
    manager, backend = await make_manager(tmp_path, probe_interval=30.0)
    await manager.manage("a", "fake://a")
    first = await wait_state(manager, "a", "connected")
    target = backend.target("fake://a")
    probes = len(target.probe_starts)
    target.script = [ProbeResult.failure("EIO", "boom")]
    started = time.monotonic()
    status = await manager.refresh("a")
    assert time.monotonic() - started < 1
    assert len(target.probe_starts) == probes + 1
    assert status["state"] == "degraded"
    assert status["lastCheck"] != first["lastCheck"]
    with pytest.raises(errors.ConnectionNotFound):
        await manager.refresh("nope")
    await manager.close()


async def test_refresh_of_a_disconnected_target_retries_without_waiting(tmp_path):
    manager, backend = await make_manager(tmp_path, backoff_base=30.0, backoff_cap=60.0,
                                          backoff_floor=30.0)
    target = backend.target("fake://d")
    target.connect_error = BackendError("MountFailed", "refused")
    await manager.manage("d", "fake://d")
    await wait_state(manager, "d", "disconnected")
    target.connect_error = None
    status = await manager.refresh("d")
    assert status["state"] in ("degraded", "connected")
    assert target.connects == 2
    await manager.close()


async def test_unmanage_refused_while_a_task_holds_the_connection(tmp_path):
    holders: dict[str, str] = {"connection:a": "0b6f3c1e-6a3c-4f5e-9d61-1f1c2a3b4c5d"}
    asked: list[str] = []

    async def holder(resource: str) -> str | None:
        asked.append(resource)
        return holders.get(resource)

    manager, backend = await make_manager(tmp_path)
    manager.resource_holder = holder
    await manager.manage("a", "fake://a")
    with pytest.raises(errors.ResourceBusy) as caught:
        await manager.unmanage("a")
    data = caught.value.to_error()["data"]
    assert data["taskID"] == holders["connection:a"]
    assert data["resource"] == "connection:a"
    assert manager.get("a")["managed"] is True
    assert backend.target("fake://a").disconnects == 0
    holders.clear()
    assert (await manager.unmanage("a"))["disconnected"] is True
    assert asked == ["connection:a", "connection:a"]
    await manager.close()


async def test_failed_disconnect_is_reported_not_raised(tmp_path):
    manager, backend = await make_manager(tmp_path)
    target = backend.target("fake://x")
    target.disconnect_error = BackendError("UmountFailed", "umount: target is busy")
    await manager.manage("x", "fake://x")
    await wait_state(manager, "x", "connected")
    answer = await manager.unmanage("x")
    assert answer["disconnected"] is False
    assert answer["lastError"]["code"] == "UmountFailed"
    with pytest.raises(errors.ConnectionNotFound):
        manager.get("x")
    await manager.close()


async def test_manage_during_a_disconnect_waits_for_it(tmp_path):
    manager, backend = await make_manager(tmp_path)
    await manager.manage("a", "fake://a")
    await wait_state(manager, "a", "connected")
    order: list[str] = []
    target = backend.target("fake://a")
    original_disconnect = backend.disconnect

    async def slow_disconnect(endpoint: uris.Endpoint, attachment: Attachment | None) -> None:
        order.append("disconnect-start")
        await asyncio.sleep(0.2)
        await original_disconnect(endpoint, attachment)
        order.append("disconnect-end")
    backend.disconnect = slow_disconnect  # type: ignore[method-assign]
    unmanaging = asyncio.create_task(manager.unmanage("a"))
    await asyncio.sleep(0.05)
    await manager.manage("b", "fake://a")
    connects = target.connects
    await unmanaging
    await wait_state(manager, "b", "connected")
    assert order == ["disconnect-start", "disconnect-end"]
    assert target.connects == connects + 1  # connected again after the disconnect
    await manager.close()


async def test_persisted_connections_are_managed_again(tmp_path):
    store = await Store.open(tmp_path / "agent.db")
    manager, _ = await make_manager(tmp_path, store)
    await manager.manage("a", "fake://a", {"description": "first"})
    await manager.manage("b", "fake://b")
    await manager.manage("c", "fake://c")
    await manager.unmanage("c")
    await manager.close()
    again, _backend = await make_manager(tmp_path, store)
    status = await wait_state(again, "a", "connected")
    assert status["connectionInfo"]["options"] == {"description": "first"}
    await wait_state(again, "b", "connected")
    assert sorted(again.monitors) == ["fake://a", "fake://b"]
    await again.close()
    await store.close()


async def test_idempotent_manage_and_id_in_use(tmp_path):
    manager, backend = await make_manager(tmp_path)
    await manager.manage("a", "fake://a")
    await manager.manage("a", "FAKE://A")  # same canonical URI
    with pytest.raises(errors.ConnectionIdInUse) as caught:
        await manager.manage("a", "fake://b")
    assert caught.value.to_error()["data"]["uri"] == "fake://a"
    await wait_state(manager, "a", "connected")
    assert backend.target("fake://a").connects == 1
    await manager.close()


async def test_a_local_error_during_connect_is_a_failed_attempt(tmp_path):
    manager, backend = await make_manager(tmp_path)
    target = backend.target("fake://local")
    target.connect_error = PermissionError(13, "Permission denied")  # type: ignore[assignment]
    await manager.manage("local", "fake://local")
    status = await wait_state(manager, "local", "disconnected")
    assert status["lastError"]["code"] == "EACCES"
    while manager.get("local")["attempts"] < 2:
        await asyncio.sleep(0.01)
    target.connect_error = None
    await wait_state(manager, "local", "connected")
    await manager.close()
