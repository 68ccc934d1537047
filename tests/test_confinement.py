"""Confinement by descriptor, replayed against a real agent (issue 15).

* Item 4: an operate-role user (a real non-root user on the Unix socket)
  reads a secret out of a file on a mounted ext4 with 1-byte checksums of
  the device. Refused: a device in use, and a range off 1 MiB boundaries,
  need ``force`` (admin).
* Item 5: a hard link inside the root to a file outside it, and a bind mount
  of an outside directory inside the root: refused for copy and checksum.
* Item 10: a path component over 255 bytes, and a path whose directory is
  replaced by a file while its task waits: named errors, never -32603 or
  ``InternalError``.
* Item 11: a copy that fails after creating its destination (qemu-img out of
  space, a failure in ``pre`` right after the create) leaves no file behind.
* The qcow2 backing chain is opened by descriptor: swapping a backing file for
  a symlink after it was resolved changes nothing; an external data file, a
  protocol as backing file and a chain that loops are refused; qemu-img in
  its Landlock sandbox opens nothing but the descriptors it was given.

The race replays (many tries, a racing process of the user) are in
tests/test_confinement_races.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import devices_fixtures
from tests.confinement_support import (
    Arena,
    LocalContext,
    MiB,
    User,
    agent_factory,
    arena,
    bind_mount,
    local_user,
    random_file,
    sha256,
    submit,
    tree,
    user_call,
    wait,
)
from tests.devices_fixtures import DeviceLab, sh
from tests.support import AgentProcess
from vdsm_agent import errors
from vdsm_agent.tasks import child
from vdsm_agent.tasks.kinds import KindEnv, copy, paths, sandbox, tools
from vdsm_agent.tasks.kinds.images import inspect_source

lab = devices_fixtures.lab
__all__ = ["agent_factory", "arena", "lab", "local_user"]  # fixtures, used by name

pytestmark = pytest.mark.root

SECRET = b"TOP-SECRET:4f1c9a7e2b3d!"  # 24 bytes: the attack ran 24 tasks


def refused(answer: dict[str, Any]) -> dict[str, Any]:
    assert "error" in answer, answer
    error: dict[str, Any] = answer["error"]
    assert error["code"] != errors.INTERNAL_ERROR, error
    return error


# -- item 4: reading a mounted filesystem byte by byte -----------------------------------------


def _device_offset(device: str, secret: bytes) -> int:
    subprocess.run(["blockdev", "--flushbufs", device], check=True, timeout=30)
    with open(device, "rb") as stream:
        data = stream.read()
    offset = data.find(secret)
    assert offset >= 0, "the secret is not on the device"
    return offset


@pytest.mark.tool("losetup")
@pytest.mark.tool("mkfs.ext4")
def test_operate_role_cannot_read_a_mounted_device_byte_by_byte(
        agent_factory: Any, lab: DeviceLab, local_user: User) -> None:
    device = lab.loop(32 * MiB)
    lab.mkfs_ext4(device)
    mountpoint = lab.mount(device)
    (mountpoint / "secret.txt").write_bytes(SECRET)
    os.chmod(mountpoint / "secret.txt", 0o600)
    os.sync()
    offset = _device_offset(device, SECRET)
    agent = agent_factory("--role", f"uid:{local_user.uid}=operate")
    byte_of = {hashlib.sha256(bytes([value])).hexdigest(): value for value in range(256)}

    # The attack as it was run: one task per byte, length 1, the digest looked up.
    recovered = bytearray()
    answers = []
    for index in range(len(SECRET)):
        answer = user_call(local_user, agent, "startTask", kind="checksum",
                           params={"path": device, "offset": offset + index, "length": 1})
        answers.append(answer)
        if "result" in answer:
            task = user_call(local_user, agent, "waitTask", taskID=answer["result"]["taskID"],
                             timeout=30)["result"]
            if task["state"] == "done":
                recovered.append(byte_of[task["result"]["checksum"]])
    assert SECRET not in bytes(recovered)
    for answer in answers:
        error = refused(answer)
        assert error["data"]["name"] == "DeviceInUse", error
        assert error["code"] == errors.DeviceInUse.code
        assert "mounted" in {reason["code"] for reason in error["data"]["reasons"]}
        assert "force=true" in error["data"]["detail"]
    # Not even the whole device, and force is the admin's.
    error = refused(user_call(local_user, agent, "startTask", kind="checksum",
                              params={"path": device}))
    assert error["data"]["name"] == "DeviceInUse"
    error = refused(user_call(local_user, agent, "startTask", kind="checksum",
                              params={"path": device, "offset": offset, "length": 1,
                                      "force": True}))
    assert error["code"] == errors.Forbidden.code
    # The admin (root on the Unix socket) may, with force, and is warned.
    answer = submit(agent, "checksum", path=device, offset=offset, length=1, force=True)
    task = wait(agent, answer["result"]["taskID"])
    assert task["state"] == "done", task
    assert task["result"]["checksum"] == hashlib.sha256(SECRET[:1]).hexdigest()
    assert any("in use" in warning for warning in task["warnings"])

    # Unmounted, the device is free, but a byte is still a byte: whole MiBs only.
    sh("umount", "--", str(mountpoint))
    error = refused(user_call(local_user, agent, "startTask", kind="checksum",
                              params={"path": device, "offset": offset, "length": 1}))
    assert (error["data"]["name"], error["data"]["rule"]) == ("InvalidParams", "granularity")
    error = refused(user_call(local_user, agent, "startTask", kind="checksum",
                              params={"path": device, "offset": offset - offset % MiB,
                                      "length": offset % MiB + 1}))
    assert error["data"]["field"] == "params.params.length"
    start = offset - offset % MiB
    answer = user_call(local_user, agent, "startTask", kind="checksum",
                       params={"path": device, "offset": start, "length": MiB})
    task = wait(agent, answer["result"]["taskID"])
    assert task["state"] == "done", task
    with open(device, "rb") as stream:
        stream.seek(start)
        assert task["result"]["checksum"] == hashlib.sha256(stream.read(MiB)).hexdigest()


# -- item 5: hard links and bind mounts -------------------------------------------------------


@pytest.mark.tool("qemu-img")
def test_a_hard_link_to_a_file_outside_is_refused(arena: Arena, agent_factory: Any) -> None:
    agent = agent_factory()
    victim = random_file(arena.outside / "victim.img", MiB)
    before = sha256(victim)
    link = arena.root / "linked.img"
    subprocess.run(["ln", "--", str(victim), str(link)], check=True, timeout=30)
    source = random_file(arena.root / "source.img", MiB)
    for create in (False, True):
        error = refused(submit(agent, "copy", source=str(source), destination=str(link),
                               create=create))
        assert (error["data"]["name"], error["data"]["rule"]) == ("PathNotAllowed",
                                                                  "hardLink"), error
        assert error["data"]["field"] == "params.params.destination"
    error = refused(submit(agent, "checksum", path=str(link)))
    assert (error["data"]["name"], error["data"]["rule"]) == ("PathNotAllowed", "hardLink")
    error = refused(submit(agent, "copy", source=str(link),
                           destination=str(arena.root / "out.img")))
    assert error["data"]["field"] == "params.params.source"
    assert sha256(victim) == before
    assert not (arena.root / "out.img").exists()


@pytest.mark.tool("qemu-img")
def test_a_bind_mount_inside_the_root_is_refused(arena: Arena, agent_factory: Any) -> None:
    agent = agent_factory()
    secret = random_file(arena.outside / "secret.img", MiB, mode=0o600)
    victim = random_file(arena.outside / "victim.img", MiB)
    before = tree(arena.outside)
    source = random_file(arena.root / "source.img", MiB)
    with bind_mount(arena.outside, arena.root / "bound") as bound:
        for path in (bound / secret.name, bound):
            error = refused(submit(agent, "checksum", path=str(path)))
            assert (error["data"]["name"], error["data"]["rule"]) == ("PathNotAllowed",
                                                                      "mount"), error
        for destination, create in ((bound / victim.name, False), (bound / victim.name, True),
                                    (bound / "new.img", True)):
            error = refused(submit(agent, "copy", source=str(source),
                                   destination=str(destination), create=create))
            assert error["data"]["rule"] == "mount", error
        error = refused(submit(agent, "copy", source=str(bound / secret.name),
                               destination=str(arena.root / "leak.img")))
        assert error["data"]["rule"] == "mount", error
    assert tree(arena.outside) == before
    assert not (arena.root / "leak.img").exists()


# -- item 10: names too long, paths that vanish --------------------------------------------------


def test_a_path_component_over_255_bytes_is_a_named_error(arena: Arena,
                                                          agent_factory: Any) -> None:
    agent = agent_factory()
    source = random_file(arena.root / "source.img", MiB)
    long_name = "x" * 256
    for kind, params, field in (
            ("checksum", {"path": f"{arena.root}/{long_name}"}, "params.params.path"),
            ("checksum", {"path": f"{arena.root}/{'é' * 128}/a.img"}, "params.params.path"),
            ("copy", {"source": f"{arena.root}/{long_name}",
                      "destination": str(arena.root / "x.img")}, "params.params.source"),
            ("copy", {"source": str(source), "destination": f"{arena.root}/{long_name}"},
             "params.params.destination"),
            ("wipe", {"device": f"/dev/{long_name}"}, "params.params.device")):
        error = refused(submit(agent, kind, **params))
        assert (error["data"]["name"], error["data"]["rule"], error["data"]["field"]) == (
            "InvalidParams", "nameLength", field), (kind, error)
    # 255 bytes is a name like any other (here: one that does not exist).
    error = refused(submit(agent, "checksum", path=f"{arena.root}/{'x' * 255}"))
    assert (error["data"]["name"], error["data"]["rule"]) == ("InvalidParams", "exists")


def test_a_path_that_vanishes_before_its_task_starts_fails_it_by_name(
        arena: Arena, agent_factory: Any) -> None:
    agent = agent_factory("--max-running-tasks", "1", "--enable-test-kinds", "true")
    directory = arena.root / "dir"
    directory.mkdir()
    images = [random_file(directory / f"disk-{number}.img", 4096) for number in range(3)]
    blocker = submit(agent, "test.sleep", seconds=60)["result"]["taskID"]
    queued = [submit(agent, "checksum", path=str(image))["result"]["taskID"]
              for image in images]
    # While they wait: the directory becomes a file, then a symlink, then is gone.
    directory.rename(arena.root / "moved")
    directory.write_bytes(b"not a directory any more")
    agent.call("cancelTask", unix=True, taskID=blocker)
    first = wait(agent, queued[0])
    assert first["state"] == "failed", first
    assert (first["error"]["name"], first["error"]["rule"]) == ("InvalidParams", "exists")
    directory.unlink()
    directory.symlink_to(arena.root / "moved")
    second = wait(agent, queued[1])
    assert (second["error"]["name"], second["error"]["rule"]) == ("PathNotAllowed", "symlink")
    directory.unlink()
    third = wait(agent, queued[2])
    assert (third["error"]["name"], third["error"]["rule"]) == ("InvalidParams", "exists")


# -- item 11: no stray file after a failed copy ---------------------------------------------


@pytest.fixture
def tiny_root(arena: Arena) -> Path:
    """A 2 MiB tmpfs, an allowed root of its own (the arena unmounts it)."""
    point = arena.base / "tiny"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tiny", str(point)],
                   check=True, timeout=30)
    return point


@pytest.mark.tool("qemu-img")
def test_a_copy_that_runs_out_of_space_removes_the_file_it_created(
        arena: Arena, agent_factory: Any, tiny_root: Path) -> None:
    agent = agent_factory("--allowed-root", str(tiny_root))
    source = random_file(arena.root / "source.img", 8 * MiB)
    (tiny_root / "kept.img").write_bytes(b"x" * 4096)
    for fmt in ("raw", "qcow2"):
        destination = tiny_root / f"new.{fmt}"
        answer = submit(agent, "copy", source=str(source), destination=str(destination),
                        destinationFormat=fmt)
        task = wait(agent, answer["result"]["taskID"])
        assert task["state"] == "failed", task
        assert task["error"]["name"] == "ToolFailed", task
        assert sorted(os.listdir(tiny_root)) == ["kept.img"], fmt
        output = agent.call("getTaskOutput", unix=True, taskID=task["id"])["data"]
        assert f"removed {destination} (created by this task)" in output


def fill_up(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, bytes(4096))
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    return
                raise
    finally:
        os.close(fd)


@pytest.mark.tool("qemu-img")
def test_a_failure_in_pre_after_the_create_removes_the_file(arena: Arena) -> None:
    """The task's directory is full (a real full tmpfs): the note of the created file
    cannot be written, pre() fails, and the file it had just created is gone."""
    notes_dir = arena.base / "task"
    notes_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "task", str(notes_dir)],
                   check=True, timeout=30)
    fill_up(notes_dir / "filler")
    source = random_file(arena.root / "source.img", MiB)
    destination = arena.root / "new.img"
    env = KindEnv(allowed_roots=(str(arena.root),), task_id="t", task_dir=str(notes_dir))
    params = copy.Copy.check_params({"source": str(source), "destination": str(destination)})
    # The task process's own run (tasks/child.py): pre() fails, then cleanup runs.
    outcome = child.run(LocalContext(env), {  # type: ignore[arg-type]
        "kind": "copy", "params": params,
        "resources": copy.Copy.resources(params, KindEnv(allowed_roots=env.allowed_roots))})
    assert outcome["state"] == "failed"
    assert "No space left" in outcome["error"]["detail"], outcome
    assert not destination.exists()
    assert sorted(os.listdir(arena.root)) == ["source.img"]


# -- the qcow2 backing chain, by descriptor -------------------------------------------------


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.tool("qemu-img")
def test_a_backing_chain_is_read_by_descriptor_whatever_its_names_become(
        arena: Arena, agent_factory: Any) -> None:
    root = arena.root
    base = random_file(root / "base.raw", MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             str(root / "mid.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             str(root / "top.qcow2"))
    outside = random_file(arena.outside / "base.raw", MiB)
    # Through the API: the chain is confined, and the flat copy is the base's data.
    agent = agent_factory()
    answer = submit(agent, "copy", source=str(root / "top.qcow2"),
                    destination=str(root / "flat.img"))
    task = wait(agent, answer["result"]["taskID"])
    assert task["state"] == "done", task
    assert sha256(root / "flat.img") == sha256(base)
    output = agent.call("getTaskOutput", unix=True, taskID=task["id"])["data"]
    assert "json:" in output
    assert "/dev/fd/" in output
    assert str(base) in output  # the "where /dev/fd/N is ..." line names each layer

    # Resolved, then its base swapped for a symlink to a file outside: qemu-img
    # reads the inode resolved, because the spec names it by descriptor.
    source = inspect_source(str(root / "top.qcow2"), None, (str(root),))
    try:
        assert [layer.format for layer in source.layers] == ["qcow2", "qcow2", "raw"]
        base.rename(root / "base.moved")
        (root / "base.raw").symlink_to(outside)
        out = root / "again.img"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            subprocess.run(["qemu-img", "convert", "-O", "raw", "--", source.args()[-1],
                            f"/dev/fd/{fd}"], pass_fds=(*source.fds(), fd), check=True,
                           capture_output=True, timeout=60)
        finally:
            os.close(fd)
    finally:
        source.close()
    assert sha256(out) == sha256(root / "base.moved") != sha256(outside)


@pytest.mark.tool("qemu-img")
def test_chains_that_cannot_be_confined_are_refused(arena: Arena, agent_factory: Any) -> None:
    root = arena.root
    agent = agent_factory()
    data = random_file(arena.outside / "data.raw", MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on",
             str(root / "external.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nbd://127.0.0.1:1/x", "-F", "raw",
             str(root / "network.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "loop-b.qcow2", "-F", "qcow2",
             str(root / "loop-a.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "loop-a.qcow2", "-F", "qcow2",
             str(root / "loop-b.qcow2"), "1M")
    random_file(root / "target.img", MiB)
    for source, name, rule in (("external.qcow2", "InvalidParams", "dataFile"),
                               ("network.qcow2", "PathNotAllowed", "backing"),
                               ("loop-a.qcow2", "InvalidParams", "chain")):
        error = refused(submit(agent, "copy", source=str(root / source),
                               destination=str(root / f"from-{source}.img")))
        assert (error["data"]["name"], error["data"]["rule"]) == (name, rule), error
        assert not (root / f"from-{source}.img").exists()
    # Nor is an existing qcow2 with an external data file written into.
    error = refused(submit(agent, "copy", source=str(root / "target.img"),
                           destination=str(root / "external.qcow2"), create=False,
                           destinationFormat="qcow2"))
    assert (error["data"]["field"], error["data"]["rule"]) == ("params.params.destination",
                                                               "dataFile")


def test_the_resolved_name_is_the_roots_resolved_name(arena: Arena, tmp_path: Path) -> None:
    """Resources are named beneath the root's resolved name, whatever the spelling."""
    link = tmp_path / "root-link"
    link.symlink_to(arena.root)  # the administrator's own link to the root
    image = random_file(arena.root / "a.img", 4096)
    for spelling in (f"{link}/a.img", f"{arena.root}//./a.img"):
        with paths.resolve(spelling, (str(link),), "f") as target:
            assert paths.resource(target) == f"file:{image}"


