"""Fuzzing ``POST /jsonrpc`` (hypothesis): random bodies, then schema-driven params per verb.

What must hold for every input: never HTTP 500, never a traceback or Python
exception text in a reply, only JSON-RPC answers whose error codes are the
protocol's (-32700/-32600/-32601/-32602) or those the verb declares in
``rpc_schema/agent.json`` (plus the common Forbidden/LimitExceeded) — never
-32603 — and successful results that match the verb's result schema; and the
agent still answers ``ping`` afterwards.

Why this cannot destroy anything (the fuzzer generates device paths, and the
destructive kinds wipe/format/copy are in the agent it fuzzes):

* **No task ever runs.** ``Supervisor.launch`` is replaced for the whole
  module: a task the fuzzer gets accepted stays ``accepted`` and no child
  process, hence no kind's ``perform`` (the only code that writes), ever
  starts. This alone rules out any write to a device or file.
* **The safety checks still run, but cannot say yes to a real device.** The
  exclusive-open probe (``O_EXCL`` open of the device, the last step of the
  in-use check) always answers "busy" without opening anything: no device is
  ever opened exclusively (which could also make another engineer's
  concurrent mkfs on a loop device fail), and every destructive kind refuses
  every real device with DeviceInUse. ``/dev/vda`` is also refused by the
  tables (it backs ``/``).
* **Paths are confined to a temp dir**: ``allowed_roots`` is a fresh
  directory holding one small image.
* **No command runs on the host**: storage connections use a fake runner
  that records argv lists and runs nothing, and ``system.commands.run`` only
  lets read-only probes through (``blkid``, ``qemu-img info``/``compare``,
  which the kinds' validation uses); anything else (mkfs, wipefs, a
  ``qemu-img convert``) is refused and fails the test.
* The device inventory is an empty snapshot (no blkid over every device).
* Long-polls are bounded: ``events_max_wait`` is 1 s, and before each verb's
  run every task still ``accepted`` is cancelled, so a ``waitTask`` that hits
  a task the fuzzer created returns at once.

Bounded in time: a few hundred examples per test, no deadline, no example
database (nothing is written to the checkout).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpc_schema
from tests.connections_support import FAST, FakeRunner
from tests.security_support import ThreadedAgent, from_schema, hostile_uris
from tests.tasks_support import make_image, task_config
from vdsm_agent import errors
from vdsm_agent.devices import inventory, usage
from vdsm_agent.devices.collect import Snapshot
from vdsm_agent.devices.inventory import Inventory
from vdsm_agent.system import commands
from vdsm_agent.tasks.kinds import KINDS
from vdsm_agent.tasks.supervisor import Supervisor

SCHEMA = rpc_schema.load("agent")
COMMON = {SCHEMA.errors[name]["code"] for name in SCHEMA.common_errors}
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])
HOSTILE_PATHS = [
    "/dev/vda", "/dev/vda1", "/dev/loop0", "/dev/loop7", "-rf", "--help", "/dev/../etc/passwd",
    "/etc/shadow", "/dev/null", "/dev/zero", "/dev/nonexistent", "/../../etc/passwd",
    "/dev/vda\x00", "/dev/\x1b[31m", "/tmp/a,b=c", "/" + "a" * 5000, "/dev/disk/by-id/../../vda",
    "/proc/self/mem", "/sys/block/vda/device/delete",
]

blocked_commands: list[list[str]] = []


def _no_launch(self: Supervisor, active: Any) -> Any:
    async def nothing() -> None:
        return None
    return nothing()


def _always_busy(path: str) -> usage.Reason:
    return usage.Reason(usage.BUSY, "fuzz: no device is ever opened in this test")


async def _empty_snapshot(self: Inventory) -> Snapshot:
    return Snapshot(devices=[], by_devnum={}, started=time.monotonic(), duration=0.0)


# Read-only probes the kinds' validation may run in the agent; anything else is refused.
READ_ONLY = (("blkid",), ("qemu-img", "info"), ("qemu-img", "compare"))


def _gluster_inspection(argv: Sequence[str]) -> bool:
    """``gluster ... volume info V``, ``volume status ...`` or ``... status``: a Gluster
    kind's checks at submit and the discovery of Gluster tasks read and change nothing.
    They are refused too (as if glusterd were down: GlusterCommandFailed, a documented
    error) but are not a violation."""
    words = [str(word) for word in argv]
    if os.path.basename(words[0]) != "gluster" or "volume" not in words:
        return False
    action = words[words.index("volume") + 1:]
    return action[:1] in (["info"], ["status"]) or action[-1:] == ["status"]


def _guarded(real: Any) -> Any:
    def run(argv: Sequence[str], **kwargs: Any) -> Any:
        words = (os.path.basename(str(argv[0])), *map(str, argv[1:2]))
        if any(words[:len(allowed)] == allowed for allowed in READ_ONLY):
            return real(argv, **kwargs)
        if not _gluster_inspection(argv):
            blocked_commands.append(list(argv))
        raise commands.CommandError(argv, "refused by the fuzz test")
    return run


async def _guarded_async(argv: Sequence[str], **kwargs: Any) -> Any:
    blocked_commands.append(list(argv))
    raise commands.CommandError(argv, "refused by the fuzz test")


class Fuzzed:
    def __init__(self, agent: ThreadedAgent, runner: FakeRunner, root: Path) -> None:
        self.agent = agent
        self.runner = runner
        self.root = root


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Supervisor, "launch", _no_launch)
        patch.setattr(inventory, "exclusive_open_probe", _always_busy)
        patch.setattr(Inventory, "_collect", _empty_snapshot)
        patch.setattr(commands, "run", _guarded(commands.run))
        patch.setattr(commands, "run_async", _guarded_async)
        config = task_config(root, **FAST, task_max_wait=30.0, events_max_wait=1.0,
                             max_queued_tasks=200)
        make_image(root / "images" / "disk.img", 4096)
        agent = ThreadedAgent(config)
        runner = FakeRunner()
        agent.on_loop(lambda: setattr(agent.agent.connections.context, "runner", runner))
        try:
            yield Fuzzed(agent, runner, root)
        finally:
            agent.stop()
    assert blocked_commands == [], f"the agent tried to run commands: {blocked_commands}"


def check_reply(status: int, data: bytes) -> Any:
    """What every reply must be; returns the parsed answer (None for 204)."""
    assert status in (200, 204, 413), (status, data[:500])
    if status == 204:
        assert data == b""
        return None
    text = data.decode("utf-8")
    for marker in ("Traceback", 'File "'):
        assert marker not in text, text[:2000]
    answer = json.loads(text)
    for item in answer if isinstance(answer, list) else [answer]:
        assert item.get("jsonrpc") == "2.0", item
        if "error" in item:
            assert item["error"]["code"] != errors.INTERNAL_ERROR, item
    return answer


def settle(fuzzed: Fuzzed) -> None:
    """Cancel every task the fuzzer got accepted (none ever runs), so waits end at once,
    and unmanage the connections it made (their monitors cost CPU)."""
    tasks = fuzzed.agent.call("listTasks", pageSize=1000, filter={"state": "accepted"})
    for task in tasks["result"]["tasks"]:
        fuzzed.agent.call("cancelTask", taskID=task["id"])
    listed = fuzzed.agent.call("getStorageConnectionList")["result"]
    for connection_id, status in listed.items():
        if status["managed"]:
            fuzzed.agent.call("unmanageStorageConnection", connectionID=connection_id)


def still_alive(fuzzed: Fuzzed) -> None:
    answer = fuzzed.agent.call("ping")
    assert answer["result"]["version"]


# -- 1. random and mutated bodies ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)
methods = st.sampled_from(sorted(SCHEMA.verbs)) | st.text(max_size=30)
envelopes = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0", 2.0]) | json_values,
     "method": methods | json_values},
    optional={"params": json_values | st.dictionaries(st.text(max_size=12), json_values,
                                                       max_size=4),
              "id": st.none() | st.integers() | st.text(max_size=8) | json_values,
              "extra": json_values})
valid_requests = st.sampled_from([
    {"jsonrpc": "2.0", "method": name, "params": example["params"], "id": 1}
    for name, verb in SCHEMA.verbs.items() for example in verb.examples])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request's text with a few bytes inserted, deleted or replaced."""
    data = bytearray(json.dumps(draw(valid_requests)).encode())
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from([*b'{}[]",:\\0-9aeE.+-', 0, 0xff, 0x80]))
        if action == "insert":
            data.insert(position, byte)
        elif data:
            position = min(position, len(data) - 1)
            if action == "delete":
                del data[position]
            else:
                data[position] = byte
    return bytes(data)


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    envelopes.map(lambda value: json.dumps(value).encode()),
    st.lists(envelopes, min_size=1, max_size=8).map(lambda value: json.dumps(value).encode()),
    mutated(),
)


