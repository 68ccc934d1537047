"""JSON-RPC 2.0 transport: the specification's own examples and our error mapping."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from aiohttp import web

import rpc_schema
from vdsm_agent import errors
from vdsm_agent.server.jsonrpc import Dispatcher

PING = {"jsonrpc": "2.0", "method": "ping", "id": 1}


# -- the examples of https://www.jsonrpc.org/specification#examples ------------------


async def test_call_with_invalid_json_is_parse_error(rpc):
    answer = await rpc.raw('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert answer["error"]["code"] == -32700
    assert answer["error"]["message"] == "Parse error"
    assert answer["id"] is None


async def test_call_with_invalid_request_object(rpc):
    answer = await rpc.raw('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert answer["error"]["code"] == -32600
    assert answer["id"] is None


async def test_batch_with_invalid_json_is_one_parse_error(rpc):
    answer = await rpc.raw('[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
                           '{"jsonrpc": "2.0", "method"]')
    assert isinstance(answer, dict)
    assert answer["error"]["code"] == -32700


async def test_empty_array_is_one_invalid_request(rpc):
    answer = await rpc.raw("[]")
    assert isinstance(answer, dict)
    assert answer["error"]["code"] == -32600
    assert answer["id"] is None


@pytest.mark.parametrize("body", ["[1]", "[1,2,3]"])
async def test_invalid_batch_members_each_get_an_error(rpc, body):
    answer = await rpc.raw(body)
    assert isinstance(answer, list)
    assert len(answer) == len(json.loads(body))
    assert all(item["error"]["code"] == -32600 and item["id"] is None for item in answer)


async def test_mixed_batch_answers_each_member_on_its_own(rpc):
    batch = [
        {"jsonrpc": "2.0", "method": "ping", "id": "1"},
        {"jsonrpc": "2.0", "method": "ping"},  # notification
        {"jsonrpc": "2.0", "method": "getCapabilities", "params": {}, "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "getDeviceList", "params": {"paths": [7]}, "id": "9"},
    ]
    answer = await rpc.raw(json.dumps(batch))
    by_id: dict[Any, Any] = {}
    for item in answer:
        by_id.setdefault(item["id"], []).append(item)
    assert len(answer) == 5  # the notification gets no reply
    assert by_id["1"][0]["result"]["version"]
    assert by_id["2"][0]["result"]["apiVersion"] == "1.0"
    assert by_id[None][0]["error"]["code"] == -32600
    assert by_id["5"][0]["error"]["code"] == -32601
    assert by_id["9"][0]["error"]["code"] == -32602


async def test_batch_of_notifications_gets_no_content(rpc):
    body = json.dumps([{"jsonrpc": "2.0", "method": "ping"},
                       {"jsonrpc": "2.0", "method": "nosuchverb"}])
    assert await rpc.raw(body, status=204) is None


async def test_single_notification_gets_no_content(rpc):
    assert await rpc.raw('{"jsonrpc": "2.0", "method": "ping"}', status=204) is None


# -- envelope, ids and params ----------------------------------------------------------


@pytest.mark.parametrize("member", [
    {"jsonrpc": "1.0", "method": "ping", "id": 1},
    {"method": "ping", "id": 1},
    {"jsonrpc": "2.0", "method": "ping", "params": "x", "id": 1},
    {"jsonrpc": "2.0", "method": "ping", "id": {"a": 1}},
    {"jsonrpc": "2.0", "method": "ping", "id": 1, "extra": True},
    "ping",
])
async def test_malformed_envelopes_are_invalid_requests(rpc, member):
    answer = await rpc.raw(json.dumps(member))
    assert answer["error"]["code"] == -32600
    assert answer["id"] is None


@pytest.mark.parametrize("ident", ["abc", 7, 1.5, None])
async def test_ids_are_echoed(rpc, ident):
    answer = await rpc.raw(json.dumps({**PING, "id": ident}))
    assert answer["id"] == ident
    assert "result" in answer


async def test_empty_positional_params_are_accepted(rpc):
    answer = await rpc.raw(json.dumps({**PING, "params": []}))
    assert "result" in answer


async def test_positional_params_are_refused_with_a_reason(rpc):
    body = {"jsonrpc": "2.0", "method": "getDeviceList", "params": [["/dev/x"]], "id": 1}
    answer = await rpc.raw(json.dumps(body))
    assert answer["error"]["code"] == -32602
    assert answer["error"]["data"]["rule"] == "paramStructure"


@pytest.mark.parametrize(("params", "field", "rule"), [
    ({"paths": "/dev/loop0"}, "params.paths", "type"),
    ({"paths": [1]}, "params.paths[0]", "type"),
    ({"paths": ["/etc/passwd"]}, "params.paths[0]", "pattern"),
    ({"unknown": 1}, "params", "additionalProperties"),
])
async def test_schema_violations_name_field_and_rule(rpc, params, field, rule):
    body = {"jsonrpc": "2.0", "method": "getDeviceList", "params": params, "id": 3}
    answer = await rpc.raw(json.dumps(body))
    error = answer["error"]
    assert error["code"] == -32602
    assert error["data"]["name"] == "InvalidParams"
    assert error["data"]["field"] == field
    assert error["data"]["rule"] == rule
    assert answer["id"] == 3


async def test_method_not_found_names_the_method(rpc):
    answer = await rpc.raw(json.dumps({**PING, "method": "pong"}))
    assert answer["error"] == {"code": -32601, "message": "Method not found", "data": "pong"}


# -- limits and HTTP -------------------------------------------------------------------


async def test_oversized_body_is_a_clear_error(rpc, config):
    body = json.dumps({**PING, "params": {"pad": "x" * config.max_body_size}})
    response = await rpc.client.post("/jsonrpc", data=io.BytesIO(body.encode()))
    assert response.status == 413
    answer = json.loads(await response.read())
    assert answer["error"]["code"] == -32600
    assert answer["error"]["data"]["name"] == "LimitExceeded"


async def test_overlong_batch_is_refused(rpc, config):
    body = json.dumps([PING] * (config.max_batch + 1))
    answer = await rpc.raw(body)
    assert answer["error"]["code"] == -32600
    assert answer["error"]["data"]["limit"] == "max_batch"


async def test_health(rpc):
    response = await rpc.client.get("/health")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_get_on_jsonrpc_is_method_not_allowed_not_500(rpc):
    response = await rpc.client.get("/jsonrpc")
    assert response.status == 405


# -- the one translation point -----------------------------------------------------------


TEST_SCHEMA = {
    "info": {"title": "t", "version": "1"},
    "errors": {"DeviceNotFound": {"code": 300, "description": "x"}},
    "methods": {
        name: {"summary": name, "params": {"type": "object"}, "result": {}, "errors": []}
        for name in ("boom", "missing", "echo")
    },
}


async def _boom(context: Any) -> Any:
    raise RuntimeError("secret internal detail /etc/shadow")


async def _missing(context: Any) -> Any:
    raise errors.DeviceNotFound("no such device", path="/dev/sdz")


async def _echo(context: Any, value: int = 0) -> Any:
    return {"value": value}


@pytest.fixture
async def translation_client(aiohttp_client):
    dispatcher = Dispatcher(rpc_schema.from_document(TEST_SCHEMA),
                            {"boom": _boom, "missing": _missing, "echo": _echo},
                            context=None, max_batch=10)

    async def handle(request: web.Request) -> web.Response:
        answer = await dispatcher.dispatch(await request.read())
        return web.Response(body=answer or b"", status=200 if answer else 204)

    app = web.Application()
    app.router.add_post("/", handle)
    return await aiohttp_client(app)


async def _call(client, method, **params):
    response = await client.post("/", data=json.dumps(
        {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}))
    return json.loads(await response.read())


async def test_unexpected_exception_is_internal_error_with_correlation_id(
        translation_client, caplog):
    with caplog.at_level(logging.ERROR):
        answer = await _call(translation_client, "boom")
    error = answer["error"]
    assert error["code"] == -32603
    assert "secret" not in json.dumps(answer)
    correlation_id = error["data"]["correlationId"]
    assert correlation_id in caplog.text
    assert "secret internal detail" in caplog.text  # the log has it, the caller does not


async def test_agent_error_maps_to_its_code_and_name(translation_client):
    answer = await _call(translation_client, "missing")
    assert answer["error"]["code"] == 300
    assert answer["error"]["data"] == {"name": "DeviceNotFound", "path": "/dev/sdz",
                                       "detail": "no such device"}


async def test_handler_param_mismatch_is_invalid_params_not_internal(translation_client):
    answer = await _call(translation_client, "echo", other=1)
    assert answer["error"]["code"] == -32602


def test_handlers_must_match_the_schema():
    with pytest.raises(RuntimeError, match="missing"):
        Dispatcher(rpc_schema.from_document(TEST_SCHEMA), {"boom": _boom}, None, 10)
