"""Access control, audit, redaction and limits: units, and an in-process agent.

The in-process agent's test client connects over loopback TCP from this very
process, where a caller is anonymous: the agent gives it ``loopback_role``,
which the tests set to the role they want (``default_role`` when empty).
Connection commands go to a fake runner and task processes are never launched
where a test does not need them, so nothing here touches the host's storage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import rpc_schema
from rpc_schema import openrpc
from tests.connections_support import FakeRunner
from tests.support import RpcClient
from tests.tasks_support import become_subreaper, kill_task_processes, make_image, task_config
from vdsm_agent import errors, settings
from vdsm_agent.main import build_parser
from vdsm_agent.security import audit, redact
from vdsm_agent.security.identity import (
    ANONYMOUS,
    Authenticator,
    Caller,
    certificate_names,
    peer_uid_unix,
)
from vdsm_agent.security.limits import Limiter
from vdsm_agent.security.roles import Role, RolePolicy, parse_role
from vdsm_agent.server.app import AGENT, DISPATCHER, LIMITER, make_app
from vdsm_agent.tasks.kinds import KINDS
from vdsm_agent.tasks.kinds.base import TaskKind
from vdsm_agent.tasks.supervisor import Supervisor

SCHEMA = rpc_schema.load("agent")
ME = ANONYMOUS  # who a loopback TCP caller is
NO_TASK = "00000000-0000-4000-8000-000000000000"


# -- roles and the policy ------------------------------------------------------------------


def test_roles_are_ordered_and_parsed():
    assert Role.NONE < Role.READ < Role.OPERATE < Role.ADMIN
    assert parse_role(" Operate ") is Role.OPERATE
    with pytest.raises(ValueError, match="not a role"):
        parse_role("root")


def test_certificate_names_pick_the_first_listed_name():
    policy = RolePolicy.build([("Engine.Example.com", "operate"), ("spiffe://x/y", "read")],
                              "none", agent_uid=4242)
    assert policy.for_certificate(["engine.example.com"]) is Role.OPERATE  # no case
    assert policy.for_certificate(["unlisted", "spiffe://x/y"]) is Role.READ
    assert policy.for_certificate(["unlisted"]) is Role.NONE  # default_role


def test_a_certificate_can_never_pass_for_a_local_user():
    policy = RolePolicy.build([("uid:0", "admin"), ("user:root", "admin")], "none")
    assert policy.for_certificate(["uid:0", "user:root", "UID:0"]) is Role.NONE


def test_local_users_root_and_the_agents_own_user_are_admin_by_default():
    policy = RolePolicy.build([("user:alice", "read"), ("uid:1001", "operate")], "none",
                              agent_uid=4242)
    assert policy.for_uid(0, "root") is Role.ADMIN
    assert policy.for_uid(4242, "vdsm") is Role.ADMIN
    assert policy.for_uid(1000, "alice") is Role.READ
    assert policy.for_uid(1001, None) is Role.OPERATE
    assert policy.for_uid(1002, "mallory") is Role.NONE
    # [roles] wins over the built-in rule, both ways.
    assert RolePolicy.build([("uid:0", "read")], "none").for_uid(0, "root") is Role.READ
    assert RolePolicy.build([], "read").for_uid(1002, "bob") is Role.READ


def test_certificate_names_are_cn_then_subject_alt_names():
    peercert = {
        "subject": ((("countryName", "XX"),), (("commonName", "engine1"),)),
        "subjectAltName": (("DNS", "engine1.example.com"), ("IP Address", "10.0.0.1"),
                           ("URI", "spiffe://example.com/engine"), ("DNS", "engine1")),
    }
    assert certificate_names(peercert) == ("engine1", "engine1.example.com",
                                           "spiffe://example.com/engine")
    assert certificate_names({}) == ()
    assert certificate_names(None) == ()


def test_unix_peer_credentials_give_the_peers_uid():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_uid_unix(left) == os.geteuid()


async def test_an_unidentifiable_connection_has_no_role():
    authenticator = Authenticator(RolePolicy.build([], "admin"))
    caller = await authenticator.caller(None)
    assert caller.role is Role.NONE


# -- the schema holds the role table --------------------------------------------------------


def test_every_verb_has_a_role():
    document = json.loads((Path(rpc_schema.__file__).parent / "agent.json").read_text())
    missing = [name for name, spec in document["methods"].items() if "role" not in spec]
    assert missing == [], f"add a role to these verbs in rpc_schema/agent.json: {missing}"
    assert {verb.role for verb in SCHEMA.verbs.values()} <= set(rpc_schema.ROLES)


def test_mutating_verbs_need_more_than_read():
    roles = {name: verb.role for name, verb in SCHEMA.verbs.items()}
    for name in ("startTask", "cancelTask", "deleteTask", "manageStorageConnection",
                 "unmanageStorageConnection", "refreshStorageConnection"):
        assert roles[name] == "operate", name
    assert roles["resetTaskState"] == "admin"
    assert roles["ping"] == "none"  # public, like GET /health
    for name in ("getCapabilities", "getDeviceList", "rpc.discover", "getTask",
                 "listTasks", "getTaskOutput", "waitTask", "getTaskKinds"):
        assert roles[name] == "read", name


def test_openrpc_carries_roles_and_the_common_errors():
    document = openrpc.document(SCHEMA)
    for method in document["methods"]:
        assert method["x-role"] == SCHEMA.verbs[method["name"]].role
        codes = {error["code"] for error in method["errors"]}
        assert {errors.Forbidden.code, errors.LimitExceeded.code} <= codes
    start = next(m for m in document["methods"] if m["name"] == "startTask")
    assert start["x-role-when"][0]["role"] == "admin"


def test_a_role_outside_the_known_ones_is_refused_by_the_loader():
    document = {"info": {"title": "t", "version": "1"}, "errors": {},
                "methods": {"x": {"summary": "x", "params": {}, "result": {}, "role": "root"}}}
    with pytest.raises(ValueError, match="role"):
        rpc_schema.from_document(document)


# -- settings --------------------------------------------------------------------------------


def test_roles_come_from_a_roles_section_and_from_flags(tmp_path):
    config_file = tmp_path / "agent.conf"
    config_file.write_text(
        "[agent]\ndefault_role = read\n\n"
        "[roles]\nuid:0 = admin\nuid:1000 = operate\nEngine.Example.com = operate\n")
    flags = build_parser().parse_args(["--config", str(config_file)])
    config = settings.resolve(flags.config, flags)
    assert config.default_role == "read"
    assert ("uid:0", "admin") in config.roles
    assert ("uid:1000", "operate") in config.roles
    assert ("engine.example.com", "operate") in config.roles  # INI keys are lower-cased
    # Like every list setting, flags replace what the file says (flags win).
    flags = build_parser().parse_args(["--config", str(config_file),
                                       "--role", "CN=odd=name=read"])
    assert settings.resolve(flags.config, flags).roles == [("CN=odd=name", "read")]


@pytest.mark.parametrize(("text", "message"), [
    ("[roles]\nengine = superuser\n", "not a role"),
    ("[agent]\ndefault_role = root\n", "default_role"),
    ("[agent]\nloopback_role = everything\n", "loopback_role"),
    ("[agent]\ntls_listen = nonsense\n", "tls_listen"),
    ("[agent]\ntask_max_wait = 5\n", "waitTask's default"),
])
def test_bad_security_settings_are_clear_errors(tmp_path, text, message):
    config_file = tmp_path / "agent.conf"
    config_file.write_text(text)
    with pytest.raises(settings.SettingsError, match=message):
        settings.resolve(str(config_file), build_parser().parse_args([]))


def test_security_defaults_fail_closed():
    config = settings.defaults()
    assert config.default_role == "none"
    assert config.loopback_role == ""  # loopback callers get default_role
    assert config.tls_listen is None
    assert config.roles == []


# -- redaction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "shown"), [
    ("sshfs://alice:hunter2@host/path", "sshfs://alice:***@host/path"),
    ("iscsi://user:chapsecret@10.0.0.1:3260/iqn.2024-01.x:y",
     "iscsi://user:***@10.0.0.1:3260/iqn.2024-01.x:y"),
    ("nfs://server/export?version=4&password=p4ss&x=1",
     "nfs://server/export?version=4&password=***&x=1"),
    ("nfs://a:b:c@server/x?chapSecret=q#frag", "nfs://a:***@server/x?chapSecret=***#frag"),
    ("sshfs://alice@host/path", "sshfs://alice@host/path"),
    ("not a uri", "not a uri"),
    ("://:@", "://:@"),
])
def test_uris_are_redacted(uri, shown):
    assert redact.uri(uri) == shown


def test_params_are_redacted_at_any_depth_and_paths_are_kept():
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    params = {"kind": "copy", "params": {"source": "/srv/a.img", "chapPassword": "x",
                                         "auth": {"node.session.auth.password": "y"},
                                         "identityFile": "/root/.ssh/id_rsa",
                                         "key": pem, "uri": "sshfs://u:pw@h/p"},
              "pageToken": "abc", "accessToken": "t0k"}
    shown = redact.value(params)
    assert shown["params"]["chapPassword"] == "***"
    assert shown["params"]["auth"]["node.session.auth.password"] == "***"
    assert shown["params"]["identityFile"] == "/root/.ssh/id_rsa"  # a path is not a secret
    assert shown["params"]["key"] == "***"  # key contents are
    assert shown["params"]["uri"] == "sshfs://u:***@h/p"
    assert shown["pageToken"] == "abc"
    assert shown["accessToken"] == "***"
    assert params["params"]["chapPassword"] == "x"  # the argument is not changed
    assert "hunter2" not in redact.text("mount sshfs://a:hunter2@h/x failed")


def test_audit_params_are_bounded():
    shown = audit.summarize({"a": "x" * 10000, "b": list(range(1000)), "password": "p"})
    text = json.dumps(shown)
    assert len(text) < audit.MAX_PARAMS_JSON + 100
    assert '"password": "***"' in text


# -- limits, as a unit --------------------------------------------------------------------------


def test_limiter_grants_what_is_free_and_names_the_limit():
    limiter = Limiter(max_total=5, max_per_connection=3)
    one, two = Caller("a", "tcp", Role.READ), Caller("b", "tcp", Role.READ)
    assert limiter.admit(one, 4) == 3
    assert limiter.refusal(one).data["limit"] == "max_requests_per_connection"
    assert limiter.admit(two, 3) == 2
    assert limiter.refusal(two).data["limit"] == "max_concurrent_requests"
    limiter.release(one, 3)
    limiter.release(two, 2)
    assert (limiter.in_flight, one.in_flight, two.in_flight) == (0, 0, 0)


# -- an in-process agent ----------------------------------------------------------------------


class Client:
    """JSON-RPC over the in-process agent's test client; answers as they come."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.rpc = RpcClient(client)

    @property
    def agent(self) -> Any:
        return self.client.server.app[AGENT]

    async def answer(self, method: str, **params: Any) -> dict[str, Any]:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        return dict(await self.rpc.raw(body))

    async def error(self, method: str, **params: Any) -> dict[str, Any]:
        answer = await self.answer(method, **params)
        assert "error" in answer, answer
        return dict(answer["error"])

    async def result(self, method: str, **params: Any) -> Any:
        answer = await self.answer(method, **params)
        assert "result" in answer, answer
        return answer["result"]