def test_a_checksum_of_a_device_is_judged_on_the_descriptors_device(
        agent_factory: Any) -> None:
    """/dev names that lead elsewhere (a symlink into /dev/shm, a character device) are
    refused; the device judged is the one the descriptor holds."""
    agent: AgentProcess = agent_factory()
    for path, name in (("/dev/null", "PathNotAllowed"), ("/dev/stdin", "PathNotAllowed"),
                       ("/dev/shm", "PathNotAllowed"), ("/dev/no-such-disk", "DeviceNotFound")):
        error = refused(submit(agent, "checksum", path=path))
        assert error["data"]["name"] == name, (path, error)


# -- qemu-img in a Landlock sandbox: only the task's descriptors -------------------------------


def data_file_image(path: Path, data_file: Path) -> Path:
    """A qcow2 whose header names ``data_file`` as its external data file (made before
    the data file is filled: qemu-img create truncates it)."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file},data_file_raw=on",
             str(path), "1M")
    return path


@pytest.mark.tool("qemu-img")
def test_qemu_img_in_the_sandbox_opens_nothing_but_its_descriptors(arena: Arena) -> None:
    if sandbox.abi_version() <= 0:
        pytest.skip("no Landlock in this kernel")
    secret = arena.outside / "secret.raw"
    image = data_file_image(arena.root / "external.qcow2", secret)
    secret.write_bytes(os.urandom(MiB))
    destination = random_file(arena.root / "out.img", MiB)
    before = sha256(destination)
    ctx = LocalContext(KindEnv())
    source = os.open(image, os.O_PATH | os.O_CLOEXEC)
    target = os.open(destination, os.O_PATH | os.O_CLOEXEC)
    jail = sandbox.build({source: sandbox.READ, target: sandbox.WRITE})
    assert jail is not None
    try:
        spec = "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {
            "driver": "file", "filename": f"/dev/fd/{source}"}})
        # The header names a file outside: qemu-img may not open it.
        run = tools.run(ctx, ["qemu-img", "convert", "-n", "-O", "raw", "--", spec,
                              f"/dev/fd/{target}"], fds={source: "src", target: "dst"},
                        sandbox=jail)
        assert run.returncode != 0
        assert "Permission denied" in run.summary(), run.tail
        # Nor any name at all, however it is spelled.
        run = tools.run(ctx, ["qemu-img", "info", "--", str(secret)], sandbox=jail)
        assert "Permission denied" in run.summary(), run.tail
        # What it was given, it may use.
        plain = random_file(arena.root / "plain.img", MiB)
        plain_fd = os.open(plain, os.O_PATH | os.O_CLOEXEC)
        try:
            allowed = sandbox.build({plain_fd: sandbox.READ, target: sandbox.WRITE})
            assert allowed is not None
            try:
                run = tools.run(ctx, ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                      "--", f"/dev/fd/{plain_fd}", f"/dev/fd/{target}"],
                                fds={plain_fd: "plain", target: "dst"}, sandbox=allowed)
            finally:
                allowed.close()
        finally:
            os.close(plain_fd)
        assert run.returncode == 0, run.tail
        assert sha256(destination) == sha256(plain) != before
    finally:
        jail.close()
        os.close(source)
        os.close(target)



@pytest.mark.parametrize("use_openat2", [True, False], ids=["openat2", "nofollow-walk"])
def test_the_rules_hold_with_openat2_and_with_the_fallback_walk(
        arena: Arena, use_openat2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusals whether the kernel resolves (openat2) or the walk does."""
    from vdsm_agent.system import confine

    if use_openat2:
        try:
            os.close(confine.openat2(-100, "/", os.O_PATH, 0))
        except OSError:
            pytest.skip("no openat2 in this kernel")
    monkeypatch.setattr(confine, "openat2_available", None if use_openat2 else False)
    root = arena.root
    roots = (str(root),)
    random_file(root / "plain.img", 4096)
    (root / "dir").mkdir()
    random_file(root / "dir" / "inner.img", 4096)
    (root / "link.img").symlink_to(root / "plain.img")
    (root / "dirlink").symlink_to(root / "dir")
    os.link(random_file(arena.outside / "victim.img", 4096), root / "hard.img")
    cases = {
        str(root / "link.img"): ("PathNotAllowed", "symlink"),
        str(root / "dirlink" / "inner.img"): ("PathNotAllowed", "symlink"),
        f"{root}/dir/../plain.img": ("PathNotAllowed", "dotdot"),
        str(root / "hard.img"): ("PathNotAllowed", "hardLink"),
        str(root / "bound" / "victim.img"): ("PathNotAllowed", "mount"),
        str(root / "missing.img"): ("InvalidParams", "exists"),
        str(root / "plain.img" / "below.img"): ("InvalidParams", "exists"),
        f"{root}/{'y' * 256}": ("InvalidParams", "nameLength"),
    }
    with bind_mount(arena.outside, root / "bound"):
        for path, (name, rule) in cases.items():
            with pytest.raises(errors.RpcError) as info:
                paths.resolve(path, roots, "f")
            assert (info.value.name, info.value.data.get("rule")) == (name, rule), path
        with paths.resolve(str(root / "dir" / "inner.img"), roots, "f") as target:
            assert target.path == str(root / "dir" / "inner.img")
        assert confine.openat2_available is use_openat2
