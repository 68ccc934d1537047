"""Errors that say what to do (issue 16, point 4): each message as a person sees it,
from a real agent process through vdsm-agent-client or curl-like HTTP.

* a schema pattern or format in words with an example (rpc_schema/words.py), for
  the verbs' params and the task kinds' alike, and every pattern has words;
* PathNotAllowed names the setting, the flag and the roots configured; a device
  path that is no block device (/dev/null) says so, for every kind and loop://;
* a missing file:// directory is ENOENT; a mount failure keeps the tool's own
  first error line; a scheme this host cannot serve is UnsupportedScheme with
  the reason, and getCapabilities lists only what is served;
* GET / answers a page saying how to call the agent, GET /jsonrpc a 405 hint;
* scripts/agent works for image tasks without flags (a default allowed root).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rpc_schema
from rpc_schema import words
from tests.support import AgentProcess, RpcFailure, agent_factory, free_port, until
from tests.tasks_support import kill_task_processes
from vdsm_agent import settings
from vdsm_agent.connections.backends.base import SystemRunner
from vdsm_agent.connections.backends.needs import HostSupport, Needs
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.system import commands
from vdsm_agent.tasks.kinds import KINDS

ROOT = Path(__file__).resolve().parent.parent
CLIENT = str(Path(sys.executable).parent / "vdsm-agent-client")
UUID_EXAMPLE = "0b6f3c1e-6a3c-4f5e-9d61-1f1c2a3b4c5d"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("messages")


@pytest.fixture(scope="module")
def agents(workdir: Path) -> Iterator[dict[str, AgentProcess]]:
    """Two real agents: one with an allowed root (and fast probes), one with none."""
    images = workdir / "images"
    images.mkdir()
    (images / "src.img").write_bytes(b"\0" * 1024 * 1024)
    with agent_factory(workdir) as start:
        rooted = start(allowed_root=str(images), enable_test_kinds="true",
                       probe_interval="0.3", backoff_base="0.2", backoff_floor="0.2",
                       backoff_cap="1")
        bare = start()
        try:
            yield {"rooted": rooted, "bare": bare}
        finally:
            kill_task_processes(rooted.state_dir)


def said(agent: AgentProcess, *words_: str) -> str:
    """What vdsm-agent-client prints for a call that fails (its error line)."""
    done = subprocess.run([CLIENT, "--unix-socket", str(agent.socket_path), *words_],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0, done.stdout
    return done.stdout + done.stderr


def refused(agent: AgentProcess, method: str, **params: Any) -> RpcFailure:
    try:
        agent.call(method, **params)
    except RpcFailure as failure:
        return failure
    raise AssertionError(f"{method} was not refused")


# -- schema violations in words --------------------------------------------------------


def test_every_pattern_and_format_has_words():
    """A schema that gains a pattern without words fails here (it would answer
    "must match pattern ^..." to a person)."""
    schemas = [rpc_schema.load("agent").document, rpc_schema.load("engine").document,
               *(kind.params_schema for kind in KINDS.values())]
    missing = {(rule, value) for schema in schemas for rule, value in words.rules_in(schema)
               if words.explain(rule, value) is None}
    assert missing == set()


def test_a_relative_path_says_it_must_be_absolute(agents):
    line = said(agents["rooted"], "startTask", "kind=checksum", "params.path=images/a.img")
    assert "params.params.path must be an absolute path (starting with /), " \
           "e.g. /srv/images/disk1.img" in line, line
    assert "pattern" not in line
    failure = refused(agents["rooted"], "startTask", kind="copy",
                      params={"source": "a.img", "destination": "/x/b.img"})
    assert failure.data["rule"] == "pattern"
    assert failure.data["detail"].startswith("params.params.source must be an absolute path")


@pytest.mark.parametrize(("argv", "expected"), [
    (["getTask", "taskID=xyz"],
     f"params.taskID must be a UUID (8-4-4-4-12 hexadecimal digits), e.g. {UUID_EXAMPLE}"),
    (["manageStorageConnection", "uri=file:///srv", "connectionID=a/b"],
     "params.connectionID must not contain '/'"),
    (["startTask", "kind=test.sleep", "params:={}", "deadline=tomorrow"],
     "params.deadline must be an RFC 3339 date and time, e.g. 2025-03-01T12:00:00Z"),
    (["getDeviceList", "paths=/etc/passwd"],
     "params.paths[0] must be a device path under /dev, e.g. /dev/loop1"),
    (["startTask", "kind=Checksum", "params:={}"],
     "params.kind must be a task kind's name (a lower-case letter, then"),
])
def test_ids_and_forms_say_what_is_expected(agents, argv, expected):
    line = said(agents["rooted"], *argv)
    assert expected in line, line
    assert "must match pattern" not in line


# -- paths ----------------------------------------------------------------------------------


def test_path_not_allowed_names_the_setting_the_flag_and_the_roots(agents, workdir):
    images = str(workdir / "images")
    line = said(agents["rooted"], "startTask", "kind=checksum", "params.path=/srv/disk.img")
    assert "PathNotAllowed" in line
    assert "/srv/disk.img is not beneath an allowed root" in line
    assert f"allowed roots: {images}" in line
    assert "--allowed-root DIR or setting allowed_roots" in line
    failure = refused(agents["rooted"], "startTask", kind="checksum",
                      params={"path": "/srv/disk.img"})
    assert failure.data["allowedRoots"] == [images]
    assert failure.data["setting"] == "allowed_roots"
    # No root at all: it says so, and how to add one.
    line = said(agents["bare"], "startTask", "kind=checksum", "params.path=/srv/disk.img")
    assert "no allowed root is set; add one with --allowed-root DIR or setting " \
           "allowed_roots" in line, line
    # The root itself is a directory: a file beneath it is wanted.
    line = said(agents["rooted"], "startTask", "kind=checksum", f"params.path={images}")
    assert f"{images} is the allowed root {images} itself; give a file beneath it" in line


@pytest.mark.parametrize(("kind", "params"), [
    ("checksum", {"path": "/dev/null"}),
    ("copy", {"source": "/dev/null", "destination": "/dev/loop-none"}),
    ("copy", {"source": "IMAGES/src.img", "destination": "/dev/null"}),
    ("wipe", {"device": "/dev/null"}),
    ("format", {"device": "/dev/null", "fstype": "ext4"}),
    ("fsck", {"device": "/dev/null"}),
])
def test_dev_null_is_not_a_block_device_for_every_kind(agents, workdir, kind, params):
    params = {key: value.replace("IMAGES", str(workdir / "images"))
              for key, value in params.items()}
    failure = refused(agents["rooted"], "startTask", kind=kind, params=params)
    assert failure.name == "PathNotAllowed"
    assert failure.data["rule"] == "blockDevice"
    assert "is not a block device (it is a character device)" in failure.data["detail"]
    assert "allowed root" not in failure.error["message"] + failure.data["detail"]
    line = said(agents["rooted"], "startTask", f"kind={kind}", f"params:={json.dumps(params)}")
    assert "The path may not be used (/dev/" in line, line


def test_loop_of_dev_null_wants_an_image_file(agents, workdir):
    line = said(agents["rooted"], "manageStorageConnection", "uri=loop:///dev/null",
                "connectionID=l1")
    assert "/dev/null is a device; uri takes an image file beneath an allowed root" in line
    assert f"allowed roots: {workdir / 'images'}" in line


def test_capabilities_show_the_allowed_roots(agents, workdir):
    assert agents["rooted"].call("getCapabilities")["allowedRoots"] == [
        str(workdir / "images")]
    assert agents["bare"].call("getCapabilities")["allowedRoots"] == []


# -- connections -----------------------------------------------------------------------------


def test_a_missing_file_directory_is_enoent_a_file_is_enotdir(agents, workdir):
    agent = agents["rooted"]
    missing = workdir / "later"
    agent.call("manageStorageConnection", uri=f"file://{missing}", connectionID="later")
    plain = workdir / "plain-file"
    plain.write_text("not a directory")
    agent.call("manageStorageConnection", uri=f"file://{plain}", connectionID="plain")

    def errors_of() -> dict[str, Any] | None:
        found = {cid: agent.call("getStorageConnection", connectionID=cid)["lastError"]
                 for cid in ("later", "plain")}
        return found if all(found.values()) else None
    found = until(errors_of, timeout=15, what="both connections failed")
    assert (found["later"]["code"], found["later"]["message"]) == (
        "ENOENT", f"{missing} does not exist")
    assert (found["plain"]["code"], found["plain"]["message"]) == (
        "ENOTDIR", f"{plain} is not a directory")
    for cid in ("later", "plain"):
        agent.call("unmanageStorageConnection", connectionID=cid)


def test_capabilities_list_only_served_schemes_and_others_are_refused_with_the_reason(agents):
    agent = agents["rooted"]
    capabilities = agent.call("getCapabilities")
    served, unserved = capabilities["uriSchemes"], capabilities["unservedSchemes"]
    assert "file" in served
    assert not set(served) & set(unserved)
    has_nfs = shutil.which("mount.nfs", path="/usr/sbin:/sbin:/usr/bin:/bin") is not None
    if not has_nfs:
        assert unserved["nfs"].startswith("mount.nfs not found")
    if shutil.which("iscsiadm", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        assert unserved["iscsi"].startswith("iscsiadm not found")
    examples = {"nfs": "nfs://filer.example.com/export",
                "iscsi": "iscsi://10.0.0.1/iqn.2024-01.com.example:disk",
                "glusterfs": "glusterfs://gluster1.example.com/data",
                "sshfs": "sshfs://alice@host.example.com/srv"}
    for scheme, reason in unserved.items():
        failure = refused(agent, "manageStorageConnection", uri=examples[scheme],
                          connectionID=f"un-{scheme}")
        assert (failure.name, failure.data["reason"]) == ("UnsupportedScheme", reason)
        assert failure.data["supported"] == served
        line = said(agent, "manageStorageConnection", f"uri={examples[scheme]}",
                    f"connectionID=un-{scheme}")
        assert f"{scheme}:// is not served on this host: {reason}" in line, line


def test_host_support_reads_tools_and_the_kernel(tmp_path):
    """What makes a scheme served: programs in the search path, filesystems listed by
    the kernel or a module it can load (a fake host root)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("mount.nfs", "modprobe"):
        path = bin_dir / program
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    filesystems = tmp_path / "filesystems"
    filesystems.write_text("nodev\tsysfs\n\text4\nnodev\tfuse\n")
    modprobe = tmp_path / "modprobe-setting"
    modprobe.write_text(str(bin_dir / "modprobe"))
    modules = tmp_path / "modules"
    support = HostSupport(search_path=str(bin_dir), proc_filesystems=filesystems,
                          modules_root=modules, modprobe_setting=modprobe)
    nfs = Needs(programs=("mount.nfs",), filesystems=("nfs",))
    assert support.unmet(nfs) == (f"the kernel has no nfs filesystem (not in {filesystems} "
                                  "and no nfs module to load)")
    assert support.unmet(Needs(programs=("iscsiadm",))) == (
        "iscsiadm not found (install the package that provides it)")
    assert support.unmet(Needs(filesystems=("fuse",))) is None
    # A module the kernel can load counts (the answers are cached: a fresh support).
    module_dir = modules / os.uname().release / "kernel" / "fs" / "nfs"
    module_dir.mkdir(parents=True)
    (module_dir / "nfs.ko.xz").write_bytes(b"")
    support = HostSupport(search_path=str(bin_dir), proc_filesystems=filesystems,
                          modules_root=modules, modprobe_setting=modprobe)
    assert support.unmet(nfs) is None