@pytest.fixture
def no_task_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks are accepted and recorded but never launched (no child process)."""

    async def _launch(self: Supervisor, active: Any) -> None:
        return None

    monkeypatch.setattr(Supervisor, "launch", _launch)


@pytest.fixture
async def agents(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: an in-process agent where this process has ``role``; fake command runner."""
    become_subreaper()
    made: list[Any] = []

    async def make(role: str = "admin", **overrides: Any) -> Client:
        root = tmp_path / f"agent{len(made)}"
        root.mkdir()
        overrides.setdefault("enable_test_kinds", True)
        overrides.setdefault("loopback_role", role)
        config = task_config(root, **overrides)
        made.append(config)
        client = Client(await aiohttp_client(make_app(config)))
        client.agent.connections.context.runner = FakeRunner()
        return client

    yield make
    for config in made:
        kill_task_processes(config.state_path)


def _bogus_params() -> dict[str, Any]:
    # No verb takes this member: an allowed call is refused by the schema (-32602)
    # before its handler runs, a forbidden one by its role (401) before that.
    return {"zzNotAParam": 1}


@pytest.mark.parametrize("role", ["none", "read", "operate", "admin"])
async def test_every_verb_is_refused_below_its_role_and_passes_at_it(agents, role):
    client = await agents(role)
    for name, verb in SCHEMA.verbs.items():
        error = await client.error(name, **_bogus_params())
        if parse_role(role) < parse_role(verb.role or "admin"):
            assert error["code"] == errors.Forbidden.code, (name, error)
            assert error["data"]["required"] == verb.role
            assert error["data"]["identity"] == ME
        else:
            assert error["code"] == errors.INVALID_PARAMS, (name, error)


