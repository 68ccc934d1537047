"""Storage connections, unit level: URIs, names, backoff, states, and the exact
command lines of every backend through a fake runner (NFS and iSCSI cannot run
on this kernel), with sysfs and the mount table as fixture files."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.connections_support import FakeRunner, ok
from tests.loop_support import LoopJanitor, backing_of, devices_bound_to, loop_janitor
from vdsm_agent import errors, settings
from vdsm_agent.common.backoff import Backoff
from vdsm_agent.common.clock import rfc3339
from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends import BACKENDS, by_scheme
from vdsm_agent.connections.backends.base import Attachment, BackendContext, BackendError
from vdsm_agent.connections.backends.file import FileBackend
from vdsm_agent.connections.backends.glusterfs import GlusterfsBackend
from vdsm_agent.connections.backends.iscsi import IscsiBackend
from vdsm_agent.connections.backends.loop import LoopBackend
from vdsm_agent.connections.backends.nfs import NfsBackend
from vdsm_agent.connections.backends.sshfs import SshfsBackend
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.connections.monitor import Health, MonitorPolicy, State, next_state
from vdsm_agent.connections.probes import ProbePool, ProbeResult
from vdsm_agent.system import loopdev
from vdsm_agent.system.commands import CommandTimeout

__all__ = ["loop_janitor"]  # fixture, used by name

IQN = "iqn.2024-01.test.lbs:lun1"


@pytest.fixture
def context(tmp_path: Path) -> BackendContext:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n")
    (tmp_path / "sys" / "block").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    return BackendContext(runner=FakeRunner(), mount_root=tmp_path / "mnt",
                          mountinfo=mountinfo, sysfs_root=tmp_path / "sys",
                          dev_root=tmp_path / "dev", connect_timeout=60.0,
                          disconnect_timeout=10.0)


def add_mount(context: BackendContext, mount_point: str, fstype: str, source: str) -> None:
    escaped = mount_point.replace(" ", "\\040")
    with context.mountinfo.open("a") as stream:
        stream.write(f"99 22 0:99 / {escaped} rw,relatime - {fstype} {source} rw\n")


def drop_mount(context: BackendContext, mount_point: str) -> None:
    lines = context.mountinfo.read_text().splitlines(keepends=True)
    context.mountinfo.write_text("".join(line for line in lines
                                         if f" {mount_point} " not in line))


def mounting_runner(context: BackendContext, fstype: str,
                    umount_rc: int = 0, force_rc: int = 0) -> FakeRunner:
    """A runner whose mount/umount change the fixture mount table."""
    def respond(argv: list[str]) -> object:
        if argv[0] in ("mount", "sshfs"):
            add_mount(context, argv[-1], fstype, argv[-2])
        elif argv[:3] == ["umount", "-f", "-l"]:
            if force_rc:
                return ok(argv, stderr="umount: busy", rc=force_rc)
            drop_mount(context, argv[-1])
        elif argv[0] == "umount":
            if umount_rc:
                return ok(argv, stderr="umount: target is busy", rc=umount_rc)
            drop_mount(context, argv[-1])
        return ok(argv)
    runner = FakeRunner(respond)  # type: ignore[arg-type]
    context.runner = runner
    return runner


# -- URIs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "canonical", "key"), [
    ("nfs://Server.Example.com/export/data", "nfs://server.example.com/export/data",
     "nfs://server.example.com/export/data"),
    ("nfs://10.0.0.1/export/?version=4.1", "nfs://10.0.0.1/export?version=4.1",
     "nfs://10.0.0.1/export?version=4.1"),
    ("nfs://[FE80::1]/e", "nfs://[fe80::1]/e", "nfs://[fe80::1]/e"),
    ("iscsi://10.0.0.1/" + IQN, f"iscsi://10.0.0.1:3260/{IQN}", f"iscsi://10.0.0.1:3260/{IQN}"),
    ("iscsi://portal.example.com:3261/" + IQN + "/7",
     f"iscsi://portal.example.com:3261/{IQN}/7", f"iscsi://portal.example.com:3261/{IQN}"),
    ("glusterfs://vm/gv_1", "glusterfs://vm/gv_1", "glusterfs://vm/gv_1"),
    ("sshfs://root@127.0.0.1:22/srv/x", "sshfs://root@127.0.0.1/srv/x",
     "sshfs://root@127.0.0.1/srv/x"),
    ("sshfs://backup@host:2222/srv/x/", "sshfs://backup@host:2222/srv/x",
     "sshfs://backup@host:2222/srv/x"),
    ("file:///srv/data/", "file:///srv/data", "file:///srv/data"),
    ("loop:///var/tmp/a%2Bb.img", "loop:///var/tmp/a+b.img", "loop:///var/tmp/a+b.img"),
])
def test_uris_parse_to_canonical_form_and_key(context, uri, canonical, key):
    backend = BACKENDS[uris.scheme_of(uri)](context)
    endpoint = backend.parse(uri)
    assert (endpoint.uri, endpoint.key) == (canonical, key)
    assert backend.parse(endpoint.uri) == endpoint  # canonical is a fixed point


def test_two_luns_of_one_target_share_the_key(context):
    backend = IscsiBackend(context)
    lun1 = backend.parse(f"iscsi://10.0.0.1/{IQN}/1")
    lun2 = backend.parse(f"iscsi://10.0.0.1:3260/{IQN}/2")
    assert lun1.key == lun2.key
    assert lun1.uri != lun2.uri


HOSTILE = [
    # hosts that would be options, or not hosts at all
    "nfs://-oremount/export",
    "nfs://server,ro/export",
    "nfs://ser%20ver/export",
    "nfs://server:2049/export",
    "nfs://user@server/export",
    "glusterfs://-server/vol",
    "iscsi://-p/" + IQN,
    "iscsi://10.0.0.1:99999/" + IQN,
    "iscsi://10.0.0.1:0/" + IQN,
    "sshfs://root@-oProxyCommand=touch%20x/tmp",
    "sshfs://-oProxyCommand=x@host/tmp",
    "sshfs://host/tmp",
    # paths, exports, volumes, IQNs with option-like or separator characters
    "nfs://server/export,rw",
    "nfs://server/exp%2Cort",
    "nfs://server/exp%0Aort",
    "nfs://server/exp%09ort",
    "nfs://server/exp ort",
    "nfs://server/exp%00ort",
    "nfs://server/a/../etc",
    "nfs://server/a//b",
    "nfs://server/export#frag",
    "nfs://server",
    "glusterfs://server/-volume",
    "glusterfs://server/vol,ume",
    "glusterfs://server/vol/extra",
    "glusterfs://server/",
    "iscsi://10.0.0.1/-iqn.2024-01.x",
    "iscsi://10.0.0.1/iqn.2024-01.test:a%20b",
    "iscsi://10.0.0.1/iqn.2024-01.test:a,b",
    "iscsi://10.0.0.1/" + IQN + "/-1",
    "iscsi://10.0.0.1/" + IQN + "/99999",
    "iscsi://10.0.0.1/" + IQN + "/1/2",
    "sshfs://root@host/pa,th",
    "sshfs://root@host/rel%0A",
    "loop:///tmp/../etc/shadow",
    "loop://host/tmp/x.img",
    "loop:///tmp/x.img%00",
    "loop:///",
    "file://relative/dir",
    "file:///tmp/a%20b",
    "file:///tmp/x?q=1",
    # NFS mount options
    "nfs://server/export?options=rw,exec=bin",
    "nfs://server/export?options=soft,-o",
    "nfs://server/export?options=nconnect=17",
    "nfs://server/export?options=soft%2Cremount",
    "nfs://server/export?options=vers=3",
    "nfs://server/export?options=soft,,hard",
    "nfs://server/export?options=clientaddr=1.2.3.4",
    "nfs://server/export?version=5",
    "nfs://server/export?version=4&version=3",
    "nfs://server/export?bogus=1",
    "nfs://server/export?options=hard%0A",
    # not a URI
    "/export/data",
    "nfs:/server/export",
    "nfs://" + "a" * 5000,
]


@pytest.mark.parametrize("uri", HOSTILE)
async def test_hostile_uris_are_refused_before_anything_runs(tmp_path, uri):
    runner = FakeRunner()
    config = settings.defaults().replace(state_dir=str(tmp_path / "state"))
    manager = ConnectionManager(config, None, runner=runner, sysfs_root=tmp_path,
                                mountinfo=tmp_path / "none")
    with pytest.raises(errors.InvalidUri) as caught:
        await manager.manage("hostile", uri)
    assert caught.value.to_error()["data"]["part"]
    assert runner.calls == []
    assert manager.monitors == {}
    await manager.close()


@pytest.mark.parametrize("uri", ["ftp://server/x", "nfs4://server/export", "smb://h/s"])
async def test_unknown_schemes_are_unsupported(tmp_path, uri):
    config = settings.defaults().replace(state_dir=str(tmp_path / "state"))
    manager = ConnectionManager(config, None, runner=FakeRunner())
    with pytest.raises(errors.UnsupportedScheme) as caught:
        await manager.manage("x", uri)
    assert caught.value.to_error()["data"]["supported"] == sorted(BACKENDS)
    await manager.close()


def test_the_backend_table_refuses_a_scheme_twice():
    with pytest.raises(ValueError, match="registered twice"):
        by_scheme([NfsBackend, FileBackend, NfsBackend])


def test_backend_table_has_the_fixed_schemes():
    assert sorted(BACKENDS) == ["file", "glusterfs", "iscsi", "loop", "nfs", "sshfs"]


# -- mount point names ----------------------------------------------------------------------------


@pytest.mark.parametrize("location", [
    "server/export/data", "a_/b", "a/_b", "a__b", "a%5Fb/c", "a%25_/%", "x?version=4.1&y=%2C",
    "root@127.0.0.1:2222/tmp/x_y"])
def test_mount_point_names_round_trip(location):
    name = uris.encode_name(location)
    assert "/" not in name
    assert uris.decode_name(name) == location


def test_mount_point_names_never_collide():
    # VDSM's scheme maps both of these to "a___b".
    assert uris.encode_name("a_/b") != uris.encode_name("a/_b")
    locations = ["a_/b", "a/_b", "a__b", "a/b", "a_b", "a%5Fb", "a%2Fb", "a//b"]
    assert len({uris.encode_name(loc) for loc in locations}) == len(locations)


def test_a_target_too_long_for_a_mount_point_name_is_invalid(context):
    with pytest.raises(errors.InvalidUri, match="mount point name"):
        NfsBackend(context).parse("nfs://server/" + "x" * 300)


# -- backoff --------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_within_bounds():
    policy = Backoff(base=2.0, cap=120.0, floor=1.0)
    rng = random.Random(1234)
    for failures in range(12):
        upper = min(120.0, 2.0 * 2 ** failures)
        delays = [policy.delay(failures, rng) for _ in range(300)]
        assert all(max(1.0, 0) <= d <= max(1.0, upper) for d in delays)
        assert policy.ceiling(failures) == max(1.0, upper)
        if upper > 8:
            # Full jitter: spread over the whole range, not clustered at the top.
            assert min(delays) < upper * 0.2
            assert max(delays) > upper * 0.8
            assert len(set(delays)) > 250


def test_backoff_grows_then_caps_and_is_reproducible():
    policy = Backoff(base=2.0, cap=120.0, floor=1.0)
    ceilings = [policy.ceiling(n) for n in range(10)]
    assert ceilings == [2, 4, 8, 16, 32, 64, 120, 120, 120, 120]
    first = [Backoff().delay(n, random.Random(7)) for n in range(10)]
    second = [Backoff().delay(n, random.Random(7)) for n in range(10)]
    assert first == second
    # Means rise with the attempt number until the cap.
    rng = random.Random(99)
    means = [sum(policy.delay(n, rng) for _ in range(2000)) / 2000 for n in range(8)]
    assert all(a < b for a, b in itertools.pairwise(means[:7]))
    assert abs(means[7] - 60) < 5  # uniform(0, 120): mean 60


def test_backoff_floor_and_huge_attempt_numbers():
    policy = Backoff(base=0.1, cap=10.0, floor=1.0)
    rng = random.Random(3)
    assert all(policy.delay(0, rng) == 1.0 for _ in range(50))  # upper 0.1 < floor
    assert 1.0 <= policy.delay(10_000, rng) <= 10.0
    with pytest.raises(ValueError):
        Backoff(base=1, cap=1, floor=2)


# -- states ---------------------------------------------------------------------------------------


def _verdicts(policy: MonitorPolicy, outcomes: str, state: State = State.CONNECTING) -> list[str]:
    health = Health(state=state)
    states = []
    for outcome in outcomes:
        good = outcome == "+"
        if good:
            health.successes, health.failures = health.successes + 1, 0
        else:
            health.failures, health.successes = health.failures + 1, 0
        health.state = next_state(health.state, good, health, policy, broken=outcome == "!")
        states.append(health.state.value[:4])
    return states


def test_state_transitions_with_flap_damping():
    policy = MonitorPolicy(failures_to_disconnect=3, successes_to_recover=2)
    assert _verdicts(policy, "+-+") == ["conn", "degr", "degr"]
    assert _verdicts(policy, "+--+-++") == ["conn", "degr", "degr", "degr", "degr", "degr",
                                            "conn"]
    assert _verdicts(policy, "+---") == ["conn", "degr", "degr", "disc"]
    assert _verdicts(policy, "+---+-++") == ["conn", "degr", "degr", "disc", "degr", "degr",
                                             "degr", "conn"]
    # A broken attachment is disconnected at once; so is a failed first connect.
    assert _verdicts(policy, "+!") == ["conn", "disc"]
    assert _verdicts(policy, "-") == ["disc"]
    assert _verdicts(MonitorPolicy(successes_to_recover=1), "-+") == ["disc", "conn"]


def test_timestamps_are_rfc3339_utc():
    assert rfc3339(0.0, 3) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1700000000.1234, 3) == "2023-11-14T22:13:20.123Z"
    assert rfc3339(None, 3) is None


# -- probe pool -----------------------------------------------------------------------------------


def test_probe_pool_keeps_working_around_a_hung_probe():
    pool = ProbePool(max_workers=4)
    release = threading.Event()
    hung = pool.submit(lambda: release.wait(10))
    results = [pool.submit(lambda n=n: n * 2) for n in range(20)]
    assert [future.result(timeout=5) for future in results] == [n * 2 for n in range(20)]
    assert not hung.done()
    assert pool.busy >= 1
    assert pool.threads <= 4
    release.set()
    assert hung.result(timeout=5) is True
    pool.close()


# -- mount table ----------------------------------------------------------------------------------


# -- NFS: the exact command lines -----------------------------------------------------------------


@pytest.mark.parametrize(("query", "options"), [
    ("", "soft,nosharecache,timeo=100,retrans=3,nolock"),
    ("?version=3", "soft,nosharecache,timeo=100,retrans=3,vers=3,nolock"),
    ("?version=3&options=lock", "soft,nosharecache,timeo=100,retrans=3,lock,vers=3"),
    ("?version=4.1", "soft,nosharecache,timeo=100,retrans=3,vers=4.1"),
    ("?version=4.2&options=hard,nconnect=4",
     "nosharecache,timeo=100,retrans=3,hard,nconnect=4,vers=4.2"),
    ("?options=timeo=600,retrans=2,sec=krb5p&version=4",
     "soft,nosharecache,timeo=600,retrans=2,sec=krb5p,vers=4"),
])
async def test_nfs_mount_command(context, query, options):
    runner = mounting_runner(context, "nfs4")
    backend = NfsBackend(context)
    endpoint = backend.parse(f"nfs://nfs1.example.com/exports/data{query}")
    attachment = await backend.connect(endpoint)
    mount_point = backend.mount_point(endpoint)
    assert mount_point.startswith(str(context.mount_root / "nfs") + "/nfs1.example.com_exports")
    assert runner.calls == [(["mount", "-t", "nfs", "-o", options,
                              "nfs1.example.com:/exports/data", mount_point], 60.0)]
    assert attachment.identity == mount_point
    assert not attachment.adopted


async def test_nfs_adopts_an_existing_mount_and_unmounts(context):
    runner = mounting_runner(context, "nfs4")
    backend = NfsBackend(context)
    endpoint = backend.parse("nfs://server/export")
    mount_point = backend.mount_point(endpoint)
    add_mount(context, mount_point, "nfs4", "server:/export")
    assert (await backend.connect(endpoint)).adopted
    assert runner.calls == []
    await backend.disconnect(endpoint, None)
    assert runner.calls == [(["umount", mount_point], 10.0)]


async def test_nfs_umount_falls_back_to_force_lazy(context):
    runner = mounting_runner(context, "nfs", umount_rc=32)
    backend = NfsBackend(context)
    endpoint = backend.parse("nfs://server/export")
    await backend.connect(endpoint)
    mount_point = backend.mount_point(endpoint)
    await backend.disconnect(endpoint, None)
    assert runner.argvs[1:] == [["umount", mount_point], ["umount", "-f", "-l", mount_point]]
    assert not Path(mount_point).exists()


async def test_nfs_umount_timeout_then_force_lazy(context):
    def respond(argv: list[str]) -> object:
        if argv == ["umount", mount_point]:
            return CommandTimeout(argv, "timed out after 10s")
        if argv[0] == "umount":
            drop_mount(context, argv[-1])
        return ok(argv)
    backend = NfsBackend(context)
    endpoint = backend.parse("nfs://server/export")
    mount_point = backend.mount_point(endpoint)
    add_mount(context, mount_point, "nfs", "server:/export")
    context.runner = runner = FakeRunner(respond)  # type: ignore[arg-type]
    await backend.disconnect(endpoint, None)
    assert runner.argvs == [["umount", mount_point], ["umount", "-f", "-l", mount_point]]


async def test_nfs_failed_unmount_is_an_error_with_a_code(context):
    mounting_runner(context, "nfs", umount_rc=32, force_rc=16)
    backend = NfsBackend(context)
    endpoint = backend.parse("nfs://server/export")
    await backend.connect(endpoint)
    with pytest.raises(BackendError) as caught:
        await backend.disconnect(endpoint, None)
    assert caught.value.code == "UmountFailed"


async def test_nfs_mount_timeout_cleans_up(context):
    def respond(argv: list[str]) -> object:
        return CommandTimeout(argv, "timed out after 60s")
    context.runner = FakeRunner(respond)  # type: ignore[arg-type]
    backend = NfsBackend(context)
    endpoint = backend.parse("nfs://server/export")
    with pytest.raises(BackendError) as caught:
        await backend.connect(endpoint)
    assert caught.value.code == "ETIMEDOUT"
    assert not Path(backend.mount_point(endpoint)).exists()


async def test_nfs_stale_mount_is_repaired_by_lazy_unmount_and_mount(context):
    runner = mounting_runner(context, "nfs")
    backend = NfsBackend(context)
    endpoint = backend.parse("nfs://server/export")
    attachment = await backend.connect(endpoint)
    stale = ProbeResult.failure("ESTALE", "Stale file handle", broken=True)
    await backend.repair(endpoint, attachment, stale)
    mount_point = backend.mount_point(endpoint)
    assert [argv[0:3] for argv in runner.argvs] == [
        ["mount", "-t", "nfs"], ["umount", "-f", "-l"], ["mount", "-t", "nfs"]]
    # Not broken (server down): no remount.
    await backend.repair(endpoint, attachment, ProbeResult.failure("EIO", "I/O error"))
    assert len(runner.calls) == 3
    assert backend.mount_point(endpoint) == mount_point


def test_nfs_discovery_maps_foreign_mounts_and_leftovers(context):
    backend = NfsBackend(context)
    leftover = backend.parse("nfs://server/my_export?version=4.1")
    add_mount(context, backend.mount_point(leftover), "nfs4", "server:/my_export")
    add_mount(context, "/mnt/foreign", "nfs", "other:/srv/nfs")
    found = {item.identity: item.uri for item in backend.discover()}
    assert found == {backend.mount_point(leftover): leftover.uri,
                     "/mnt/foreign": "nfs://other/srv/nfs"}


# -- GlusterFS and sshfs command lines ------------------------------------------------------------


async def test_glusterfs_mount_command(context):
    runner = mounting_runner(context, "fuse.glusterfs")
    backend = GlusterfsBackend(context)
    endpoint = backend.parse("glusterfs://vm/gv0")
    await backend.connect(endpoint)
    assert runner.argvs == [["mount", "-t", "glusterfs", "vm:/gv0",
                             str(context.mount_root / "glusterfs" / "vm_gv0")]]


async def test_sshfs_mount_command(context):
    context.sshfs_identity_file = "/etc/vdsm-agent/id_ed25519"
    context.sshfs_host_key_checking = "accept-new"
    context.sshfs_known_hosts_file = "/var/lib/vdsm-agent/known_hosts"
    runner = mounting_runner(context, "fuse.sshfs")
    backend = SshfsBackend(context)
    endpoint = backend.parse("sshfs://backup@storage.example.com:2222/srv/images")
    await backend.connect(endpoint)
    assert runner.argvs == [[
        "sshfs", "-o", "reconnect,ServerAliveInterval=5,ServerAliveCountMax=3,"
        "ConnectTimeout=10,BatchMode=yes,IdentityFile=/etc/vdsm-agent/id_ed25519,"
        "StrictHostKeyChecking=accept-new,UserKnownHostsFile=/var/lib/vdsm-agent/known_hosts",
        "-p", "2222", "backup@storage.example.com:/srv/images",
        str(context.mount_root / "sshfs" / "backup@storage.example.com:2222_srv_images")]]


@pytest.mark.parametrize("identity", ["/keys/a,b", "relative/key", "/keys/a b"])
async def test_sshfs_settings_that_would_inject_options_are_refused(context, identity):
    context.sshfs_identity_file = identity
    runner = mounting_runner(context, "fuse.sshfs")
    backend = SshfsBackend(context)
    with pytest.raises(BackendError) as caught:
        await backend.connect(backend.parse("sshfs://root@host/srv"))
    assert caught.value.code == "ConfigInvalid"
    assert runner.calls == []


def test_fuse_probe_reports_a_dead_daemon_as_broken(context, tmp_path):
    backend = SshfsBackend(context)
    endpoint = backend.parse("sshfs://root@host/srv")
    mount_point = backend.mount_point(endpoint)
    add_mount(context, mount_point, "fuse.sshfs", "root@host:/srv")
    context.proc_root = tmp_path / "proc"
    (context.proc_root / "4242").mkdir(parents=True)
    cmdline = context.proc_root / "4242" / "cmdline"
    cmdline.write_bytes(b"sshfs\0-o\0x\0root@host:/srv\0" + mount_point.encode() + b"\0")
    enotconn = ProbeResult.failure("ENOTCONN", "statvfs: Transport endpoint is not connected")
    assert not backend._is_broken(enotconn, mount_point)  # daemon alive: client reconnects
    cmdline.write_bytes(b"")  # a zombie has an empty command line
    assert backend._is_broken(enotconn, mount_point)
    assert not backend._is_broken(ProbeResult.failure("EIO", "x"), mount_point)


# -- loop -----------------------------------------------------------------------------------------
# The loop backend runs no command: it binds a loop device to the image's descriptor
# by ioctl (system/loopdev.py, tested on its own in test_loopdev.py). These run it on
# real loop devices (root) with real sysfs; the refusals need neither.


@pytest.fixture
def loop_context(tmp_path: Path) -> BackendContext:
    """A context for real loop devices: /sys, /dev, ``images`` as the allowed root."""
    (tmp_path / "images").mkdir()
    return BackendContext(runner=FakeRunner(), mount_root=tmp_path / "mnt",
                          allowed_roots=(str(tmp_path / "images"),), disconnect_timeout=10.0)


def loop_image(context: BackendContext, name: str = "disk.img",
               janitor: LoopJanitor | None = None) -> Path:
    path = Path(context.allowed_roots[0]) / name
    with open(path, "xb") as stream:
        stream.truncate(1024 * 1024)
    if janitor is not None:
        janitor.track(path)
    return path


@pytest.mark.root
async def test_loop_binds_the_image_by_descriptor_and_adopts_by_identity(loop_context,
                                                                         loop_janitor):
    image = loop_image(loop_context, janitor=loop_janitor)
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{image}")
    backend.authorize(endpoint)
    attachment = await backend.connect(endpoint)
    identity = backing_of(image)
    assert not attachment.adopted
    assert attachment.info["backing"] == identity.identity
    assert devices_bound_to(identity) == {loopdev.number_of(attachment.device or ""): identity}
    assert backend.describe(endpoint, attachment) == {
        "image": str(image), "device": attachment.device, "imageIdentity": identity.identity}
    assert backend.probe(endpoint, attachment).ok
    # Renamed: the name means nothing, the file is the same one; a restart adopts it.
    os.rename(image, image.with_name("moved.img"))
    os.rename(image.with_name("moved.img"), image)
    again = await LoopBackend(loop_context).connect(endpoint)
    assert again.adopted
    assert again.device == attachment.device
    await backend.disconnect(endpoint, attachment)
    assert devices_bound_to(identity) == {}
    await backend.disconnect(endpoint, attachment)  # detached already: success
    assert loop_context.runner.calls == []  # type: ignore[attr-defined]


@pytest.mark.root
async def test_loop_does_not_adopt_a_device_on_a_slice_of_the_image(loop_context, loop_janitor):
    image = loop_image(loop_context, janitor=loop_janitor)
    sliced = subprocess.run(["losetup", "-f", "--show", "--offset", "4096", str(image)],
                            check=True, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{image}")
    attachment = await backend.connect(endpoint)
    assert not attachment.adopted
    assert attachment.device != sliced
    await backend.disconnect(endpoint, attachment)
    assert set(devices_bound_to(backing_of(image))) == {loopdev.number_of(sliced)}


@pytest.mark.root
async def test_loop_probe_and_disconnect_follow_the_file_not_the_number(loop_context,
                                                                        loop_janitor):
    image = loop_image(loop_context, janitor=loop_janitor)
    other = loop_image(loop_context, "other.img", janitor=loop_janitor)
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{image}")
    attachment = await backend.connect(endpoint)
    number = loopdev.number_of(attachment.device or "")
    assert number is not None
    assert loopdev.detach(number, backing_of(image), wait=2)  # behind the backend's back
    failure = backend.probe(endpoint, attachment)
    assert (failure.code, failure.broken) == ("Detached", True)
    # A number that now serves another file (detached behind our back, then reused):
    # neither probed as ours nor detached.
    other_device = subprocess.run(["losetup", "-f", "--show", str(other)], check=True,
                                  capture_output=True, text=True, timeout=30).stdout.strip()
    reused = Attachment(identity=other_device, device=other_device, info=attachment.info)
    failure = backend.probe(endpoint, reused)
    assert (failure.code, failure.broken) == ("Detached", True)
    assert "another file" in failure.message
    await backend.disconnect(endpoint, reused)
    other_number = loopdev.number_of(other_device)
    assert devices_bound_to(backing_of(other)) == {other_number: backing_of(other)}
    # Repair binds the image again; a deleted image is reported, not repaired.
    repaired = await backend.repair(endpoint, attachment, failure)
    assert devices_bound_to(backing_of(image))
    image.unlink()
    failure = backend.probe(endpoint, repaired)
    assert (failure.code, failure.broken) == ("ENOENT", False)
    await backend.disconnect(endpoint, repaired)
    assert loop_janitor.bound().keys() == {other_number}


@pytest.mark.root
async def test_loop_repair_after_the_image_was_replaced_detaches_the_old_device(
        loop_context, loop_janitor):
    image = loop_image(loop_context, janitor=loop_janitor)
    old = backing_of(image)
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{image}")
    attachment = await backend.connect(endpoint)
    image.unlink()
    loop_image(loop_context, janitor=loop_janitor)  # a new file by the same name
    failure = backend.probe(endpoint, attachment)
    assert failure.code == "ENOENT"
    repaired = await backend.repair(endpoint, attachment, failure)
    assert repaired.info["backing"] == backing_of(image).identity
    assert devices_bound_to(old) == {}  # not left behind, serving a deleted file
    await backend.disconnect(endpoint, repaired)
    assert loop_janitor.bound() == {}


@pytest.mark.root
async def test_loop_disconnect_of_a_device_held_open_fails_and_leaves_it_bound(loop_context,
                                                                             loop_janitor):
    image = loop_image(loop_context, janitor=loop_janitor)
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{image}")
    attachment = await backend.connect(endpoint)
    holder = os.open(str(attachment.device), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(BackendError) as caught:
            await backend.disconnect(endpoint, attachment)
    finally:
        os.close(holder)
    assert caught.value.code == "DeviceBusy"
    assert devices_bound_to(backing_of(image))  # still bound after the holder's close
    assert backend.probe(endpoint, attachment).ok
    await backend.disconnect(endpoint, attachment)
    assert devices_bound_to(backing_of(image)) == {}


@pytest.mark.root
async def test_a_cancelled_loop_connect_leaves_nothing_bound(loop_context, loop_janitor,
                                                             monkeypatch):
    image = loop_image(loop_context, janitor=loop_janitor)
    binding = threading.Event()
    real_attach = loopdev.attach

    def slow_attach(fd: int, **kwargs: object) -> int:
        binding.set()
        time.sleep(0.2)  # the thread is inside the bind when the connect is cancelled
        return real_attach(fd, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loopdev, "attach", slow_attach)
    backend = LoopBackend(loop_context)
    connect = asyncio.create_task(backend.connect(backend.parse(f"loop://{image}")))
    while not binding.is_set():
        await asyncio.sleep(0.005)
    connect.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connect
    assert devices_bound_to(backing_of(image)) == {}


async def test_loop_image_swapped_after_the_check_is_refused_at_connect(loop_context):
    image = loop_image(loop_context)
    outside = image.parent.parent / "outside.img"
    outside.write_bytes(b"x")
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{image}")
    backend.authorize(endpoint)  # a regular file in the root: accepted
    (image.parent / "link").symlink_to(outside)
    os.rename(image.parent / "link", image)
    with pytest.raises(BackendError) as caught:
        await backend.connect(endpoint)  # resolved again, refused before any ioctl
    assert caught.value.code == "PathNotAllowed"
    assert "symbolic link" in caught.value.message
    assert devices_bound_to(backing_of(outside)) == {}


async def test_loop_missing_image_is_enoent_and_accepted_at_manage(loop_context):
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{loop_context.allowed_roots[0]}/later.img")
    backend.authorize(endpoint)  # may appear later: connect retries until it does
    with pytest.raises(BackendError) as caught:
        await backend.connect(endpoint)
    assert caught.value.code == "ENOENT"


async def test_loop_image_that_is_not_a_regular_file_is_refused(loop_context):
    directory = Path(loop_context.allowed_roots[0]) / "dir.img"
    directory.mkdir()
    backend = LoopBackend(loop_context)
    endpoint = backend.parse(f"loop://{directory}")
    with pytest.raises(errors.InvalidParams):
        backend.authorize(endpoint)
    with pytest.raises(BackendError) as caught:
        await backend.connect(endpoint)
    assert caught.value.code == "InvalidImage"


# -- iSCSI ----------------------------------------------------------------------------------------


def make_session(sysfs: Path, number: int, iqn: str, address: str = "10.0.0.1",
                 port: int = 3260, state: str = "LOGGED_IN",
                 luns: dict[int, str] | None = None) -> None:
    session = sysfs / "class" / "iscsi_session" / f"session{number}"
    session.mkdir(parents=True)
    (session / "targetname").write_text(iqn + "\n")
    (session / "state").write_text(state + "\n")
    connection = sysfs / "class" / "iscsi_connection" / f"connection{number}:0"
    connection.mkdir(parents=True)
    (connection / "persistent_address").write_text(address + "\n")
    (connection / "persistent_port").write_text(f"{port}\n")
    for lun, device in (luns or {}).items():
        (session / "device" / "target2:0:0" / f"2:0:0:{lun}" / "block" / device).mkdir(
            parents=True)


def iscsi_runner(context: BackendContext, login_rc: int = 0, offered: str = IQN,
                 logout_rc: int = 0) -> FakeRunner:
    def respond(argv: list[str]) -> object:
        if "discovery" in argv:
            return ok(argv, stdout=f"10.0.0.1:3260,1 {offered}\n10.0.0.1:3260,1 iqn.2024-01.x:y\n")
        if "--login" in argv:
            if login_rc in (0, 15):
                make_session(context.sysfs_root, 1, IQN, luns={1: "sdb"})
            return ok(argv, rc=login_rc, stderr="iscsiadm: login failed" if login_rc else "")
        if "--logout" in argv:
            return ok(argv, rc=logout_rc, stderr="iscsiadm: No matching sessions found")
        return ok(argv)
    runner = FakeRunner(respond)  # type: ignore[arg-type]
    context.runner = runner
    return runner


@pytest.mark.parametrize("login_rc", [0, 15])
async def test_iscsi_discovery_and_login_commands(context, login_rc):
    runner = iscsi_runner(context, login_rc=login_rc)
    backend = IscsiBackend(context)
    endpoint = backend.parse(f"iscsi://10.0.0.1/{IQN}/1")
    attachment = await backend.connect(endpoint)
    assert runner.calls == [
        (["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", "10.0.0.1:3260"], 60.0),
        (["iscsiadm", "-m", "node", "-T", IQN, "-p", "10.0.0.1:3260", "--login"], 60.0)]
    assert attachment.identity == "session1"
    assert backend.describe(endpoint, attachment)["device"] == "/dev/sdb"


async def test_iscsi_login_failure_is_named_after_the_exit_code(context):
    iscsi_runner(context, login_rc=24)
    backend = IscsiBackend(context)
    with pytest.raises(BackendError) as caught:
        await backend.connect(backend.parse(f"iscsi://10.0.0.1/{IQN}"))
    assert caught.value.code == "ISCSI_ERR_LOGIN_AUTH_FAILED"


async def test_iscsi_target_not_offered_means_no_login(context):
    runner = iscsi_runner(context, offered="iqn.2024-01.other:disk")
    backend = IscsiBackend(context)
    with pytest.raises(BackendError) as caught:
        await backend.connect(backend.parse(f"iscsi://10.0.0.1/{IQN}"))
    assert caught.value.code == "TargetNotFound"
    assert not any("--login" in argv for argv in runner.argvs)


@pytest.mark.parametrize(("rc", "error"), [(0, None), (21, None), (2, "ISCSI_ERR_SESS_NOT_FOUND")])
async def test_iscsi_logout(context, rc, error):
    runner = iscsi_runner(context, logout_rc=rc)
    backend = IscsiBackend(context)
    endpoint = backend.parse(f"iscsi://10.0.0.1/{IQN}/1")
    if error is None:
        await backend.disconnect(endpoint, None)
    else:
        with pytest.raises(BackendError) as caught:
            await backend.disconnect(endpoint, None)
        assert caught.value.code == error
    assert runner.calls == [(["iscsiadm", "-m", "node", "-T", IQN, "-p", "10.0.0.1:3260",
                              "--logout"], 10.0)]


async def test_iscsi_adopts_an_existing_session(context):
    make_session(context.sysfs_root, 4, IQN, luns={0: "sdc", 1: "sdd"})
    runner = iscsi_runner(context)
    backend = IscsiBackend(context)
    attachment = await backend.connect(backend.parse(f"iscsi://10.0.0.1/{IQN}/1"))
    assert attachment.adopted
    assert attachment.identity == "session4"
    assert runner.calls == []


def test_iscsi_probe_reads_the_lun_and_watches_the_session(context):
    make_session(context.sysfs_root, 1, IQN, luns={1: "sdb"})
    (context.dev_root / "sdb").write_bytes(b"\0" * 8192)
    backend = IscsiBackend(context)
    endpoint = backend.parse(f"iscsi://10.0.0.1/{IQN}/1")
    attachment = Attachment(identity="session1")
    result = backend.probe(endpoint, attachment)
    assert result.ok, result
    (context.sysfs_root / "class" / "iscsi_session" / "session1" / "state").write_text("FAILED\n")
    result = backend.probe(endpoint, attachment)
    assert (result.ok, result.code, result.broken) == (False, "SessionFailed", False)
    result = backend.probe(endpoint, Attachment(identity="session9"))
    assert (result.code, result.broken) == ("SessionGone", True)
    no_lun = backend.parse(f"iscsi://10.0.0.1/{IQN}/5")
    (context.sysfs_root / "class" / "iscsi_session" / "session1" / "state").write_text("LOGGED_IN")
    assert backend.probe(no_lun, attachment).code == "NoDevice"


def test_iscsi_discovery_lists_sessions(context):
    make_session(context.sysfs_root, 2, IQN, address="fe80::2", port=3261)
    found = IscsiBackend(context).discover()
    assert [(item.identity, item.uri) for item in found] == [
        ("session2", f"iscsi://[fe80::2]:3261/{IQN}")]


# -- file -----------------------------------------------------------------------------------------


def test_file_probe_reads_a_file_and_reports_a_missing_directory(context, tmp_path):
    backend = FileBackend(context)
    directory = tmp_path / "data"
    directory.mkdir()
    endpoint = backend.parse(f"file://{directory}")
    attachment = Attachment(identity=str(directory))
    assert backend.probe(endpoint, attachment).info["probeRead"] == "statvfs"
    (directory / "image.raw").write_bytes(b"x" * 4096)
    backend._files.forget(str(directory))
    assert backend.probe(endpoint, attachment).info["probeRead"] in ("direct", "buffered")
    missing = backend.parse(f"file://{tmp_path}/missing")
    result = backend.probe(missing, attachment)
    assert (result.ok, result.broken) == (False, True)


def test_probe_latency_is_small_for_a_local_directory(context, tmp_path):
    backend = FileBackend(context)
    endpoint = backend.parse(f"file://{tmp_path}")
    started = time.monotonic()
    for _ in range(100):
        assert backend.probe(endpoint, Attachment(identity=str(tmp_path))).ok
    assert (time.monotonic() - started) / 100 < 0.01