@FUZZ
@given(body=bodies)
def test_random_bodies_never_break_the_agent(fuzzed, body):
    check_reply(*fuzzed.agent.post(body))


def test_the_agent_answers_after_random_bodies(fuzzed):
    still_alive(fuzzed)


# -- 2. schema-driven params, per verb -----------------------------------------------------


def _allowed_codes(verb: rpc_schema.Verb) -> set[int]:
    # A well-formed request to a known verb: only -32602 of the protocol codes
    # (and -32601 for a verb the agent lost), its declared errors, the common ones.
    return ({errors.INVALID_PARAMS, errors.METHOD_NOT_FOUND} | COMMON
            | {SCHEMA.errors[name]["code"] for name in verb.errors})


def _hostile_kind_params() -> st.SearchStrategy[dict[str, Any]]:
    """startTask's params.params: from each kind's own schema, path-like fields
    often replaced by hostile values."""
    options = []
    for name, kind in sorted(KINDS.items()):
        fields = [field for field in kind.params_schema.get("properties", {})
                  if field in ("path", "source", "destination", "device")]
        base = from_schema(kind.params_schema)
        if fields:
            hostile = st.fixed_dictionaries(
                {field: st.sampled_from(HOSTILE_PATHS) | st.text(max_size=60)
                 for field in fields})
            base = st.tuples(base, hostile, st.booleans()).map(
                lambda parts: {**parts[0], **parts[1]} if parts[2] else parts[0])
        options.append(st.tuples(st.just(name), base))
    return st.one_of(options).map(lambda pair: {"kind": pair[0], "params": pair[1]})