async def test_read_can_look_but_not_change(agents, tmp_path):
    client = await agents("read")
    assert (await client.result("ping"))["version"]
    assert "checksum" in (await client.result("getCapabilities"))["taskKinds"]
    assert (await client.result("listTasks"))["tasks"] == []
    for method, params in (
            ("startTask", {"kind": "test.sleep", "params": {}}),
            ("manageStorageConnection", {"uri": f"file://{tmp_path}", "connectionID": "c"}),
            ("cancelTask", {"taskID": NO_TASK}),
            ("resetTaskState", {"taskID": NO_TASK, "state": "failed", "reason": "r"})):
        error = await client.error(method, **params)
        assert error["code"] == errors.Forbidden.code, method
        assert error["data"]["name"] == "Forbidden"
    assert client.agent.connections.monitors == {}


async def test_operate_can_start_and_manage_but_not_reset(agents, tmp_path, no_task_processes):
    client = await agents("operate")
    image = tmp_path / "agent0" / "images" / "a.img"
    make_image(image, 4096)
    started = await client.result("startTask", kind="checksum", params={"path": str(image)})
    assert started["state"] == "accepted"
    managed = await client.result("manageStorageConnection", uri=f"file://{tmp_path}",
                                  connectionID="scratch")
    assert managed["managed"] is True
    error = await client.error("resetTaskState", taskID=started["taskID"], state="failed",
                               reason="stuck")
    assert error["code"] == errors.Forbidden.code
    assert error["data"]["required"] == "admin"


