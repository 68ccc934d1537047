"""Request limits and hostile params against a real agent (issue 15, items 9 and 10).

* Long-polls and streams from a read-role caller used to be able to take all
  of ``max_concurrent_requests``, so that even root got ``LimitExceeded``. They
  now have their own pool (``max_long_polls``), and some ordinary slots are
  kept for admin callers.
* Params nested hundreds deep made the audit copy recurse until Python gave
  up (-32603, and the audit line was lost); ``pageSize: 5.0`` and a task
  kind's ``offset: 5.0`` passed the schema as integers and failed later. Both
  are now named errors (-32602), with the audit line written.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc_schema import MAX_PARAMS_DEPTH
from tests.support import AgentProcess, agent_factory
from vdsm_agent import errors
from vdsm_agent.security.identity import Caller
from vdsm_agent.security.limits import Limiter
from vdsm_agent.security.roles import Role

MAX_LONG_POLLS = 64  # the default (settings.py)
MAX_CONCURRENT = 256  # the default


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``start(**flags)``, a ready real agent."""
    with agent_factory(tmp_path) as start:
        yield start


def answer(agent: AgentProcess, body: bytes | str, unix: bool = True) -> Any:
    """The JSON-RPC answer to ``body`` (root over the Unix socket by default)."""
    raw = body.encode() if isinstance(body, str) else body
    status, data = agent.http("POST", "/jsonrpc", raw, unix=unix)
    assert status == 200, (status, data)
    return json.loads(data)


def call(agent: AgentProcess, method: str, unix: bool = True, **params: Any) -> Any:
    return answer(agent, json.dumps({"jsonrpc": "2.0", "method": method, "params": params,
                                     "id": 1}), unix=unix)


# -- item 9: long-polls ---------------------------------------------------------------------