def _params_strategy(verb: rpc_schema.Verb) -> st.SearchStrategy[dict[str, Any]]:
    valid = from_schema(verb.params, SCHEMA.components)
    properties = sorted(verb.params.get("properties", {}))
    invalid = st.dictionaries(st.sampled_from([*properties, "bogus"]), json_values,
                              max_size=4)
    choices = [valid, invalid]
    if verb.name == "startTask":
        choices.append(st.tuples(valid, _hostile_kind_params()).map(
            lambda parts: {**parts[0], **parts[1]}))
    if verb.name == "manageStorageConnection":
        choices.append(st.tuples(valid, hostile_uris()).map(
            lambda parts: {**parts[0], "uri": parts[1]}))
    return st.one_of(choices)


def _check_verb(fuzzed: Fuzzed, verb: rpc_schema.Verb, params: dict[str, Any],
                outcomes: dict[Any, int]) -> None:
    body = json.dumps({"jsonrpc": "2.0", "method": verb.name, "params": params, "id": 7})
    answer = check_reply(*fuzzed.agent.post(body.encode()))
    assert answer["id"] == 7
    outcome = answer["error"]["code"] if "error" in answer else "ok"
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if "error" in answer:
        error = answer["error"]
        assert error["code"] in _allowed_codes(verb), (verb.name, params, error)
        if error["code"] > 0:
            assert error["data"]["name"] in {*verb.errors, *SCHEMA.common_errors}, error
    else:
        jsonschema.validate(answer["result"], {**verb.result, "components": SCHEMA.components})


@pytest.mark.parametrize("name", sorted(SCHEMA.verbs))
def test_schema_driven_params_get_only_documented_errors(fuzzed, name):
    verb = SCHEMA.verbs[name]
    examples = 300 if name in ("startTask", "manageStorageConnection") else 60

    outcomes: dict[Any, int] = {}
    settle(fuzzed)

    @settings(FUZZ, max_examples=examples)
    @given(params=_params_strategy(verb))
    def run(params: dict[str, Any]) -> None:
        _check_verb(fuzzed, verb, params, outcomes)

    run()
    settle(fuzzed)
    # The generator is worth something only if valid params reach the handler.
    passed = sum(count for code, count in outcomes.items() if code != errors.INVALID_PARAMS)
    assert passed > 0, f"{name}: no generated params passed the schema: {outcomes}"
    print(f"{name}: {outcomes}")
    still_alive(fuzzed)


def test_nothing_outside_the_fuzz_roots_was_accepted(fuzzed):
    """Files of accepted tasks are under the temp root; no destructive task got a device.

    (checksum may read a block device: reading is what it is for.)
    """
    answer = fuzzed.agent.call("listTasks", pageSize=1000)
    root = str(fuzzed.root.resolve())
    for task in answer["result"]["tasks"]:
        assert task["state"] in ("accepted", "canceled"), task  # none ever ran
        destructive = KINDS[task["kind"]].destructive
        for resource in task["resources"]:
            kind, _, path = resource.partition(":")
            if kind == "file":
                assert path.startswith(root + "/"), task
            if kind == "device":
                assert not destructive, task
    for argv, _ in fuzzed.runner.calls:
        for arg in argv[1:]:
            assert "\0" not in arg, argv
            assert "\n" not in arg, argv