async def test_a_safety_override_needs_admin(agents, no_task_processes):
    operator = await agents("operate")
    error = await operator.error("startTask", kind="format",
                                 params={"device": "/dev/nonexistent", "fstype": "ext4",
                                         "force": True})
    assert error["code"] == errors.Forbidden.code
    assert error["data"]["required"] == "admin"
    assert "with these params" in error["data"]["detail"]
    admin = await agents("admin")
    error = await admin.error("startTask", kind="format",
                              params={"device": "/dev/nonexistent", "fstype": "ext4",
                                      "force": True})
    assert error["code"] != errors.Forbidden.code  # the kind decides (DeviceNotFound, ...)


async def test_admin_can_reset(agents):
    client = await agents("admin")
    error = await client.error("resetTaskState", taskID=NO_TASK, state="failed", reason="r")
    assert error["data"]["name"] == "TaskNotFound"  # past the role check


async def test_streams_need_read(agents):
    nobody = await agents("none")
    for path in (f"/tasks/{NO_TASK}/output", "/events"):
        response = await nobody.client.get(path)
        assert response.status == 403, path
        body = await response.json()
        assert body["error"]["name"] == "Forbidden"
    assert (await nobody.client.get("/health")).status == 200  # public
    reader = await agents("read")
    assert (await reader.client.get(f"/tasks/{NO_TASK}/output")).status == 404
    assert (await reader.client.get("/events")).status == 200


