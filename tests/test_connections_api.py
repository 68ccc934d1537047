"""The connection verbs on an in-process agent, on real targets: loop devices,
local directories, a GlusterFS volume and an sshfs export on loopback.

Every result is validated against the verb's result schema by the ``rpc``
client. The semantics tests run once per backend (``target``)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.connections_support import (
    FAST,
    FailingRunner,
    cleanup_under,
    mount_entry,
    sh,
)
from tests.support import RpcClient, RpcFailure
from vdsm_agent import settings
from vdsm_agent.connections.backends.loop import bound_loop_devices
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.server.app import AGENT

# The fixtures (session-scoped servers) are registered once, as a plugin, so
# that every module shares one glusterd and one sshd.
pytest_plugins = ["tests.connections_support"]

pytestmark = pytest.mark.usefixtures("host_cleanup")

SYSFS = Path("/sys")


@dataclasses.dataclass
class Target:
    """A real target of one backend, and how to see it on the host."""

    scheme: str
    uri: str
    other_uri: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def identity(self, status: dict[str, Any]) -> str:
        info = status["connectionInfo"]
        return str(info.get("mountPoint") or info.get("device") or info.get("path"))

    def attached(self, identity: str) -> bool:
        if self.scheme == "loop":
            return bound_loop_devices(SYSFS).get(identity) is not None
        if self.scheme == "file":
            return Path(identity).is_dir()
        return mount_entry(identity) is not None


def _loop_target(tmp_path: Path) -> Target:
    for name in ("disk.img", "other.img"):
        sh(["truncate", "-s", "16M", str(tmp_path / name)])
    return Target("loop", f"loop://{tmp_path}/disk.img", f"loop://{tmp_path}/other.img")


def _file_target(tmp_path: Path) -> Target:
    for name in ("data", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "data" / "image.raw").write_bytes(b"\0" * 8192)
    return Target("file", f"file://{tmp_path}/data", f"file://{tmp_path}/other")


def _gluster_target(request: pytest.FixtureRequest) -> Target:
    server = request.getfixturevalue("gluster_server")
    return Target("glusterfs", server.uri, f"glusterfs://{server.host}/othervolume")


def _sshfs_target(request: pytest.FixtureRequest) -> Target:
    server = request.getfixturevalue("ssh_server")
    return Target("sshfs", server.uri, f"sshfs://root@127.0.0.1:{server.port}/tmp",
                  server.settings)


REAL = pytest.mark.root
TARGETS = [
    pytest.param("loop", marks=[REAL, pytest.mark.tool("losetup")], id="loop"),
    pytest.param("file", id="file"),
    pytest.param("glusterfs", marks=[REAL, pytest.mark.tool("glusterd"),
                                     pytest.mark.tool("gluster")], id="glusterfs"),
    pytest.param("sshfs", marks=[REAL, pytest.mark.tool("sshfs"), pytest.mark.tool("sshd"),
                                 pytest.mark.tool("ssh-keygen")], id="sshfs"),
]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    scheme = request.param
    if scheme == "loop":
        return _loop_target(tmp_path)
    if scheme == "file":
        return _file_target(tmp_path)
    if scheme == "glusterfs":
        return _gluster_target(request)
    return _sshfs_target(request)


# ``rpc`` (tests/conftest.py) builds its agent from ``config``: fast probes here,
# plus what the target needs (the sshfs key and host-key policy).
@pytest.fixture
def config(tmp_path: Path, request: pytest.FixtureRequest) -> settings.Config:
    extra = request.getfixturevalue("target").settings if "target" in request.fixturenames else {}
    return settings.defaults().replace(
        state_dir=str(tmp_path / "state"), unix_socket="none", listen=("127.0.0.1", 0),
        allowed_roots=[str(tmp_path)],  # loop:// images live here
        loopback_role="admin",  # the in-process client is an anonymous loopback caller
        **FAST, **extra)


def manager_of(rpc: RpcClient) -> ConnectionManager:
    manager = rpc.app[AGENT].connections
    assert manager is not None
    return manager


async def wait_status(rpc: RpcClient, connection_id: str,
                      predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0,
                      what: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await rpc.call("getStorageConnection", connectionID=connection_id)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{connection_id}: {what or predicate} not met: {status}")
        await asyncio.sleep(0.05)


def state_is(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status["state"] == state


async def failure(call: Any) -> RpcFailure:
    with pytest.raises(RpcFailure) as caught:
        await call
    return caught.value


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- semantics, once per backend -------------------------------------------------------------


async def test_manage_is_idempotent_and_an_id_names_one_uri(rpc, target):
    status = await rpc.call("manageStorageConnection", uri=target.uri, connectionID="sd-1")
    assert status["managed"] is True
    assert status["uri"] == target.uri
    again = await rpc.call("manageStorageConnection", uri=target.uri + "/"
                           if target.scheme in ("file", "sshfs") else target.uri,
                           connectionID="sd-1")
    assert again["uri"] == target.uri
    error = await failure(rpc.call("manageStorageConnection", uri=target.other_uri,
                                   connectionID="sd-1"))
    assert (error.code, error.name, error.data["uri"]) == (102, "ConnectionIdInUse", target.uri)
    status = await wait_status(rpc, "sd-1", state_is("connected"))
    assert status["connected"]
    assert status["lastCheck"]
    assert status["latencyMs"] is not None
    identity = target.identity(status)
    assert target.attached(identity)
    listed = await rpc.call("getStorageConnectionList")
    assert listed["sd-1"]["state"] == "connected"
    assert not [s for s in listed.values() if not s["managed"] and s["uri"] == target.uri]
    answer = await rpc.call("unmanageStorageConnection", connectionID="sd-1")
    assert answer == {"connectionID": "sd-1", "disconnected": True, "sharedWith": [],
                      "lastError": None}
    if target.scheme != "file":
        assert not target.attached(identity)
    error = await failure(rpc.call("getStorageConnection", connectionID="sd-1"))
    assert error.name == "ConnectionNotFound"


async def test_two_ids_on_one_target_share_it_until_the_last_goes(rpc, target):
    await rpc.call("manageStorageConnection", uri=target.uri, connectionID="a")
    await rpc.call("manageStorageConnection", uri=target.uri, connectionID="b")
    first = await wait_status(rpc, "a", state_is("connected"))
    second = await wait_status(rpc, "b", state_is("connected"))
    identity = target.identity(first)
    assert target.identity(second) == identity
    assert first["connectionInfo"]["sharedWith"] == ["b"]
    answer = await rpc.call("unmanageStorageConnection", connectionID="a")
    assert answer == {"connectionID": "a", "disconnected": False, "sharedWith": ["b"],
                      "lastError": None}
    assert target.attached(identity)
    await asyncio.sleep(FAST["probe_interval"] * 3)
    assert (await rpc.call("getStorageConnection", connectionID="b"))["state"] == "connected"
    answer = await rpc.call("unmanageStorageConnection", connectionID="b")
    assert answer["disconnected"] is True
    if target.scheme != "file":
        assert not target.attached(identity)


async def test_failed_disconnect_leaves_an_unmanaged_leftover(rpc, target):
    if target.scheme == "file":
        pytest.skip("a local directory has nothing to disconnect")
    manager = manager_of(rpc)
    await rpc.call("manageStorageConnection", uri=target.uri, connectionID="x")
    identity = target.identity(await wait_status(rpc, "x", state_is("connected")))
    real = manager.context.runner
    manager.context.runner = FailingRunner(real, [["umount"]])
    # A loop device is detached by ioctl, not a command: a reader holding it open is
    # what makes its detach fail (and it stays bound after the reader closes it).
    holder = os.open(identity, os.O_RDONLY) if target.scheme == "loop" else None
    try:
        answer = await rpc.call("unmanageStorageConnection", connectionID="x")
    finally:
        if holder is not None:
            os.close(holder)
    assert answer["disconnected"] is False
    assert answer["lastError"]["code"] in ("UmountFailed", "DeviceBusy")
    assert target.attached(identity)
    listed = await rpc.call("getStorageConnectionList")
    assert "x" not in listed
    leftovers = {cid: s for cid, s in listed.items()
                 if not s["managed"] and s["uri"] == target.uri}
    assert len(leftovers) == 1, listed
    (temporary_id, leftover), = leftovers.items()
    assert temporary_id.startswith("unmanaged-")
    assert leftover["connected"] is True
    assert leftover["lastError"]["code"] == answer["lastError"]["code"]
    # Managing it again adopts what is there; then it goes away for good.
    manager.context.runner = real
    await rpc.call("manageStorageConnection", uri=target.uri, connectionID="x2")
    status = await wait_status(rpc, "x2", state_is("connected"))
    assert status["connectionInfo"]["adopted"] is True
    assert target.identity(status) == identity
    assert (await rpc.call("unmanageStorageConnection", connectionID="x2"))["disconnected"]
    listed = await rpc.call("getStorageConnectionList")
    assert not [s for s in listed.values() if s["uri"] == target.uri]


# -- loop and file specifics ---------------------------------------------------------------------


async def test_unknown_ids(rpc):
    for verb in ("unmanageStorageConnection", "getStorageConnection",
                 "refreshStorageConnection"):
        error = await failure(rpc.call(verb, connectionID="nope"))
        assert (error.code, error.name, error.data["connectionID"]) == (
            103, "ConnectionNotFound", "nope")


@pytest.mark.parametrize("bad", ["a/b", "", "x" * 129, "/"])
async def test_connection_ids_without_slash_of_1_to_128_chars(rpc, tmp_path, bad):
    error = await failure(rpc.call("manageStorageConnection", uri=f"file://{tmp_path}",
                                   connectionID=bad))
    assert error.code == -32602
    assert error.data["field"] == "params.connectionID"


async def test_any_other_id_is_fine(rpc, tmp_path):
    for connection_id in ("x" * 128, "données 1", "a:b@c d"):
        status = await rpc.call("manageStorageConnection", uri=f"file://{tmp_path}",
                                connectionID=connection_id)
        assert status["managed"]
    listed = await rpc.call("getStorageConnectionList")
    assert {"x" * 128, "données 1", "a:b@c d"} <= set(listed)
    # Three IDs, one target.
    assert len(manager_of(rpc).monitors) == 1


async def test_invalid_and_unsupported_uris(rpc):
    error = await failure(rpc.call("manageStorageConnection", uri="nfs://-oremount/x",
                                   connectionID="n"))
    assert (error.code, error.name, error.data["part"]) == (100, "InvalidUri", "host")
    error = await failure(rpc.call("manageStorageConnection", uri="ceph://mon/pool",
                                   connectionID="n"))
    assert (error.code, error.name, error.data["scheme"]) == (101, "UnsupportedScheme", "ceph")


async def test_capabilities_list_the_served_schemes(rpc):
    """Every backend's scheme is either served or unserved with a reason (which ones
    depends on this host's tools and kernel: tests/test_messages.py)."""
    capabilities = await rpc.call("getCapabilities")
    served, unserved = capabilities["uriSchemes"], capabilities["unservedSchemes"]
    assert sorted([*served, *unserved]) == ["file", "glusterfs", "iscsi", "loop", "nfs",
                                            "sshfs"]
    assert "file" in served
    assert all(unserved.values())


