"""vdsm-agent-client and vdsm-engine call in a real pseudo-terminal, read as a person sees
them: tmux panes of 80 and 120 columns (tests/terminal_support.py) in front of a real
agent process (and a real engine process) with real image files.

What is asserted is the rendered screen: a progress bar that moves on a rate-limited
copy and checksum, the exit codes of --watch, Ctrl-C leaving the task running, tables
whose rows stay one line at 80 columns, a task as key/value, colours and NO_COLOR.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine_support import fleet
from tests.support import AgentProcess, agent_factory, free_port, until
from tests.tasks_support import kill_task_processes
from tests.terminal_support import COLOUR_SGR, Terminal

pytestmark = [pytest.mark.tool("tmux"), pytest.mark.slow]

BIN = Path(sys.executable).parent
CLIENT = str(BIN / "vdsm-agent-client")
ENGINE = str(BIN / "vdsm-engine")
MiB = 1024 * 1024
RATE = 8 * MiB  # task_io_rate_limit: a 40 MiB image takes about 5 s
IMAGE_SIZE = 40 * MiB
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# The bar line's figures: "42% 16.8 MiB/40.0 MiB 8.0 MiB/s".
FIGURES = re.compile(r"(\d+)% +([\d.]+ [KMG]?i?B)/([\d.]+ [KMG]?i?B)(?: +([\d.]+ [KMG]?i?B/s))?")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("terminal")


@pytest.fixture(scope="module")
def agent(workdir: Path) -> Iterator[AgentProcess]:
    """One real agent for the module: rate-limited data tasks, the test kinds, an
    allowed root with a 40 MiB image of random data (a copy cannot skip zeros)."""
    images = workdir / "images"
    images.mkdir()
    with open(images / "random.img", "wb") as image:
        for _ in range(IMAGE_SIZE // MiB):
            image.write(os.urandom(MiB))
    (workdir / "agent").mkdir()
    with agent_factory(workdir / "agent") as start:
        agent = start(allowed_root=str(images), task_io_rate_limit=RATE,
                      enable_test_kinds="true")
        try:
            yield agent
        finally:
            kill_task_processes(agent.state_dir)  # tasks outlive their agent by design


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[Any]:
    """terminals(width) -> a new Terminal; all closed at the end."""
    made: list[Terminal] = []

    def make(width: int, height: int = 40) -> Terminal:
        terminal = Terminal(tmp_path / f"tty{len(made)}", width, height)
        made.append(terminal)
        return terminal

    yield make
    for terminal in made:
        terminal.close()


def client(agent: AgentProcess, *words: str) -> list[str]:
    return [CLIENT, "--unix-socket", str(agent.socket_path), *words]


def start_sleep(agent: AgentProcess, **params: Any) -> str:
    return str(agent.call("startTask", kind="test.sleep", params=params)["taskID"])


def bar_figures(screen: str, title: str) -> tuple[int, str, str, str | None] | None:
    """(percent, done, total, rate) from the bar line that starts with ``title``."""
    for line in screen.split("\n"):
        if line.startswith(title):
            match = FIGURES.search(line)
            if match:
                return int(match.group(1)), match.group(2), match.group(3), match.group(4)
    return None


# -- watching a real copy and a real checksum -------------------------------------------


@pytest.mark.parametrize(("width", "kind"), [(80, "copy"), (120, "checksum")])
def test_watch_shows_a_moving_progress_bar(agent, terminals, workdir, width, kind):
    source = workdir / "images" / "random.img"
    if kind == "copy":
        params = [f"params.source={source}",
                  f"params.destination={workdir / 'images' / f'copy-{width}.img'}"]
    else:
        params = [f"params.path={source}"]
    terminal = terminals(width)
    terminal.run(client(agent, "startTask", f"kind={kind}", *params, "--watch"))
    figures: list[tuple[int, str, str, str | None]] = []
    output_lines: set[str] = set()
    while terminal.exit_code() is None:
        screen = terminal.screen()
        lines = [line for line in screen.split("\n") if line.strip()]
        bar = next((i for i, line in enumerate(lines) if line.startswith(f"{kind} ")), None)
        if bar is not None:
            found = bar_figures(screen, f"{kind} ")
            if found:
                figures.append(found)
            assert len(lines[bar]) <= width
            if bar + 1 < len(lines):
                output_lines.add(lines[bar + 1])  # the task's latest output line
        time.sleep(0.2)
    assert terminal.wait_exit() == 0
    final = terminal.screen()
    # The bar moved: a figure strictly between 0 and 100, with bytes of the
    # 40 MiB image and a rate, then 100% at the end.
    last = bar_figures(final, f"{kind} ")
    assert last is not None
    assert last[0] == 100
    middle = [found for found in figures if 0 < found[0] < 100]
    assert middle, f"no intermediate progress seen: {figures}\n{final}"
    assert all(found[2] == "40.0 MiB" for found in figures), figures
    assert any(found[3] and found[3].endswith("MiB/s") for found in middle), middle
    assert last[1] == last[2] == "40.0 MiB"
    assert re.search(rf"^{kind} [0-9a-f]{{8}} done ", final, re.M), final
    assert re.search(r"^task [0-9a-f-]{36} done in \d", final, re.M), final
    # The line under the bar is the task's own output, without its timestamp.
    assert output_lines, final
    assert not any(re.match(r"\d{4}-\d\d-\d\dT", line) for line in output_lines)
    if kind == "copy":
        assert any(re.search(r"\(\d+\.\d\d/100%\)|copied \d+ bytes", line)
                   for line in output_lines), output_lines


# -- exit codes and Ctrl-C ---------------------------------------------------------------


@pytest.mark.parametrize(("params", "state", "code"), [
    ({"seconds": 0.5}, "done", 0),
    ({"seconds": 0.5, "fail": "the disk said no"}, "failed", 1),
])
def test_watch_exits_with_the_outcome(agent, terminals, params, state, code):
    task_id = start_sleep(agent, **params)
    terminal = terminals(80)
    terminal.run(client(agent, "waitTask", f"taskID={task_id}", "--watch"))
    assert terminal.wait_exit() == code
    screen = terminal.screen()
    assert f"task {task_id} {state}" in screen
    if state == "failed":
        assert "the disk said no" in screen


def test_a_canceled_task_exits_1(agent, terminals):
    task_id = start_sleep(agent, seconds=60)
    terminal = terminals(80)
    terminal.run(client(agent, "getTask", f"taskID={task_id}", "--watch"))
    terminal.wait_for(lambda screen: "test.sleep" in screen and "running" in screen,
                      what="the running task")
    agent.call("cancelTask", taskID=task_id)
    assert terminal.wait_exit() == 1
    assert f"task {task_id} canceled" in terminal.screen()


def test_ctrl_c_stops_watching_and_the_task_goes_on(agent, terminals):
    task_id = start_sleep(agent, seconds=60)
    terminal = terminals(80)
    terminal.run(client(agent, "waitTask", f"taskID={task_id}", "--watch"))
    terminal.wait_for(lambda screen: "running" in screen, what="the running task")
    terminal.keys("C-c")
    assert terminal.wait_exit() == 130
    screen = terminal.screen()
    assert "stopped watching; the task goes on" in screen
    assert f"getTask taskID={task_id}" in screen
    assert "Traceback" not in screen
    time.sleep(1)
    assert agent.call("getTask", taskID=task_id)["state"] == "running"
    agent.call("cancelTask", taskID=task_id)


# -- tables ------------------------------------------------------------------------------


def table_rows(terminal: Terminal) -> list[str]:
    terminal.wait_exit()
    return terminal.lines()


@pytest.mark.parametrize("width", [80, 120])
def test_tables_fit_the_terminal(agent, terminals, width):
    started = [start_sleep(agent, seconds=0.1) for _ in range(3)]
    # Finished, so that every row has a percentage (a task still initializing has none).
    for task_id in started:
        until(lambda task_id=task_id: agent.call("getTask", taskID=task_id)["state"] == "done")
    tasks = agent.call("listTasks")["tasks"]
    terminal = terminals(width)
    terminal.run(client(agent, "listTasks", "--table"))
    lines = table_rows(terminal)
    # One line per task: a row that wrapped would add lines.
    assert len(lines) == 1 + len(tasks), "\n".join(lines)
    assert lines[0].split() == ["id", "kind", "state", "percent", "eta"]
    for line, task in zip(lines[1:], tasks, strict=True):
        assert line.startswith(task["id"])  # the whole ID, copyable
        assert re.search(r"\d+%", line), line  # the percentage is not cut off
        assert len(line) <= width

    devices = agent.call("getDeviceList")["devices"]
    terminal = terminals(width)
    terminal.run(client(agent, "getDeviceList", "--table"))
    lines = table_rows(terminal)
    assert len(lines) == 1 + len(devices), "\n".join(lines)
    assert lines[0].split() == ["name", "type", "size", "fstype", "inUse", "mountpoints"]
    assert all(re.search(r"\d(\.\d)? [KMGT]?i?B\b", line) for line in lines[1:]), lines


def test_one_task_is_a_key_value_table(agent, terminals):
    task_id = start_sleep(agent, seconds=0.1)
    until(lambda: agent.call("getTask", taskID=task_id)["state"] == "done")
    terminal = terminals(80)
    terminal.run(client(agent, "getTask", f"taskID={task_id}", "--table"))
    assert terminal.wait_exit() == 0
    fields = dict(line.split(None, 1) for line in terminal.lines())
    assert fields["id"] == task_id
    assert fields["kind"] == "test.sleep"
    assert fields["state"] == "done"
    assert fields["progress.percent"] == "100%"
    assert fields["params.seconds"] == "0.1s"  # a duration, in words
    assert "result.slept" in fields
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", fields["endedAt"])


def test_colours_only_without_no_color(agent, terminals):
    start_sleep(agent, seconds=0.1)
    until(lambda: all(task["state"] in ("done", "failed", "canceled")
                      for task in agent.call("listTasks")["tasks"]
                      if task["kind"] == "test.sleep"))
    coloured = terminals(80)
    coloured.run(client(agent, "listTasks", "kind=test.sleep", "--table"))
    coloured.wait_exit()
    assert COLOUR_SGR.search(coloured.screen(colours=True)), "states are coloured"

    plain = terminals(80)
    plain.run(client(agent, "listTasks", "kind=test.sleep", "--table"), env={"NO_COLOR": "1"})
    plain.wait_exit()
    assert "done" in plain.screen()
    assert not COLOUR_SGR.search(plain.screen(colours=True))

    task_id = start_sleep(agent, seconds=0.3)
    watched = terminals(80)
    watched.run(client(agent, "waitTask", f"taskID={task_id}", "--watch"),
                env={"NO_COLOR": "1"})
    assert watched.wait_exit() == 0
    assert "done" in watched.screen()
    assert not COLOUR_SGR.search(watched.screen(colours=True))


# -- vdsm-engine call ----------------------------------------------------------------------


def engine_healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def engine_call(url: str, *words: str) -> Any:
    done = subprocess.run([ENGINE, "call", "--url", url, "--compact", *words],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_engine_call_watches_a_checksum_through_the_engine(tmp_path, terminals):
    with fleet(tmp_path / "agents", 1, task_io_rate_limit=RATE) as agents:
        image = agents[0].images / "disk.img"
        with open(image, "wb") as file:
            for _ in range(IMAGE_SIZE // MiB):
                file.write(os.urandom(MiB))
        port = free_port()
        url = f"http://127.0.0.1:{port}/jsonrpc"
        log = open(tmp_path / "engine.log", "wb")  # noqa: SIM115 - closed below
        engine = subprocess.Popen(
            [ENGINE, "serve", "--state-dir", str(tmp_path / "engine"), "--listen",
             f"127.0.0.1:{port}", "--database", f"sqlite:///{tmp_path / 'engine.db'}",
             "--retry-interval", "0.2", "--poll-interval", "0.5", "--loopback-role", "admin"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            until(lambda: engine_healthy(port) or engine.poll() is not None, timeout=30)
            assert engine.poll() is None, (tmp_path / "engine.log").read_text()
            engine_call(url, "addHost", "name=host1", f"url={agents[0].url}")
            until(lambda: engine_call(url, "getHost", "name=host1")["status"] == "up",
                  timeout=20, interval=0.2)
            terminal = terminals(80)
            terminal.run([ENGINE, "call", "--url", url, "startTask", "host=host1",
                          "kind=checksum", f"params.path={image}", "--watch"])
            percents = set()
            while terminal.exit_code() is None:
                found = bar_figures(terminal.screen(), "host1 checksum ")
                if found:
                    percents.add(found[0])
                time.sleep(0.2)
            assert terminal.wait_exit() == 0, terminal.screen()
            final = terminal.screen()
            assert re.search(r"^job [0-9a-f-]{36} done$", final, re.M), final
            assert percents & set(range(1, 100)), (percents, final)
            assert 100 in percents or "100%" in final

            tasks = terminals(80)
            tasks.run([ENGINE, "call", "--url", url, "listTasks", "--table"])
            assert tasks.wait_exit() == 0
            lines = tasks.lines()
            assert lines[0].split() == ["host", "id", "state", "percent", "kind"]
            assert len(lines) == 2, lines
            assert re.match(rf"host1 +{UUID.pattern} +done +100% +checksum$", lines[1]), lines
        finally:
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(timeout=15)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait()
            log.close()