async def test_batches_are_checked_member_by_member(agents):
    client = await agents("read")
    batch = [{"jsonrpc": "2.0", "method": "ping", "id": 1},
             {"jsonrpc": "2.0", "method": "deleteTask", "params": {"taskID": NO_TASK}, "id": 2}]
    answers = {item["id"]: item for item in await client.rpc.raw(json.dumps(batch))}
    assert "result" in answers[1]
    assert answers[2]["error"]["code"] == errors.Forbidden.code


# -- the audit log ---------------------------------------------------------------------------------


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(record.getMessage()) for record in caplog.records
            if record.name == "vdsm_agent.audit"]


async def test_mutating_calls_and_refusals_are_audited(agents, caplog, tmp_path,
                                                       no_task_processes):
    caplog.set_level(logging.INFO, logger="vdsm_agent.audit")
    audit_file = tmp_path / "audit.log"
    client = await agents("operate", audit_log=str(audit_file))
    image = tmp_path / "agent0" / "images" / "b.img"
    make_image(image, 4096)
    started = await client.result("startTask", kind="checksum", params={"path": str(image)})
    await client.result("getTask", taskID=started["taskID"])  # read: not audited
    await client.error("deleteTask", taskID=NO_TASK)
    await client.error("resetTaskState", taskID=NO_TASK, state="failed", reason="r")
    await client.error("startTask", kind="checksum", params={"path": "relative"})
    lines = _audit_lines(caplog)
    by_verb: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_verb.setdefault(line["verb"], []).append(line)
    assert "getTask" not in by_verb
    ok = by_verb["startTask"][0]
    assert (ok["event"], ok["outcome"]) == ("call", "ok")
    assert (ok["identity"], ok["transport"], ok["role"]) == (ME, "tcp", "operate")
    assert ok["result"]["taskID"] == started["taskID"]
    assert ok["params"]["params"]["path"] == str(image)
    assert ok["time"].endswith("Z")
    invalid = by_verb["startTask"][1]
    assert (invalid["outcome"], invalid["code"]) == ("error", errors.INVALID_PARAMS)
    deleted = by_verb["deleteTask"][0]
    assert (deleted["outcome"], deleted["error"]) == ("error", "TaskNotFound")
    refused = by_verb["resetTaskState"][0]
    assert (refused["event"], refused["required"]) == ("forbidden", "admin")
    refusal = next(r for r in caplog.records if r.name == "vdsm_agent.audit"
                   and "resetTaskState" in r.getMessage())
    assert refusal.levelno == logging.WARNING
    in_file = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [line["verb"] for line in in_file] == [line["verb"] for line in lines]
    assert os.stat(audit_file).st_mode & 0o777 == 0o640


# -- redaction through the API ---------------------------------------------------------------------


class SecretKind(TaskKind):
    """A kind with a secret param, to check what the API, logs and events show."""

    name = "test.secret"
    description = "test only"
    params_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"path": {"type": "string"},
                                    "chapPassword": {"type": "string"}}}
    result_schema: dict[str, Any] = {"type": "object"}

    def perform(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def secret_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, SecretKind.name, SecretKind)


async def test_secrets_never_show_in_answers_logs_or_events(agents, caplog, secret_kind,
                                                            no_task_processes):
    caplog.set_level(logging.DEBUG)
    client = await agents("admin")
    secret = "Sup3rS3cret-" + uuid.uuid4().hex
    # A URI with a password (CHAP is refused by iscsi, user:password by sshfs).
    for uri in (f"iscsi://user:{secret}@10.0.0.1/iqn.2024-01.test.x:y",
                f"sshfs://alice:{secret}@host/path",
                f"nfs://server/export?password={secret}"):
        error = await client.error("manageStorageConnection", uri=uri, connectionID="c1")
        assert error["data"]["name"] == "InvalidUri"
        assert secret not in json.dumps(error), error
    started = await client.result("startTask", kind="test.secret",
                                  params={"path": "/x", "chapPassword": secret})
    task = await client.result("getTask", taskID=started["taskID"])
    assert task["params"] == {"path": "/x", "chapPassword": "***"}
    listed = await client.result("listTasks")
    assert secret not in json.dumps(listed)
    events = await client.result("getEvents")
    assert secret not in json.dumps(events)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "manageStorageConnection" in logged  # the audit lines are there...
    assert secret not in logged  # ...without the secret