async def test_manage_options_are_kept(rpc, tmp_path):
    status = await rpc.call("manageStorageConnection", uri=f"file://{tmp_path}",
                            connectionID="o", options={"description": "scratch area"})
    assert status["connectionInfo"]["options"] == {"description": "scratch area"}


@pytest.mark.root
@pytest.mark.tool("losetup")
async def test_foreign_loop_device_is_listed_unmanaged_then_adopted(rpc, tmp_path):
    image = tmp_path / "foreign.img"
    sh(["truncate", "-s", "8M", str(image)])
    device = sh(["losetup", "-f", "--show", "--", str(image)]).stdout.strip()
    listed = await rpc.call("getStorageConnectionList")
    found = {cid: s for cid, s in listed.items() if s["uri"] == f"loop://{image}"}
    assert len(found) == 1, listed
    (temporary_id, status), = found.items()
    assert temporary_id.startswith("unmanaged-")
    assert status["managed"] is False
    assert status["connectionInfo"] == {"scheme": "loop", "device": device, "image": str(image),
                                        "imageDeleted": False}
    error = await failure(rpc.call("getStorageConnection", connectionID=temporary_id))
    assert error.name == "ConnectionNotFound"
    await rpc.call("manageStorageConnection", uri=f"loop://{image}", connectionID="mine")
    status = await wait_status(rpc, "mine", state_is("connected"))
    assert status["connectionInfo"]["device"] == device
    assert status["connectionInfo"]["adopted"]
    listed = await rpc.call("getStorageConnectionList")
    assert [cid for cid, s in listed.items() if s["uri"] == f"loop://{image}"] == ["mine"]


