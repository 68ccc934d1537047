"""Local callers of a real agent: who they are (peer uid) and what they may do.

The agent identifies a Unix socket peer by ``SO_PEERCRED`` and a loopback TCP
peer by the uid owning its socket (the kernel's socket table), as ``uid:N``
(also looked up as ``user:NAME``). Root is admin unless ``[roles]`` says
otherwise; here ``user:nobody`` is given ``read`` and uid 65533 (no such
user) is not listed, so it gets ``default_role`` (none).

The clients run as those users (``subprocess`` with ``user=``), so these tests
need root. The socket lives in a directory of its own that others may
traverse, and the test opens the socket's mode to 0666 once the agent made
it 0660, so that the identity layer (not the file mode) is what is tested;
one test checks the 0660 mode on its own.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.security_support import NOBODY, run_as, start_agent
from tests.support import AgentProcess
from vdsm_agent import errors

pytestmark = pytest.mark.root

UNLISTED = 65533
NO_TASK = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def local_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("local-agent")
    socket_dir = Path(tempfile.mkdtemp(prefix="vdsm-agent-sock-"))
    os.chmod(socket_dir, 0o755)
    agent = start_agent(tmp, free_port(), "--role", "user:nobody=read",
                        socket_path=socket_dir / "agent.sock")
    try:
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def open_socket(local_agent: AgentProcess) -> Iterator[str]:
    path = local_agent.socket_path
    os.chmod(path, 0o666)
    try:
        yield str(path)
    finally:
        os.chmod(path, 0o660)


def test_root_on_the_unix_socket_is_admin(local_agent):
    with pytest.raises(Exception) as info:
        local_agent.call("resetTaskState", unix=True, taskID=NO_TASK, state="failed",
                         reason="test")
    assert getattr(info.value, "name", None) == "TaskNotFound"  # past the admin check


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_listed_local_user_gets_its_role(local_agent, open_socket, transport):
    target = open_socket if transport == "unix" else f"tcp:{local_agent.port}"
    assert "result" in run_as(NOBODY, target, "ping")
    answer = run_as(NOBODY, target, "startTask", kind="checksum", params={"path": "/x"})
    assert answer["error"]["code"] == errors.Forbidden.code
    assert answer["error"]["data"]["identity"] == f"uid:{NOBODY}"
    assert answer["error"]["data"]["role"] == "read"


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_an_unlisted_local_user_may_do_nothing(local_agent, open_socket, transport):
    target = open_socket if transport == "unix" else f"tcp:{local_agent.port}"
    answer = run_as(UNLISTED, target, "ping")
    assert answer["error"]["code"] == errors.Forbidden.code
    assert answer["error"]["data"]["identity"] == f"uid:{UNLISTED}"
    assert answer["error"]["data"]["role"] == "none"
    log = local_agent.log_path.read_text()
    assert f'"identity":"uid:{UNLISTED}"' in log  # the refusal is in the audit log


def test_the_socket_mode_keeps_other_users_out(local_agent):
    mode = stat.S_IMODE(os.stat(local_agent.socket_path).st_mode)
    assert mode == 0o660
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c",
         "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
         str(local_agent.socket_path)],
        user=UNLISTED, group=UNLISTED, extra_groups=[], cwd="/", capture_output=True,
        text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert "PermissionError" in result.stderr