# -- limits through the API ----------------------------------------------------------------


async def test_a_batch_beyond_the_connection_limit_is_refused_member_by_member(agents):
    client = await agents("read", max_requests_per_connection=3)
    batch = [{"jsonrpc": "2.0", "method": "ping", "id": n} for n in range(5)]
    answers = {item["id"]: item for item in await client.rpc.raw(json.dumps(batch))}
    assert all("result" in answers[n] for n in range(3))
    for n in (3, 4):
        error = answers[n]["error"]
        assert error["code"] == errors.LimitExceeded.code
        assert error["data"]["limit"] == "max_requests_per_connection"
        assert error["data"]["max"] == 3
    assert "result" in await client.answer("ping")  # the slots were given back


async def test_beyond_the_total_limit_calls_are_refused_at_once(agents, aiohttp_client):
    client = await agents("read", max_concurrent_requests=2)
    # Two long-polls hold both slots (from two connections of the session's pool).
    holds = [asyncio.ensure_future(client.answer("getEvents", timeout=30)) for _ in range(2)]
    limiter = client.client.server.app[LIMITER]
    deadline = time.monotonic() + 20
    while limiter.in_flight < 2:
        assert time.monotonic() < deadline, "the long-polls did not start"
        await asyncio.sleep(0.02)
    started = time.monotonic()
    error = await client.error("ping")
    assert time.monotonic() - started < 10  # at once, not after the long-polls
    assert error["code"] == errors.LimitExceeded.code
    assert error["data"]["limit"] == "max_concurrent_requests"
    response = await client.client.get("/events")
    assert response.status == 429
    assert (await response.json())["error"]["name"] == "LimitExceeded"
    client.agent.events.close()  # ends the long-polls
    await asyncio.gather(*holds)
    assert limiter.in_flight == 0


async def test_wait_task_timeout_is_bounded_by_a_setting(agents):
    client = await agents("read", task_max_wait=30.0)
    error = await client.error("waitTask", taskID=NO_TASK, timeout=31)
    assert error["code"] == errors.INVALID_PARAMS
    assert error["data"]["field"] == "params.timeout"
    assert "task_max_wait" in error["data"]["detail"]
    error = await client.error("waitTask", taskID=NO_TASK, timeout=0.5)
    assert error["data"]["name"] == "TaskNotFound"


async def test_direct_dispatch_without_a_caller_is_not_restricted(agents):
    # In-process use (benchmarks, tests) has no caller: no roles, no limits.
    client = await agents("none")
    dispatcher = client.client.server.app[DISPATCHER]
    answer = json.loads(await dispatcher.dispatch(b'{"jsonrpc":"2.0","method":"ping","id":1}'))
    assert "result" in answer


def test_the_gate_is_installed_on_every_app(config):
    app = make_app(config)
    assert len(app.middlewares) == 1
    assert isinstance(app, web.Application)


async def test_loopback_role_gives_every_loopback_caller_one_role(agents):
    client = await agents("admin", loopback_role="read")
    assert "result" in await client.answer("ping")
    error = await client.error("deleteTask", taskID=NO_TASK)
    assert error["code"] == errors.Forbidden.code
    assert error["data"]["identity"] == ANONYMOUS


async def test_a_loopback_caller_is_anonymous_with_the_default_role(agents):
    # No loopback_role: default_role, whoever owns the client socket (root here).
    client = await agents("admin", loopback_role="", default_role="read")
    assert "result" in await client.answer("getTaskKinds")
    error = await client.error("deleteTask", taskID=NO_TASK)
    assert error["code"] == errors.Forbidden.code
    assert (error["data"]["identity"], error["data"]["role"]) == (ANONYMOUS, "read")
    nobody = await agents("admin", loopback_role="")  # default_role none
    assert "result" in await nobody.answer("ping")  # public
    refused = await nobody.error("getTaskKinds")
    assert (refused["data"]["identity"], refused["data"]["role"]) == (ANONYMOUS, "none")