@pytest.mark.root
@pytest.mark.tool("losetup")
async def test_loop_device_detached_behind_the_agents_back_is_bound_again(rpc, tmp_path):
    image = tmp_path / "disk.img"
    sh(["truncate", "-s", "8M", str(image)])
    await rpc.call("manageStorageConnection", uri=f"loop://{image}", connectionID="l")
    events: list[tuple[str, str]] = []
    manager_of(rpc).listeners.append(lambda e: events.append((e.old_state, e.new_state)))
    status = await wait_status(rpc, "l", state_is("connected"))
    device = status["connectionInfo"]["device"]
    sh(["losetup", "-d", device])
    started = time.monotonic()
    status = await wait_status(
        rpc, "l", lambda s: s["state"] == "connected" and s["lastError"] is not None,
        what="bound again")
    elapsed = time.monotonic() - started
    assert status["lastError"]["code"] == "Detached"
    assert ("connected", "disconnected") in events
    new_device = status["connectionInfo"]["device"]
    assert bound_loop_devices(SYSFS)[new_device] == str(image)
    assert elapsed < 5, elapsed


@pytest.mark.root
@pytest.mark.tool("losetup")
async def test_a_target_kept_down_backs_off_with_jitter(rpc, tmp_path):
    image = tmp_path / "late.img"
    await rpc.call("manageStorageConnection", uri=f"loop://{image}", connectionID="late")
    policy = manager_of(rpc).policy.backoff
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and len(seen) < 6:
        status = await rpc.call("getStorageConnection", connectionID="late")
        if status["nextRetryAt"] and status["attempts"] not in seen:
            assert status["state"] == "disconnected"
            assert status["connected"] is False
            assert status["lastError"]["code"] == "ENOENT"
            seen[status["attempts"]] = (parse_time(status["nextRetryAt"])
                                        - parse_time(status["lastError"]["time"]))
        await asyncio.sleep(0.01)
    assert sorted(seen)[:5] == [1, 2, 3, 4, 5], seen
    for attempt, delay in seen.items():
        assert policy.floor - 0.002 <= delay <= policy.ceiling(attempt) + 0.002, (attempt, delay)
    sh(["truncate", "-s", "8M", str(image)])  # the target appears: connected, no call needed
    await wait_status(rpc, "late", state_is("connected"), timeout=10)


async def test_missing_directory_is_retried_until_it_exists(rpc, tmp_path):
    directory = tmp_path / "later"
    await rpc.call("manageStorageConnection", uri=f"file://{directory}", connectionID="d")
    status = await wait_status(rpc, "d", state_is("disconnected"))
    assert status["lastError"]["code"] == "ENOENT"
    assert status["connected"] is False
    directory.mkdir()
    status = await wait_status(rpc, "d", state_is("connected"))
    assert status["connected"] is True


async def test_refresh_answers_with_a_fresh_verdict(rpc, tmp_path):
    await rpc.call("manageStorageConnection", uri=f"file://{tmp_path}", connectionID="r")
    first = await wait_status(rpc, "r", state_is("connected"))
    await asyncio.sleep(0.01)
    fresh = await rpc.call("refreshStorageConnection", connectionID="r")
    assert fresh["state"] == "connected"
    assert parse_time(fresh["lastCheck"]) > parse_time(first["lastCheck"])


def test_cleanup_helper_is_harmless_on_an_empty_dir(tmp_path):
    cleanup_under(tmp_path)
