"""Hostile URIs, paths and device names: nothing reaches a command line as an option,
and nothing outside the allowed roots is touched.

* URIs (hypothesis, every scheme): hosts, users, paths, volumes, IQNs, LUNs
  and NFS options made of leading ``-``, ``..``, NUL and control characters,
  commas and ``=``, percent-encodings of those, and very long strings. Every
  URI the backends accept is connected and disconnected through the fake
  runner of the connection tests, and every argv it produced is checked: no
  control characters, no option the program's fixed vocabulary does not have,
  ``-o`` lists only with known option names, mount points under the mount root.
* ``loop://`` images: outside the root, through a symlink (file or directory),
  ``..`` or a hard link: refused at manage; swapped for a symlink after that
  check: refused when connect resolves the image again. No ``losetup`` runs
  (the device is bound to the image's descriptor; tests/test_loop_confinement.py
  replays the race on a real agent).
* Paths for tasks: ``..``, symlinks leading out of the allowed root, leading
  ``-``, NUL, control characters, very long paths: refused at submit. A file
  swapped for a symlink after the task was accepted is refused by the task
  process itself (a real child process).
* Device names for the destructive kinds: never accepted. As in the fuzz
  tests, no task process is launched for them and the exclusive-open probe
  never opens a device (see tests/test_security_fuzz.py for why).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.connections_support import FakeRunner, ok
from tests.loop_support import backing_of, devices_bound_to
from tests.security_support import HOSTILE_PARTS, IQN, hostile_uris
from tests.support import RpcClient
from tests.tasks_support import become_subreaper, kill_task_processes, make_image, task_config
from vdsm_agent import errors
from vdsm_agent import settings as agent_settings
from vdsm_agent.connections.backends import iscsi
from vdsm_agent.connections.backends.base import Attachment, BackendContext, BackendError
from vdsm_agent.connections.backends.loop import LoopBackend
from vdsm_agent.connections.backends.nfs import _ALLOWED as NFS_OPTIONS
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.devices import inventory, usage
from vdsm_agent.server.app import make_app
from vdsm_agent.tasks.kinds import KINDS
from vdsm_agent.tasks.supervisor import Supervisor

# What each program may be given as options: the fixed vocabulary of the backends.
OPTION_WORDS = {
    "mount": {"-t", "-o", "-f", "-l"},
    "umount": {"-f", "-l"},
    "sshfs": {"-o", "-p"},
    "iscsiadm": {"-m", "-t", "-p", "-T", "--login", "--logout"},
}
SSH_OPTIONS = {"reconnect", "ServerAliveInterval", "ServerAliveCountMax", "ConnectTimeout",
               "BatchMode", "IdentityFile", "StrictHostKeyChecking", "UserKnownHostsFile"}
MOUNT_OPTION_NAMES = set(NFS_OPTIONS) | {"vers"} | SSH_OPTIONS
CONTROL = re.compile(r"[\x00-\x1f\x7f\s]")

def _respond(argv: list[str]) -> Any:
    if argv[:3] == ["iscsiadm", "-m", "discovery"]:
        return ok(argv, stdout=f"10.0.0.1:3260,1 {IQN}\n")
    return ok(argv)


def check_argv(argv: list[str], mount_root: str) -> None:
    program = argv[0]
    assert program in OPTION_WORDS, argv
    after_double_dash = False
    for position, arg in enumerate(argv[1:], start=1):
        assert not CONTROL.search(arg), argv
        if after_double_dash:
            continue
        if arg == "--":
            after_double_dash = True
        if arg.startswith("-"):
            assert arg in OPTION_WORDS[program], (arg, argv)
        if argv[position - 1] == "-o":
            for option in arg.split(","):
                assert option.split("=", 1)[0] in MOUNT_OPTION_NAMES, (option, argv)
    if program in ("mount", "sshfs"):
        assert argv[-1].startswith(mount_root + "/"), argv
        assert not argv[-2].startswith("-"), argv  # the source


async def _exercise(manager: ConnectionManager, uri: str) -> bool:
    """Parse ``uri``; when accepted, connect and disconnect through the fake runner."""
    try:
        endpoint = manager.parse(uri)
    except (errors.InvalidUri, errors.UnsupportedScheme):
        return False
    backend = manager.backends[endpoint.scheme]
    try:
        attachment = await backend.connect(endpoint)
    except BackendError:
        attachment = Attachment(identity="x")
    try:
        await backend.disconnect(endpoint, attachment)
    except BackendError:
        pass
    return True


def test_hostile_uris_never_reach_a_command_line_as_options(tmp_path, monkeypatch):
    # A login that "worked" waits for its session in sysfs: not for long here.
    monkeypatch.setattr(iscsi, "SYSFS_WAIT", 0.01)
    config = agent_settings.defaults().replace(state_dir=str(tmp_path / "state"),
                                               mount_root=str(tmp_path / "mnt"))
    runner = FakeRunner(_respond)
    (tmp_path / "sys").mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("")
    manager = ConnectionManager(config, None, runner=runner, sysfs_root=tmp_path / "sys",
                                dev_root=tmp_path / "dev", mountinfo=mountinfo)
    mount_root = str((tmp_path / "mnt").resolve())
    accepted: list[str] = []
    loop = asyncio.new_event_loop()

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(uri=hostile_uris())
    def run(uri: str) -> None:
        before = len(runner.calls)
        if loop.run_until_complete(_exercise(manager, uri)):
            accepted.append(uri)
        for argv, _ in runner.calls[before:]:
            check_argv(argv, mount_root)

    try:
        run()
    finally:
        loop.run_until_complete(manager.close())
        loop.close()
    assert runner.calls, "no hostile-looking URI was accepted: the test proves nothing"
    assert not any("secret" in json.dumps(argv) for argv in runner.argvs)


@pytest.mark.parametrize("image", ["/etc/shadow", "/dev/vda", "{images}/../outside.img",
                                   "{images}/link-out.img", "{images}/dir-out/outside.img",
                                   "{images}/hard.img", "{images}/sub/../../outside.img"])
def test_loop_images_stay_inside_the_allowed_roots(tmp_path, image):
    images = tmp_path / "images"
    images.mkdir()
    (images / "sub").mkdir()
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"x")
    (images / "link-out.img").symlink_to(outside)
    (images / "dir-out").symlink_to(tmp_path)
    os.link(outside, images / "hard.img")  # a hard link carries the outside file in
    (images / "ok.img").write_bytes(b"x")
    context = BackendContext(runner=FakeRunner(_respond), mount_root=tmp_path / "mnt",
                             allowed_roots=(str(images),))
    backend = LoopBackend(context)
    # ".." is refused by the URI parser already; the rest by confinement at manage.
    with pytest.raises((errors.PathNotAllowed, errors.InvalidUri)):
        backend.authorize(backend.parse("loop://" + image.format(images=images)))
    # An image inside the root is accepted; swapped for a symlink to the outside file
    # after that check, it is refused when the connect resolves it again.
    endpoint = backend.parse(f"loop://{images}/ok.img")
    backend.authorize(endpoint)
    os.replace(images / "link-out.img", images / "ok.img")
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(BackendError) as caught:
            loop.run_until_complete(backend.connect(endpoint))
    finally:
        loop.close()
    assert caught.value.code == "PathNotAllowed"
    assert context.runner.calls == []  # type: ignore[attr-defined]  # no losetup, ever
    assert devices_bound_to(backing_of(outside)) == {}


# -- task paths and device names ----------------------------------------------------------


@pytest.fixture
def no_devices_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """No task process, and no exclusive open of any device (it is "busy")."""

    async def _launch(self: Supervisor, active: Any) -> None:
        return None

    monkeypatch.setattr(Supervisor, "launch", _launch)
    monkeypatch.setattr(inventory, "exclusive_open_probe",
                        lambda path: usage.Reason(usage.BUSY, "test: never opened"))


@pytest.fixture
async def hostile_agent(aiohttp_client: Any, tmp_path: Path) -> Any:
    root = tmp_path / "agent"
    root.mkdir()
    config = task_config(root)
    client = await aiohttp_client(make_app(config))
    client.server.app  # noqa: B018 - started
    return RpcClient(client), root / "images", tmp_path


async def _submit(rpc: RpcClient, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"jsonrpc": "2.0", "method": "startTask",
                       "params": {"kind": kind, "params": params}, "id": 1})
    return dict(await rpc.raw(body))


async def test_hostile_task_paths_are_refused(hostile_agent, no_devices_touched):
    rpc, images, tmp_path = hostile_agent
    make_image(images / "good.img", 4096)
    outside = tmp_path / "outside.img"
    make_image(outside, 4096)
    (images / "escape.img").symlink_to(outside)
    (images / "etc").symlink_to("/etc")
    hostile = [
        str(images / ".." / "outside.img"), str(outside), "/etc/passwd", "/etc/shadow",
        str(images / "escape.img"), str(images / "etc" / "passwd"), "-rf", "--help",
        "good.img", f"{images}/good.img\x00", f"{images}/\x1b[31m.img", "/" + "a" * 5000,
        f"{images}/../../../../etc/passwd", "/proc/self/environ", "/sys/kernel/notes",
        f"{images}/nonexistent.img", str(images),
    ]
    documented = {"PathNotAllowed", "InvalidParams", "DeviceNotFound"}
    for path in hostile:
        answer = await _submit(rpc, "checksum", {"path": path})
        assert "error" in answer, (path, answer)
        assert answer["error"]["code"] != errors.INTERNAL_ERROR, (path, answer)
        name = answer["error"]["data"]["name"] if isinstance(answer["error"].get("data"),
                                                             dict) else "InvalidParams"
        assert name in documented, (path, answer)
    good = await _submit(rpc, "checksum", {"path": str(images / "good.img")})
    assert good["result"]["state"] == "accepted"


HOSTILE_DEVICES = ["/dev/vda", "/dev/vda1", "-/dev/vda", "/dev/../etc/passwd", "/dev/null",
                   "/dev/zero", "/dev/nonexistent", "/dev/vda\x00", "/dev/\n", "/etc/shadow",
                   "/dev/disk/by-id/../../vda", "/" + "d" * 5000, "/dev/loop0", "/dev/loop7"]


def _device_field(params_schema: dict[str, Any]) -> list[str]:
    properties = params_schema.get("properties", {})
    return [field for field in ("device", "destination") if field in properties][:1]


async def test_hostile_device_names_never_get_a_destructive_task(hostile_agent,
                                                                 no_devices_touched):
    rpc, images, _ = hostile_agent
    # The destructive kinds that take a device (a Gluster volume task names a volume).
    destructive = {name: field for name, kind in KINDS.items() if kind.destructive
                   for field in _device_field(kind.params_schema)}
    seen: set[str] = set()
    assert {"wipe", "format", "copy"} <= destructive.keys(), destructive
    for name, field in sorted(destructive.items()):
        for device in HOSTILE_DEVICES:
            params: dict[str, Any] = {field: device}
            if name == "format":
                params["fstype"] = "ext4"
            if name == "copy":
                params["source"] = str(images / "src.img")
                make_image(images / "src.img", 4096)
            answer = await _submit(rpc, name, params)
            assert "error" in answer, (name, device, answer)
            error = answer["error"]
            assert error["code"] != errors.INTERNAL_ERROR, (name, device, answer)
            seen.add(error["data"]["name"])
    # The safety checks were reached, not only the schema.
    assert {"DeviceInUse", "PathNotAllowed", "DeviceNotFound"} <= seen, seen


async def test_a_file_swapped_for_a_symlink_after_submit_is_refused_by_the_task(
        aiohttp_client, tmp_path):
    """The agent checked the path at submit; the task process checks the file it opened."""
    become_subreaper()
    root = tmp_path / "agent"
    root.mkdir()
    config = task_config(root, max_running_tasks=1)
    rpc = RpcClient(await aiohttp_client(make_app(config)))
    images = root / "images"
    image = make_image(images / "disk.img", 8192)
    secret = tmp_path / "secret.img"
    make_image(secret, 8192, seed=7)
    try:
        blocker = await rpc.call("startTask", kind="test.sleep", params={"seconds": 60})
        task = await rpc.call("startTask", kind="checksum", params={"path": str(image)})
        assert (await rpc.call("getTask", taskID=task["taskID"]))["state"] == "accepted"
        image.unlink()
        image.symlink_to(secret)  # the swap, while the task waits in the queue
        await rpc.call("cancelTask", taskID=blocker["taskID"])
        final = await rpc.call("waitTask", taskID=task["taskID"], timeout=30)
        assert final["state"] == "failed", final
        assert final["error"]["name"] == "PathNotAllowed", final
        assert final["result"] is None
    finally:
        kill_task_processes(config.state_path)


def test_the_hostile_lists_are_really_hostile():
    # Guard against a "fix" that empties the lists above.
    assert len(HOSTILE_PARTS) > 20
    assert len(HOSTILE_DEVICES) > 10
    assert os.sep == "/"
