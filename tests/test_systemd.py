"""What the agent tells systemd and the journal, with real sockets in their place.

The booted systemd (``Type=notify`` start, the watchdog restarting a frozen
agent, ``journalctl -u vdsm-agent TASK_ID=...``, ``systemd-inhibit --list``)
is proven by the packaging test in systemd-nspawn (packaging/test-in-container).
Here, without systemd as PID 1:

* a real agent process given ``NOTIFY_SOCKET`` (a datagram socket we bind)
  and ``WATCHDOG_USEC`` sends READY=1 only once it answers, pings the
  watchdog from its event loop, stops pinging while frozen (SIGSTOP), says
  STOPPING=1 on SIGTERM, and its task zygote does not inherit the variables;
* the journal handler's datagrams parsed as journald parses them: fields,
  TASK_ID/CONNECTION_ID from the message or ``extra``, a multi-line message in
  the binary form, a record too large for a datagram passed as a sealed memfd;
* a destructive task without a system bus says so in its output and runs.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.security_support import start_agent
from tests.support import AgentProcess, agent_argv, free_port, until
from tests.tasks_support import kill_task_processes, make_image
from vdsm_agent.system import inhibit, journal
from vdsm_agent.system.sdnotify import Notifier


def receive_all(sock: socket.socket, timeout: float) -> list[str]:
    """Every datagram that arrives within ``timeout`` seconds."""
    got = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(65536).decode())
        except TimeoutError:
            break
    return got


def receive_until(sock: socket.socket, line: str, timeout: float) -> list[str]:
    got = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        message = sock.recv(65536).decode()
        got.append(message)
        if line in message.splitlines():
            return got
    raise AssertionError(f"no {line} within {timeout}s: {got}")


def test_ready_watchdog_and_stopping_reach_systemd(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    port = free_port()
    socket_path = tmp_path / "agent.sock"
    argv = agent_argv(tmp_path / "state", port, socket_path, log_level="info")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    agent = AgentProcess(proc=proc, port=port, socket_path=socket_path,
                         state_dir=tmp_path / "state", log_path=tmp_path / "agent.log", argv=argv)
    try:
        ready = receive_until(notify, "READY=1", timeout=30)[-1].splitlines()
        # READY comes once the agent serves: answered at once, no polling.
        assert agent.call("ping")["version"]
        assert f"MAINPID={proc.pid}" in ready
        assert any(line.startswith("STATUS=serving on ") for line in ready)
        pings = [m for m in receive_all(notify, 1.0) if m == "WATCHDOG=1"]
        assert len(pings) >= 3  # every 0.2 s
        # The task zygote (and so every task process) cannot notify as the agent.
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "no task zygote"
        for child in children:
            environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
            assert not any(entry.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))
                           for entry in environ), child.cmdline()
        # Frozen: no pings (systemd would kill and restart it after WatchdogSec).
        proc.send_signal(signal.SIGSTOP)
        receive_all(notify, 0.3)  # what was in flight
        assert receive_all(notify, 1.0) == []
        proc.send_signal(signal.SIGCONT)
        assert "WATCHDOG=1" in receive_all(notify, 1.0)
        proc.send_signal(signal.SIGTERM)
        stopping = receive_until(notify, "STOPPING=1", timeout=10)
        assert proc.wait(timeout=15) == 0, stopping
    finally:
        agent.stop()
        kill_task_processes(tmp_path / "state")
        notify.close()


def test_no_notify_socket_no_notification(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.ready("x") is False


def test_an_abstract_notify_socket_and_watchdog_for_another_pid(tmp_path):
    name = f"vdsm-agent-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    try:
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        notifier = Notifier.from_environment(env)
        assert env == {}  # taken out: children do not inherit them
        assert notifier.watchdog_interval is None  # the watchdog is another process's
        assert notifier.stopping()
        server.settimeout(5)
        assert server.recv(1024) == b"STOPPING=1\nSTATUS=stopping"
        notifier.close()
    finally:
        server.close()


# -- the journal ------------------------------------------------------------------------


def parse_native(data: bytes) -> list[tuple[str, str]]:
    """journald's parsing of the native protocol."""
    fields = []
    while data:
        line_end = data.index(b"\n")
        line = data[:line_end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = data[line_end + 1:]
        else:
            key = line
            (size,) = struct.unpack("<Q", data[line_end + 1:line_end + 9])
            value = data[line_end + 9:line_end + 9 + size]
            assert data[line_end + 9 + size:line_end + 10 + size] == b"\n"
            data = data[line_end + 10 + size:]
        fields.append((key.decode(), value.decode()))
    return fields


@pytest.fixture
def journal_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal"))
    sock.settimeout(5)
    yield sock
    sock.close()


def record(message: str, *args: object, level: int = logging.INFO,
           **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("vdsm_agent.tasks.manager", level, __file__, 1, message, args,
                             None)
    made.__dict__.update(extra)
    return made


def test_journal_fields_from_the_message_and_extra(tmp_path, journal_socket):
    handler = journal.JournalHandler("vdsm-agent", path=str(tmp_path / "journal"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(record("task %s: %s -> %s", "t-1", "running", "done"))
    fields = dict(parse_native(journal_socket.recv(65536)))
    assert fields == {"MESSAGE": "task t-1: running -> done", "PRIORITY": "6",
                      "SYSLOG_IDENTIFIER": "vdsm-agent", "LOGGER": "vdsm_agent.tasks.manager",
                      "TASK_ID": "t-1"}
    handler.emit(record("connection %s: connect to %s failed", "c1,c2", "nfs://x/y",
                        level=logging.WARNING))
    fields_list = parse_native(journal_socket.recv(65536))
    assert [value for key, value in fields_list if key == "CONNECTION_ID"] == ["c1", "c2"]
    assert ("PRIORITY", "4") in fields_list
    handler.emit(record("line one\nline two", task_id="t-2"))
    fields = dict(parse_native(journal_socket.recv(65536)))
    assert fields["MESSAGE"] == "line one\nline two"
    assert fields["TASK_ID"] == "t-2"
    handler.close()


def test_a_record_too_large_for_a_datagram_goes_as_a_sealed_memfd(tmp_path, journal_socket):
    handler = journal.JournalHandler("vdsm-agent", path=str(tmp_path / "journal"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    big = "x" * (4 * 1024 * 1024)
    handler.emit(record("task %s: %s", "t-3", big))
    fds = array.array("i")
    data, ancillary, _, _ = journal_socket.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
    assert data == b""
    fds.frombytes(ancillary[0][2])
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE
        # journald maps it: read from the start, whatever the offset.
        fields = dict(parse_native(os.pread(fd, os.fstat(fd).st_size, 0)))
    finally:
        os.close(fd)
    assert fields["MESSAGE"] == f"task t-3: {big}"
    assert fields["TASK_ID"] == "t-3"
    handler.close()


def test_without_journald_the_line_goes_to_stderr(tmp_path, capsys):
    handler = journal.JournalHandler("vdsm-agent", path=str(tmp_path / "no-journal"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(record("task %s: started", "t-4"))
    assert "task t-4: started" in capsys.readouterr().err


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path):
    code = ("import sys; from vdsm_agent.system.journal import stderr_is_journal; "
            "print(stderr_is_journal())")
    with open(tmp_path / "err", "wb") as err:
        stat = os.fstat(err.fileno())
        for stream, expected in ((f"{stat.st_dev}:{stat.st_ino}", "True"),
                                 (f"{stat.st_dev}:{stat.st_ino + 1}", "False"), ("", "False")):
            done = subprocess.run([sys.executable, "-c", code], stderr=err, capture_output=False,
                                  stdout=subprocess.PIPE, text=True, check=True,
                                  env={**os.environ, "JOURNAL_STREAM": stream})
            assert done.stdout.strip() == expected, stream


# -- the inhibitor lock -----------------------------------------------------------------


def test_no_system_bus_is_a_clear_inhibit_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    with pytest.raises(inhibit.InhibitError, match="no system bus"):
        inhibit.take("test")


@pytest.mark.tool("dbus-daemon")
def test_a_bus_without_logind_is_a_clear_inhibit_error(tmp_path, monkeypatch):
    """A real D-Bus daemon (no logind on it): logind's name is unknown."""
    address = f"unix:path={tmp_path}/bus"
    config = tmp_path / "bus.conf"
    config.write_text(
        "<!DOCTYPE busconfig PUBLIC '-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN' "
        "'http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd'>"
        f"<busconfig><type>system</type><listen>{address}</listen><auth>EXTERNAL</auth>"
        "<policy context='default'><allow send_destination='*' eavesdrop='true'/>"
        "<allow eavesdrop='true'/><allow own='*'/></policy></busconfig>")
    daemon = subprocess.Popen(["dbus-daemon", "--config-file", str(config), "--nofork",
                               "--nopidfile"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        until(lambda: (tmp_path / "bus").exists(), timeout=10)
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        with pytest.raises(inhibit.InhibitError, match=r"ServiceUnknown|login1"):
            inhibit.take("test")
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


@pytest.mark.tool("qemu-img")
def test_a_destructive_task_without_logind_says_so_and_runs(tmp_path):
    """No system bus here: the copy runs, its output says it holds no lock."""
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "a").mkdir()
    make_image(images / "src.img", 1024 * 1024)
    agent = start_agent(tmp_path / "a", free_port(), "--allowed-root", str(images))
    try:
        task = agent.call("startTask", kind="copy", params={
            "source": str(images / "src.img"), "destination": str(images / "dst.img")})
        done = agent.call("waitTask", taskID=task["taskID"], timeout=60)
        assert done["state"] == "done", done
        output = agent.call("getTaskOutput", taskID=task["taskID"])
        assert "no shutdown inhibitor lock: " in output["data"], output
    finally:
        agent.stop()
        kill_task_processes(agent.state_dir)