class ServingRunner(SystemRunner):
    """The real runner, claiming every scheme is served: the real mount(8) fails."""

    def unmet(self, needs: Needs) -> str | None:
        return None


@pytest.mark.root
async def test_a_mount_failure_keeps_the_tools_first_error_line(tmp_path):
    config = settings.defaults().replace(state_dir=str(tmp_path / "state"), probe_interval=0.3,
                                         backoff_base=0.2, backoff_floor=0.2, backoff_cap=1.0)
    manager = ConnectionManager(config, None, runner=ServingRunner())
    await manager.start()
    try:
        await manager.manage("n1", "nfs://127.0.0.1/export")
        deadline = time.monotonic() + 30
        while (error := manager.status("n1")["lastError"]) is None:
            assert time.monotonic() < deadline, "no connect attempt"
            await asyncio.sleep(0.1)
    finally:
        await manager.close()
    message = error["message"]
    assert message.startswith("mount exited with 32: mount"), message
    assert "dmesg(1)" not in message
    if Path("/proc/filesystems").read_text().find("\tnfs\n") < 0 \
            and shutil.which("mount.nfs", path="/usr/sbin:/sbin") is None:
        assert message.endswith("unknown filesystem type 'nfs'."), message


@pytest.mark.root
async def test_describe_failure_of_a_real_mount(tmp_path):
    from vdsm_agent.connections.backends.base import describe_failure

    target = tmp_path / "mnt"
    target.mkdir()
    result = await commands.run_async(["mount", "-t", "vdsmnosuchfs", "none", str(target)],
                                      timeout=30)
    assert result.returncode != 0
    assert "dmesg(1)" in result.stderr  # what the old last-line rule kept
    assert describe_failure(result) == (
        f"mount exited with {result.returncode}: mount: {target}: unknown filesystem type "
        "'vdsmnosuchfs'.")