def open_stream(agent: AgentProcess) -> tuple[http.client.HTTPConnection, int, bytes]:
    """``GET /events?follow=1`` over loopback TCP: the open connection, the status
    and, for a refusal, its body (a stream that was let in stays open)."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("GET", "/events?follow=1")
    response = conn.getresponse()
    body = b"" if response.status == 200 else response.read()
    return conn, response.status, body


def test_long_polls_of_a_read_caller_leave_the_agent_to_root(start_agent):
    # Every local process is a read caller on loopback TCP here; root uses the
    # Unix socket. Default limits: 256 calls at once, 64 long-polls.
    agent = start_agent(loopback_role="read")
    streams: list[http.client.HTTPConnection] = []
    try:
        statuses: dict[int, int] = {}
        refusals: list[dict[str, Any]] = []
        for _ in range(MAX_CONCURRENT + 44):
            conn, status, body = open_stream(agent)
            streams.append(conn)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                refusals.append(json.loads(body)["error"])
        assert statuses == {200: MAX_LONG_POLLS, 429: MAX_CONCURRENT + 44 - MAX_LONG_POLLS}
        assert {error["name"] for error in refusals} == {"LimitExceeded"}
        assert {error["limit"] for error in refusals} == {"max_long_polls"}
        assert {error["max"] for error in refusals} == {MAX_LONG_POLLS}
        # The long-poll verbs are refused too, at once, naming the limit...
        batch = [{"jsonrpc": "2.0", "method": "getEvents", "params": {"timeout": 30}, "id": n}
                 for n in range(3)]
        batch.append({"jsonrpc": "2.0", "method": "listTasks", "params": {}, "id": 3})
        replies = {reply["id"]: reply for reply in answer(agent, json.dumps(batch), unix=False)}
        for n in range(3):
            error = replies[n]["error"]
            assert error["code"] == errors.LimitExceeded.code
            assert error["data"]["limit"] == "max_long_polls"
        # ...while ordinary calls of the same caller still run,
        assert "result" in replies[3]
        # and root is served over the Unix socket.
        for method in ("ping", "listTasks", "getTaskKinds"):
            assert "result" in call(agent, method), method
    finally:
        for conn in streams:
            conn.close()


def test_the_long_poll_pool_and_the_admin_reserve():
    limiter = Limiter(max_total=16, max_per_connection=100, max_long_polls=4, reserved=4)
    reader = Caller("anonymous", "tcp", Role.READ)
    admin = Caller("uid:0", "unix", Role.ADMIN)
    assert [limiter.admit_long_poll(reader) for _ in range(5)] == [True] * 4 + [False]
    refusal = limiter.refusal(reader, long_poll=True)
    assert (refusal.data["limit"], refusal.data["max"]) == ("max_long_polls", 4)
    assert limiter.admit(reader, 20) == 16 - 4 - 4  # what the reserve and long-polls leave
    refusal = limiter.refusal(reader)
    assert (refusal.data["limit"], refusal.data["max"]) == ("max_concurrent_requests", 12)
    assert "kept for admin callers" in refusal.detail
    assert limiter.admit(admin, 20) == 4  # the reserve
    assert limiter.refusal(admin).data["max"] == 16
    for _ in range(4):
        limiter.release_long_poll(reader)
    limiter.release(reader, 8)
    limiter.release(admin, 4)
    assert (limiter.in_flight, limiter.long_polls, reader.in_flight, admin.in_flight) == (
        0, 0, 0, 0)
    # A small agent keeps at most a quarter of its slots for admin callers.
    assert Limiter(2, 100, reserved=16).max_ordinary == 2
    assert Limiter(256, 100, reserved=16).max_ordinary == 240


# -- item 10: integers are integers, params nest a bounded depth ------------------------------


def params_error(reply: dict[str, Any]) -> dict[str, Any]:
    assert "error" in reply, reply
    error = reply["error"]
    assert error["code"] == errors.INVALID_PARAMS, error
    assert error["data"]["name"] == "InvalidParams", error
    return dict(error["data"])


def test_an_integer_param_given_as_a_float_is_invalid_params(start_agent, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "disk.img").write_bytes(b"x" * 4096)
    agent = start_agent(allowed_root=images)
    data = params_error(call(agent, "listTasks", pageSize=5.0))
    assert (data["field"], data["rule"]) == ("params.pageSize", "type")
    assert "must be integer" in data["detail"]
    assert "result" in call(agent, "listTasks", pageSize=5)
    # A task kind's params: refused at startTask, not failed later as InternalError.
    data = params_error(call(agent, "startTask", kind="checksum",
                             params={"path": str(images / "disk.img"), "offset": 5.0}))
    assert (data["field"], data["rule"]) == ("params.params.offset", "type")
    assert call(agent, "listTasks")["result"]["tasks"] == []  # nothing was started


def nested(depth: int) -> str:
    """A JSON object nested ``depth`` levels deep."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def start_task_body(params_depth: int) -> str:
    # startTask's params object is level 1, its "params" member level 2.
    return ('{"jsonrpc":"2.0","method":"startTask","params":{"kind":"checksum","params":'
            + nested(params_depth - 1) + '},"id":1}')


@pytest.mark.parametrize("depth", [MAX_PARAMS_DEPTH + 1, 200, 500, 1000])
def test_params_nested_too_deep_are_a_named_error_and_audited(start_agent, tmp_path, depth):
    audit_log = tmp_path / "audit.log"
    agent = start_agent(audit_log=audit_log)
    data = params_error(answer(agent, start_task_body(depth)))
    assert (data["field"], data["rule"]) == ("params", "maxDepth")
    assert str(MAX_PARAMS_DEPTH) in data["detail"]
    lines = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [(line["verb"], line["outcome"], line["error"]) for line in lines] == [
        ("startTask", "error", "InvalidParams")]
    assert "result" in call(agent, "ping")  # and the agent is fine
    assert "Traceback" not in agent.log_path.read_text()


def test_params_at_the_depth_limit_reach_the_schema(start_agent):
    agent = start_agent()
    data = params_error(answer(agent, start_task_body(MAX_PARAMS_DEPTH)))
    assert data["rule"] != "maxDepth"


def test_a_body_nested_beyond_the_parser_is_a_parse_error(start_agent):
    agent = start_agent()
    reply = answer(agent, start_task_body(1100))
    assert reply["error"]["code"] == errors.PARSE_ERROR
    assert "depth" in reply["error"]["data"]
