"""vdsm-agent-client: the real CLI, run as a subprocess, against a real agent process.

The tests that need no agent (usage errors, help, an unreachable agent) run the
CLI alone; ``--dry-run`` shows the params a command line turns into. Verbs
with integer, boolean, object and required params come with the task verbs;
until then (and to stay independent of them) a test schema adds such a verb by
replacing ``rpc_schema.load`` in the CLI's process: nothing in the client knows
a verb by name, which is what these tests prove.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import rpc_schema
from tests.support import agent_factory
from vdsm_agent import __version__
from vdsm_agent.client import main as client_main
from vdsm_agent.client.output import Style, Table, fit_widths, render_table, tabulate
from vdsm_agent.client.schema import SchemaView
from vdsm_agent.client.units import human_bytes, human_duration, humanize

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = rpc_schema.load("agent")

def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
        schema: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vdsm_agent.client.main ARGS``; ``schema`` replaces the API schema."""
    environ = {key: value for key, value in os.environ.items() if key != "VDSM_AGENT_SOCKET"}
    environ.update(env or {})
    if schema is None:
        argv = [sys.executable, "-m", "vdsm_agent.client.main", *args]
    else:
        environ["TEST_SCHEMA"] = json.dumps(schema)
        code = ("import json, os, sys, rpc_schema\n"
                "document = json.loads(os.environ['TEST_SCHEMA'])\n"
                "rpc_schema.load = lambda name='agent': rpc_schema.from_document(document)\n"
                "from vdsm_agent.client.main import main\n"
                "sys.exit(main(sys.argv[1:]))\n")
        argv = [sys.executable, "-c", code, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=environ, cwd=ROOT,
                          timeout=timeout, check=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- against a real agent ---------------------------------------------------------


def test_ping_over_url_and_unix_socket(agent_process):
    by_url = cli("--url", agent_process.url, "ping")
    assert by_url.returncode == 0, by_url.stderr
    assert json.loads(by_url.stdout)["version"] == __version__
    # sorted keys, indented by 2
    assert by_url.stdout == json.dumps(json.loads(by_url.stdout), sort_keys=True,
                                       indent=2) + "\n"

    by_socket = cli("--unix-socket", str(agent_process.socket_path), "ping", "--compact")
    assert by_socket.returncode == 0, by_socket.stderr
    assert by_socket.stdout.count("\n") == 1
    assert json.loads(by_socket.stdout)["uptime"] >= 0

    # Default target: $VDSM_AGENT_SOCKET; --url without a path means /jsonrpc.
    by_env = cli("ping", env={"VDSM_AGENT_SOCKET": str(agent_process.socket_path)})
    assert by_env.returncode == 0, by_env.stderr
    bare = cli("--url", f"http://127.0.0.1:{agent_process.port}", "ping")
    assert bare.returncode == 0, bare.stderr

    # Something that is not a JSON-RPC endpoint: exit 4 with the HTTP status.
    # (An anonymous loopback caller may reach /jsonrpc and /health only: 403.)
    wrong_path = cli("--url", f"http://127.0.0.1:{agent_process.port}/nope", "ping")
    assert wrong_path.returncode == 4
    assert "403" in wrong_path.stderr


def test_over_loopback_tcp_the_client_is_anonymous(agent_process):
    done = cli("--url", agent_process.url, "getCapabilities")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("error 401 Forbidden: "), done.stderr


def test_get_capabilities_and_tables(agent_process):
    done = cli("--unix-socket", str(agent_process.socket_path), "getCapabilities")
    assert done.returncode == 0, done.stderr
    capabilities = json.loads(done.stdout)
    assert capabilities["version"] == __version__
    assert {"apiVersion", "hostname", "uriSchemes", "taskKinds", "limits"} <= set(capabilities)

    # The same agent, for speed: the table views.
    table = cli("--unix-socket", str(agent_process.socket_path), "getCapabilities", "--table")
    assert table.returncode == 0, table.stderr
    # One object: a key/value table, nested objects as dotted keys.
    fields = dict(line.split(None, 1) for line in table.stdout.splitlines())
    assert fields["version"] == __version__
    assert fields["hostname"] == capabilities["hostname"]
    assert any(key.startswith("limits.") for key in fields)

    devices = cli("--unix-socket", str(agent_process.socket_path), "getDeviceList", "--table")
    assert devices.returncode == 0, devices.stderr
    header = devices.stdout.splitlines()[0].split()
    assert header == ["name", "type", "size", "fstype", "inUse", "mountpoints"]

    chosen = cli("--unix-socket", str(agent_process.socket_path), "getDeviceList",
                 "--columns", "path,inUse")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.splitlines()[0].split() == ["path", "inUse"]


def test_get_device_list_missing_path(agent_process):
    for words in (["paths=/dev/nonexistent0"],  # one item
                  ['paths=["/dev/nonexistent0"]'],  # JSON
                  ["paths=/dev/nonexistent0", "paths=/dev/nonexistent1"],  # repeated
                  ['paths:=["/dev/nonexistent0"]']):  # raw JSON
        done = cli("--unix-socket", str(agent_process.socket_path), "getDeviceList", *words)
        assert done.returncode == 1, (words, done.stdout, done.stderr)
        assert done.stderr.startswith("error 300 DeviceNotFound: "), words
        assert "/dev/nonexistent0" in done.stderr
        assert done.stdout == ""


def test_invalid_params_is_a_protocol_error(agent_process):
    done = cli("--unix-socket", str(agent_process.socket_path), "getDeviceList", "paths:=[1]")
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert done.stderr.startswith("error -32602 InvalidParams: ")
    assert "params.paths[0]" in done.stderr
    assert done.stdout == ""

    verbose = cli("--unix-socket", str(agent_process.socket_path), "-v", "getDeviceList",
                  "paths=[1]")
    assert verbose.returncode == 3
    data = json.loads(verbose.stderr[verbose.stderr.index("\n{"):])
    assert data["name"] == "InvalidParams"
    assert data["field"] == "params.paths[0]"


# -- no agent needed --------------------------------------------------------------


def test_unreachable_agent():
    port = closed_port()
    refused = cli("--url", f"http://127.0.0.1:{port}/jsonrpc", "ping")
    assert refused.returncode == 4
    assert "cannot reach the agent" in refused.stderr
    assert "refused" in refused.stderr

    no_socket = cli("--unix-socket", "/nonexistent/agent.sock", "ping")
    assert no_socket.returncode == 4
    assert "/nonexistent/agent.sock" in no_socket.stderr


def test_timeout():
    with socket.socket() as server:  # accepts connections (backlog), never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        done = cli("--url", f"127.0.0.1:{port}", "--timeout", "0.3", "ping", timeout=10)
    assert done.returncode == 4
    assert "no answer within 0.3 s" in done.stderr


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process: the same code, without a process start."""
    code = client_main.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_usage_errors():
    url = f"http://127.0.0.1:{closed_port()}"  # would exit 4 if anything were sent
    unknown_verb = cli("--url", url, "getDeviceLst")
    assert unknown_verb.returncode == 2
    assert "unknown verb 'getDeviceLst'" in unknown_verb.stderr
    assert "getDeviceList" in unknown_verb.stderr  # the close match

    unknown_param = cli("--url", url, "getDeviceList", "path=/dev/sda")
    assert unknown_param.returncode == 2
    assert "no param 'path'" in unknown_param.stderr
    assert "valid params: paths" in unknown_param.stderr

    bad_integer = cli("--url", url, "frobnicate", "count=abc", schema=schema_with_test_verb())
    assert bad_integer.returncode == 2
    assert "count: expected integer (>= 0), got 'abc'" in bad_integer.stderr


@pytest.mark.parametrize(("words", "message"), [
    (["ping", "x=1"], "ping takes no params"),
    (["getDeviceList", "paths"], "expected name=value or name:=JSON, got 'paths'"),
    (["getDeviceList", "=x"], "expected name=value"),
    (["getDeviceList", "paths=[1"], "paths: not valid JSON"),
    (["getDeviceList", "paths:=nope"], "paths: not valid JSON"),
    (["getDeviceList", "paths:=1", "paths:=2"], "'paths' given more than once"),
    (["--timeout", "0", "ping"], "must be more than 0 seconds"),
    (["--timeout", "soon", "ping"], "not a number of seconds"),
    (["--bogus", "ping"], "unrecognized arguments: --bogus"),
    ([], "a verb is required"),
    (["--compact", "--table", "ping"], "not allowed with argument"),
    (["--url", "ftp://host/", "ping"], "the scheme must be http or https"),
    (["--url", "http://host:port/", "ping"], "--url"),
])
def test_more_usage_errors(capsys, words, message):
    code, out, err = run_main(capsys, "--url", f"http://127.0.0.1:{closed_port()}", *words)
    assert code == 2, err
    assert message in err
    assert "error:" in err
    assert out == ""


def test_help_lists_every_verb():
    done = cli("--help")
    assert done.returncode == 0, done.stderr
    for name in ("ping", "getCapabilities", "getDeviceList", "rpc.discover"):
        assert f"\n  {name} " in done.stdout
    for verb in SCHEMA.verbs.values():
        assert verb.summary.split()[0] in done.stdout
    assert "exit codes:" in done.stdout
    assert "VDSM_AGENT_SOCKET" in done.stdout


def test_verb_help(capsys):
    done = cli("getDeviceList", "--help")
    assert done.returncode == 0, done.stderr
    code, out, _ = run_main(capsys, "help", "getDeviceList")
    assert code == 0
    assert out == done.stdout
    assert "paths  array of string, optional" in out
    assert "Only these device paths." in out
    assert "300 DeviceNotFound" in out
    assert "vdsm-agent-client getDeviceList paths=/dev/loop3" in out
    code, _, err = run_main(capsys, "help", "pnig")
    assert code == 2
    assert "did you mean: ping?" in err


def test_version():
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.split()[:2] == ["vdsm-agent-client", __version__]


def test_console_script():
    script = Path(sys.executable).with_name("vdsm-agent-client")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    assert __version__ in done.stdout


def test_repeated_and_json_paths_build_the_same_request(capsys):
    requests = []
    for words in (["paths=/dev/a", "paths=/dev/b"], ['paths=["/dev/a","/dev/b"]'],
                  ['paths:=["/dev/a"]', "paths=/dev/b"]):
        code, out, err = run_main(capsys, "--dry-run", "getDeviceList", *words)
        assert code == 0, err
        requests.append(json.loads(out))
    assert requests[0] == requests[1] == requests[2] == {
        "jsonrpc": "2.0", "method": "getDeviceList", "id": 1,
        "params": {"paths": ["/dev/a", "/dev/b"]}}


# -- a verb the schema gains later: types come from the schema, not the client -----


def schema_with_test_verb() -> dict[str, Any]:
    document = copy.deepcopy(SCHEMA.document)
    document["methods"]["frobnicate"] = {
        "summary": "A verb only the tests know.",
        "params": {
            "type": "object",
            "required": ["count"],
            "additionalProperties": False,
            "properties": {
                "count": {"type": "integer", "minimum": 0, "description": "How many."},
                "ratio": {"type": "number"},
                "force": {"type": "boolean", "default": False},
                "label": {"type": ["string", "null"]},
                "sizes": {"type": "array", "items": {"type": "integer"}},
                "options": {"type": "object", "properties": {"a": {"type": "integer"}}},
                "method": {"type": "string", "enum": ["zero", "discard"]},
                "anything": {},
            },
        },
        "result": {"type": "object"},
        "errors": ["TaskNotFound"],
        "examples": [{"name": "x", "params": {"count": 2, "force": True,
                                              "options": {"a": 1}}}],
    }
    return document


def test_params_are_converted_by_schema_type():
    done = cli("--dry-run", "--compact", "frobnicate", "count=5", "ratio=0.5", "force=true",
               "label=null", "sizes=1", "sizes=[2,3]", 'options={"a":1}', "method=zero",
               "anything=[1]", schema=schema_with_test_verb())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["params"] == {
        "count": 5, "ratio": 0.5, "force": True, "label": None, "sizes": [1, 2, 3],
        "options": {"a": 1}, "method": "zero", "anything": [1]}

    raw = cli("--dry-run", "frobnicate", 'count:="5"', "label=text", "anything=text",
              schema=schema_with_test_verb())
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["params"] == {"count": "5", "label": "text",
                                                "anything": "text"}


@pytest.mark.parametrize(("words", "message"), [
    (["count=1.5"], "count: expected integer"),
    (["count=1", "force=yes"], "force: expected boolean"),
    (["count=1", "ratio=nan"], "ratio: expected number"),
    (["count=1", "sizes=x"], "sizes item: expected integer"),
    (["count=1", "options=[1]"], "options: expected object"),
    (["count=1", "options=x"], "options: expected object"),
    (["count=1", "count=2"], "'count' given more than once"),
    (["force=true"], "missing required param count"),
    (["count=1", "forse=true"], "did you mean force?"),
])
def test_bad_values_are_usage_errors(capsys, monkeypatch, words, message):
    document = schema_with_test_verb()
    monkeypatch.setattr(rpc_schema, "load", lambda name="agent": rpc_schema.from_document(
        document))
    code, out, err = run_main(capsys, "--url", f"127.0.0.1:{closed_port()}", "frobnicate",
                              *words)
    assert code == 2, err
    assert message in err
    assert "usage: vdsm-agent-client [options] frobnicate count=VALUE [ratio=VALUE]" in err
    assert out == ""


def test_new_verb_has_help():
    listed = cli("--help", schema=schema_with_test_verb())
    assert "frobnicate" in listed.stdout
    done = cli("frobnicate", "--help", schema=schema_with_test_verb())
    assert done.returncode == 0, done.stderr
    params = {line.split()[0]: " ".join(line.split()[1:])
              for line in done.stdout.splitlines() if line.startswith("  ")}
    assert params["count"] == "integer (>= 0), required"
    assert params["force"] == "boolean (default false), optional"
    assert params["method"] == "string (one of zero, discard), optional"
    assert params["options"] == "object, optional"
    assert params["sizes"] == "array of integer, optional"
    assert params["label"] == "string|null, optional"
    assert "200 TaskNotFound" in done.stdout
    assert ("vdsm-agent-client frobnicate count=2 force=true 'options={\"a\":1}'"
            in done.stdout)


# -- table rendering (in process) -------------------------------------------------


def test_table_shapes():
    view = SchemaView(SCHEMA.document)
    devices = {"devices": [{"name": "loop3", "path": "/dev/loop3", "size": 1024,
                            "mountpoints": ["/mnt/a"], "model": None},
                           {"name": "vda", "path": "/dev/vda", "size": 10 ** 10, "x": True}],
               "nextPageToken": "t"}
    table = tabulate(devices, {}, view)
    assert table is not None
    assert table.columns == ["name", "path", "size", "mountpoints", "model", "x"]
    assert table.rest == {"nextPageToken": "t"}
    lines = render_table(table, None, 40).splitlines()
    assert lines[0].split() == table.columns
    assert lines[1].split() == ["loop3", "/dev/loop3", "1024", '["/mnt/a"]', "-"]
    assert lines[2].endswith("true")
    # numbers are right-aligned
    assert lines[1].index("1024") + 4 == lines[2].index("10000000000") + 11

    by_id = tabulate({"c1": {"uri": "nfs://a/b"}, "c2": {"uri": "file:///x"}}, {}, view)
    assert by_id is not None
    assert by_id.columns == ["key", "uri"]

    # No rows: the columns come from the result schema.
    empty = tabulate({"devices": []}, SCHEMA.verbs["getDeviceList"].result, view)
    assert empty is not None
    assert empty.rows == []
    assert "path" in empty.columns

    assert tabulate(5, {}, view) is None
    cut = render_table(Table(["v"], [{"v": "x" * 50}], {}), None, 10)
    assert cut.splitlines()[1] == "xxxxxxx..."
    assert render_table(Table(["b", "a"], [{"a": 1, "b": 2}], {}), ["a", "zz"], 0) \
        .splitlines() == ["a  zz", "1"]


def test_main_returns_exit_codes(capsys):
    assert client_main.main(["--version"]) == 0
    assert client_main.main(["--help"]) == 0
    assert client_main.main(["nosuchverb"]) == 2
    assert "unknown verb" in capsys.readouterr().err


# -- issue 16: messages, long-polls, fields, watch off a terminal -------------------------


@pytest.fixture
def test_agent(tmp_path):
    """A real agent with the test task kinds."""
    with agent_factory(tmp_path) as start:
        yield start(enable_test_kinds="true")


def start_sleep(agent: Any, **params: Any) -> str:
    return str(agent.call("startTask", kind="test.sleep", params=params)["taskID"])


def test_forbidden_over_tcp_says_to_use_the_socket(agent_process):
    done = cli("--url", agent_process.url, "listTasks")
    assert done.returncode == 1
    first, second = done.stderr.splitlines()[:2]
    assert first.startswith("error 401 Forbidden: ")
    assert "loopback TCP caller is anonymous" in second
    assert "--unix-socket /run/vdsm-agent/agent.sock" in second
    assert "VDSM_AGENT_SOCKET" in second
    # Over the socket, a Forbidden answer would not be about anonymity: no hint then.
    ping = cli("--url", agent_process.url, "ping")
    assert ping.returncode == 0


def test_a_long_poll_outlives_the_client_timeout(test_agent):
    task_id = start_sleep(test_agent, seconds=2.5)
    done = cli("--unix-socket", str(test_agent.socket_path), "waitTask", f"taskID={task_id}",
               "timeout=10", "--timeout", "1", "--compact", timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "done"
    assert "no answer within" not in done.stderr


def test_misspelled_fields_inside_params_get_did_you_mean(test_agent):
    socket_path = str(test_agent.socket_path)
    for words in (["params.secnds=1"], ['params={"secnds": 1}'], ["params:={\"secnds\":1}"]):
        done = cli("--unix-socket", socket_path, "startTask", "kind=test.sleep", *words)
        assert done.returncode == 2, (words, done.stderr)
        assert ("test.sleep params has no field 'secnds' (did you mean seconds?)"
                in done.stderr), done.stderr
        assert "valid fields: seconds, tick" in done.stderr
    assert test_agent.call("listTasks")["tasks"] == []  # nothing was started
    # A right one converts by the kind's schema (a number) and starts the task.
    started = cli("--unix-socket", socket_path, "--compact", "startTask", "kind=test.sleep",
                  "params.seconds=0.1", "params.fail=42")
    assert started.returncode == 0, started.stderr
    task = test_agent.call("getTask", taskID=json.loads(started.stdout)["taskID"])
    assert task["params"]["seconds"] == 0.1
    assert task["params"]["fail"] == "42"  # a string field stays a string


def test_misspelled_filter_fields(capsys):
    url = f"http://127.0.0.1:{closed_port()}"  # nothing is sent
    code, _, err = run_main(capsys, "--url", url, "listTasks", 'filter={"stat": "running"}')
    assert code == 2
    assert "listTasks filter has no field 'stat' (did you mean state?)" in err
    code, _, err = run_main(capsys, "--url", url, "listTasks", "stat=running")
    assert code == 2
    assert "listTasks has no param 'stat' (did you mean state?)" in err


@pytest.mark.parametrize(("words", "params"), [
    (["state=running", "kind=copy"], {"filter": {"state": "running", "kind": "copy"}}),
    (["state=running", "state=failed"], {"filter": {"state": ["running", "failed"]}}),
    (["filter.state=done", "pageSize=5"], {"filter": {"state": "done"}, "pageSize": 5}),
    (['filter={"kind":"copy"}', "state=done"], {"filter": {"kind": "copy", "state": "done"}}),
])
def test_filter_shorthands(capsys, words, params):
    code, out, err = run_main(capsys, "--dry-run", "listTasks", *words)
    assert code == 0, err
    assert json.loads(out)["params"] == params


def test_watch_needs_a_task_verb(capsys):
    code, _, err = run_main(capsys, "--url", f"127.0.0.1:{closed_port()}", "ping", "--watch")
    assert code == 2
    assert "--watch follows a task: use it with getTask, startTask, waitTask" in err


def test_watch_off_a_terminal(test_agent):
    socket_path = str(test_agent.socket_path)
    ok = cli("--unix-socket", socket_path, "startTask", "kind=test.sleep",
             "params.seconds=1.2", "--watch", "--compact")
    assert ok.returncode == 0, ok.stderr
    task = json.loads(ok.stdout)  # the final task, for scripts
    assert task["state"] == "done"
    lines = ok.stderr.splitlines()
    assert lines[-1].startswith(f"task {task['id']} done in ")
    assert any(line.startswith(f"test.sleep {task['id'][:8]} running") for line in lines), lines
    assert any(line.startswith(f"test.sleep {task['id'][:8]} done 100%") for line in lines)
    failed = cli("--unix-socket", socket_path, "startTask", "kind=test.sleep",
                 "params.seconds=0.1", "params.fail=no luck", "--watch")
    assert failed.returncode == 1
    assert "failed" in failed.stderr.splitlines()[-1]
    assert "no luck" in failed.stderr.splitlines()[-1]
    assert json.loads(failed.stdout)["error"]["detail"] == "no luck"


# -- tables: columns, units ------------------------------------------------------------------


TASK = {"id": "0b6f3c1e-6a3c-4f5e-9d61-1f1c2a3b4c5d", "kind": "copy", "state": "running",
        "progress": {"percent": 42.0, "done": 17616076, "total": 41943040,
                     "rate": 8388608.0, "eta": 2.9},
        "params": {"source": "/a", "destination": "/b"}, "error": None,
        "createdAt": "2026-12-06T03:39:38.185811Z", "outputSize": 965}


def test_dotted_columns_and_human_units():
    view = SchemaView(SCHEMA.document)
    table = tabulate({"tasks": [TASK], "nextPageToken": None},
                     SCHEMA.verbs["listTasks"].result, view)
    assert table is not None
    columns = ["id", "state", "progress.percent", "progress.done", "progress.rate",
               "progress.eta", "createdAt"]
    human = render_table(table, columns, Style()).splitlines()
    assert human[0].split() == ["id", "state", "percent", "done", "rate", "eta", "createdAt"]
    assert human[1].split() == [TASK["id"], "running", "42%", "16.8", "MiB", "8.0", "MiB/s",
                                "2.9s", "2026-12-06", "03:39:38Z"]
    raw = render_table(table, columns, Style(raw=True)).splitlines()
    assert raw[1].split() == [TASK["id"], "running", "42.0", "17616076", "8388608.0", "2.9",
                              "2026-12-06T03:39:38.185811Z"]


def test_one_object_is_key_value():
    view = SchemaView(SCHEMA.document)
    table = tabulate(TASK, SCHEMA.verbs["getTask"].result, view)
    assert table is not None
    assert table.key_value
    lines = dict(line.split(None, 1) for line in render_table(table, None, Style()).splitlines())
    assert lines["progress.percent"] == "42%"
    assert lines["params.source"] == "/a"
    assert lines["outputSize"] == "965 B"
    assert lines["error"] == "-"


def test_a_mapping_by_id_of_one_is_still_a_table_of_rows():
    view = SchemaView(SCHEMA.document)
    table = tabulate({"sd-1": {"uri": "nfs://a/b", "state": "connected"}},
                     SCHEMA.verbs["getStorageConnectionList"].result, view)
    assert table is not None
    assert not table.key_value
    assert table.columns == ["key", "uri", "state"]


def test_fitting_a_table_cuts_other_columns_before_ids():
    widths = fit_widths([36, 30, 12, 20], ["id", "description", "state", "uri"], 80)
    assert widths[0] == 36
    assert sum(widths) + 2 * 3 <= 80
    assert widths[1] < 30


def test_units_in_words():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(274877906944) == "256.0 GiB"
    assert human_duration(2.94) == "2.9s"
    assert human_duration(75) == "1m15s"
    assert human_duration(3700) == "1h01m"
    assert human_duration(90000) == "1d01h"
    # Progress counts bytes only for the kinds that move data.
    assert humanize("progress.done", 1048576, "copy") == "1.0 MiB"
    assert humanize("progress.done", 42, "format") is None


# -- the engine's client: the same client ----------------------------------------------------


def test_engine_call_is_the_same_client(capsys):
    from vdsm_agent.engine import main as engine_main

    port = closed_port()
    assert engine_main.main(["call", "--url", f"127.0.0.1:{port}", "listHosts"]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"vdsm-engine call: cannot reach the engine at http://127.0.0.1:{port}")
    assert "is the engine running" in err
    assert "agent" not in err
    assert engine_main.main(["call", "--help"]) == 0
    out = capsys.readouterr().out
    assert "VDSM_ENGINE_URL" in out
    assert "cannot reach the engine" in out
    assert "--unix-socket" not in out
    assert engine_main.main(["call", "listTasks", "state=running", "host=h1", "--dry-run",
                             "--compact"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == {
        "filter": {"state": "running", "host": "h1"}}
    assert engine_main.main(["call", "listHosts", "--watch"]) == 2
    assert "use it with cancelTask, getJob, getTask, startTask, waitJob" in \
        capsys.readouterr().err


def test_agent_unreachable_says_agent():
    done = cli("--unix-socket", "/nonexistent/agent.sock", "ping")
    assert "no socket at /nonexistent/agent.sock (is the agent running?)" in done.stderr


# -- shell completion ------------------------------------------------------------------------


BASH_COMPLETE = """
source /dev/stdin <<<"$SCRIPT"
COMP_LINE="$LINE"; COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<<"$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
$FUNCTION
printf '%s\\n' "${COMPREPLY[@]}"
"""


def bash_complete(script: str, function: str, line: str) -> list[str]:
    done = subprocess.run(["bash", "-c", BASH_COMPLETE], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "SCRIPT": script, "LINE": line,
                               "FUNCTION": function}, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.splitlines() if word]


def test_bash_completion_from_the_schema():
    agent_script = cli("--completion", "bash")
    assert agent_script.returncode == 0
    script = agent_script.stdout
    assert bash_complete(script, "_vdsm_agent_client", "vdsm-agent-client getT") == [
        "getTask", "getTaskKinds", "getTaskOutput"]
    assert "taskID=" in bash_complete(script, "_vdsm_agent_client",
                                      "vdsm-agent-client --unix-socket /x waitTask ")
    params = bash_complete(script, "_vdsm_agent_client", "vdsm-agent-client listTasks ")
    assert {"filter=", "state=", "kind=", "pageSize="} <= set(params)
    assert bash_complete(script, "_vdsm_agent_client",
                         "vdsm-agent-client listTasks state=ru") == ["running"]
    assert bash_complete(script, "_vdsm_agent_client", "vdsm-agent-client --wat") == ["--watch"]

    from vdsm_agent.engine import main as engine_main

    engine = subprocess.run([sys.executable, "-m", "vdsm_agent.engine.main", "call",
                             "--completion", "bash"], capture_output=True, text=True,
                            cwd=ROOT, timeout=30, check=True).stdout
    assert engine_main  # the module the console script runs
    assert bash_complete(engine, "_vdsm_engine", "vdsm-engine ca") == ["call"]
    assert bash_complete(engine, "_vdsm_engine", "vdsm-engine call waitJ") == ["waitJob"]
    assert "host=" in bash_complete(engine, "_vdsm_engine", "vdsm-engine call getTask ")


@pytest.mark.tool("zsh")
def test_zsh_completion_parses(tmp_path):
    path = tmp_path / "_vdsm-agent-client"
    path.write_text(cli("--completion", "zsh").stdout)
    done = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert path.read_text().startswith("#compdef vdsm-agent-client\n")