# -- GET / and GET /jsonrpc ------------------------------------------------------------------


def get(agent: AgentProcess, path: str, accept: str = "*/*") -> tuple[int, dict[str, str], str]:
    """A GET over loopback TCP: an anonymous caller, as a browser on the host is."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def test_get_root_says_how_to_call_the_agent(agents):
    agent = agents["rooted"]
    status, headers, text = get(agent, "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    version = agent.call("ping")["version"]
    assert text.startswith(f"vdsm-agent {version}: ")
    assert "A loopback TCP caller is anonymous" in text
    assert (f"curl -s --unix-socket {agent.socket_path} -d "
            "'{\"jsonrpc\":\"2.0\",\"method\":\"getCapabilities\",\"id\":1}' "
            "http://localhost/jsonrpc") in text
    assert f"vdsm-agent-client --unix-socket {agent.socket_path} getCapabilities" in text
    assert "docs/api.md" in text
    assert "man vdsm-agent-client" in text
    assert len(text.splitlines()) < 30
    status, headers, page = get(agent, "/", accept="text/html,application/xhtml+xml")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert f"<title>vdsm-agent {version}</title>" in page
    assert '<a href="/health">/health</a>' in page
    assert "--unix-socket" in page


def test_get_jsonrpc_is_405_with_a_hint(agents):
    agent = agents["rooted"]
    status, headers, text = get(agent, "/jsonrpc")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert text.count("\n") == 1  # one line
    assert text.startswith("/jsonrpc takes JSON-RPC 2.0 by POST, not GET; try: curl -s -d ")
    assert f"http://127.0.0.1:{agent.port}/jsonrpc" in text
    # Only / is public besides /health: other routes still need a role.
    status, _, _ = get(agent, f"/tasks/{UUID_EXAMPLE}/output")
    assert status == 403


# -- scripts/agent ---------------------------------------------------------------------------


@pytest.mark.slow
def test_scripts_agent_works_for_image_tasks_without_flags(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ROOT / "scripts" / "agent"), "--state-dir", str(state),
                                 "--listen", f"127.0.0.1:{port}"], stdout=out,
                                stderr=subprocess.STDOUT)
    agent = AgentProcess(proc=proc, port=port, socket_path=state / "agent.sock",
                         state_dir=state, log_path=log, argv=[])
    try:
        agent.wait_ready(timeout=120)
        images = state / "images"
        until(lambda: "vdsm-agent is ready" in log.read_text(), timeout=10)
        printed = log.read_text()
        assert f"image files for tasks go under {images}" in printed
        assert f"Image files for tasks: beneath {images} (allowed_roots)" in printed
        assert stat.S_IMODE(images.stat().st_mode) == 0o750
        assert agent.call("getCapabilities")["allowedRoots"] == [str(images)]
        (images / "a.img").write_bytes(b"\0" * 1024 * 1024)
        task = agent.call("startTask", kind="checksum", params={"path": str(images / "a.img")})
        done = agent.call("waitTask", taskID=task["taskID"], timeout=60)
        assert done["state"] == "done", done
    finally:
        agent.stop()
        kill_task_processes(state)


# -- docs true to the program ------------------------------------------------------------------


def test_wait_task_maximum_agrees_in_setting_schema_and_docs():
    timeout = rpc_schema.load("agent").verbs["waitTask"].params["properties"]["timeout"]
    assert timeout["maximum"] == settings.WAIT_TASK_MAXIMUM
    assert timeout["default"] == settings.WAIT_TASK_DEFAULT
    with pytest.raises(ValueError, match=r"between 30 seconds .* and 3600"):
        settings.parse_task_max_wait("7200")
    default = settings.defaults().task_max_wait
    tasks_md = (ROOT / "docs" / "tasks.md").read_text()
    assert f"`task_max_wait` ({default:g} s by default, at most 3600)" in tasks_md
    assert "at most 3600) passes" not in tasks_md  # what it said before


def test_docs_cite_no_file_outside_the_repository():
    cited = []
    for page in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if "../shared" in line or "shared/reference" in line or "shared/design" in line \
                    or "/work/" in line:
                cited.append(f"{page.name}:{number}: {line.strip()}")
    assert cited == []


def test_device_operation_examples_do_what_their_comments_say():
    text = (ROOT / "docs" / "device-operations.md").read_text()
    examples = text[text.index("## Examples (curl)"):text.index("## Design notes")]
    commands = examples.split("\n# ")[1:]
    assert commands
    for command in commands:
        comment, _, body = command.partition("\n")
        if "force=true" in comment:
            assert '"force":true' in body, command
        if "curl" in body:  # privileged calls go through the Unix socket
            assert "127.0.0.1" not in body, command
    assert "127.0.0.1" not in examples
