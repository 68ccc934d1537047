"""Local callers of a real agent: who they are (peer uid) and what they may do.

The agent identifies a Unix socket peer by ``SO_PEERCRED``, as ``uid:N`` (also
looked up as ``user:NAME``). Root is admin unless ``[roles]`` says otherwise;
here ``user:nobody`` is given ``read`` and uid 65533 (no such user) is not
listed, so it gets ``default_role`` (none). A loopback TCP caller is anonymous
whoever it is (``default_role``): the kernel's socket table once named root as
the owner of a socket its real owner had just closed.

The clients run as those users (``subprocess`` with ``user=``), so these tests
need root. The socket lives in a directory of its own that others may
traverse, and the test opens the socket's mode to 0666 once the agent made
it 0660, so that the identity layer (not the file mode) is what is tested;
one test checks the 0660 mode on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.security_support import NOBODY, created_user, run_as, start_agent
from tests.support import AgentProcess, until
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


def test_a_listed_local_user_gets_its_role(local_agent, open_socket):
    target = open_socket
    assert "result" in run_as(NOBODY, target, "getTaskKinds")
    answer = run_as(NOBODY, target, "startTask", kind="checksum", params={"path": "/x"})
    assert answer["error"]["code"] == errors.Forbidden.code
    assert answer["error"]["data"]["identity"] == f"uid:{NOBODY}"
    assert answer["error"]["data"]["role"] == "read"


def test_an_unlisted_local_user_may_do_nothing(local_agent, open_socket):
    target = open_socket
    answer = run_as(UNLISTED, target, "getTaskKinds")
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


@pytest.mark.parametrize("uid", [0, NOBODY, UNLISTED])
def test_a_loopback_tcp_caller_is_anonymous_whoever_it_is(local_agent, uid):
    """Root and a listed user alike: on TCP nothing attests who they are."""
    target = f"tcp:{local_agent.port}"
    assert "result" in run_as(uid, target, "ping")  # public
    answer = run_as(uid, target, "getTaskKinds")
    assert answer["error"]["code"] == errors.Forbidden.code
    assert (answer["error"]["data"]["identity"], answer["error"]["data"]["role"]) == (
        "anonymous", "none")


# Sends one call and closes the socket without reading the answer, N times, with
# 0-30 ms between sending and closing: the closed socket lingers in FIN_WAIT2 as
# an orphan, which /proc/net/tcp lists with uid 0.
_HIT_AND_RUN = r"""
import json, socket, sys, time
port, tries, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for number in range(tries):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "manageStorageConnection",
                       "params": {"connectionID": f"forged-{number}",
                                  "uri": "file://" + directory}}).encode()
    head = (f"POST /jsonrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + body)
    time.sleep((number % 31) / 1000)
    sock.close()
"""


def test_a_local_user_cannot_pass_for_root_by_closing_its_socket(tmp_path, local_agent):
    """Issue 15, item 1: 300 hit-and-run calls of a real non-root user over TCP;
    none may run as anyone but the anonymous caller (default_role none)."""
    directory = tmp_path / "target"
    directory.mkdir()
    with created_user() as (_name, uid):
        result = subprocess.run(
            ["/usr/bin/python3", "-I", "-c", _HIT_AND_RUN, str(local_agent.port), "300",
             str(directory)],
            user=uid, group=uid, extra_groups=[], cwd="/", capture_output=True, text=True,
            timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        # The agent answers each call after its client left: wait for the last.
        until(lambda: '"connectionID":"forged-299"' in local_agent.log_path.read_text(),
              timeout=30, what="the last call in the audit log")
    managed = local_agent.call("getStorageConnectionList")
    assert not [name for name in managed if name.startswith("forged-")]
    calls = [json.loads(line[line.index("{"):]) for line in
             local_agent.log_path.read_text().splitlines()
             if '"verb":"manageStorageConnection"' in line and '"forged-' in line]
    assert len(calls) >= 250  # most calls were read and judged (none queued forever)
    assert {(call["identity"], call["event"]) for call in calls} == {("anonymous", "forbidden")}
    assert "Traceback" not in local_agent.log_path.read_text()


def _answers(agent: AgentProcess) -> bool:
    try:
        return agent.call("ping")["uptime"] > 0
    except OSError:
        return False


def test_clients_that_leave_before_their_call_is_read_cost_no_traceback(local_agent):
    """300 pings over the Unix socket, each closed right after sending: the agent
    fails to read some bodies (the client is gone), and says so at debug level only,
    not with a traceback per connection (a log flood any socket user could cause)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    request = (b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(300):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(local_agent.socket_path))
            sock.sendall(request)
    # (While the agent works through them, the socket's connection cap may refuse us.)
    until(lambda: _answers(local_agent), timeout=20, what="the agent answering again")
    log = local_agent.log_path.read_text()
    assert "Traceback" not in log
    assert "Error handling request" not in log
