"""The events feed: the feed itself, getEvents on in-process agents (real task
processes, real file:// connections), GET /events, real agent processes and curl.

Timing asserts are upper bounds with a generous margin (the test machine's CPUs
are shared), never tight lower bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support import RpcClient, RpcFailure, check_result
from tests.tasks_support import (
    agent_runner,
    become_subreaper,
    in_process_agents,
    kill_task_processes,
    task_config,
)
from vdsm_agent.events import feed as feed_module
from vdsm_agent.events.feed import EventFeed
from vdsm_agent.server.app import AGENT, make_app

# Fast connection probing (as in tests/connections_support.FAST).
CONNECTIONS_FAST = {
    "probe_interval": 0.3,
    "probe_failures": 2,
    "probe_recoveries": 2,
    "backoff_base": 0.2,
    "backoff_cap": 1.0,
    "backoff_floor": 0.2,
}
PROMPT = 10.0  # "at once", on a loaded shared machine
_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


async def call(rpc: RpcClient, method: str, **params: Any) -> Any:
    """Like ``RpcClient.call`` but safe for concurrent calls (own request IDs)."""
    ident = next(_ids)
    answer = await rpc.raw(json.dumps({"jsonrpc": "2.0", "method": method, "params": params,
                                       "id": ident}))
    assert answer["id"] == ident
    if "error" in answer:
        raise RpcFailure(answer["error"])
    check_result(method, answer["result"])
    return answer["result"]


async def fails(rpc: RpcClient, method: str, **params: Any) -> RpcFailure:
    with pytest.raises(RpcFailure) as info:
        await call(rpc, method, **params)
    return info.value


def _rpc_only(rpc: RpcClient, root: Path, config: Any) -> RpcClient:
    return rpc


@pytest.fixture
async def agents(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """Factory of in-process agents (task test kinds on); kills task processes after."""
    async with in_process_agents(aiohttp_client, tmp_path, _rpc_only) as make:
        yield make


def feed_of(rpc: RpcClient) -> EventFeed:
    feed: EventFeed = rpc.app[AGENT].events
    return feed


async def collect(rpc: RpcClient, since: int, done: Callable[[list[dict[str, Any]]], bool],
                  timeout: float = 30.0, **match: Any) -> tuple[list[dict[str, Any]], int]:
    """Long-poll getEvents from ``since`` until ``done(events matching match)``."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while not done(found):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"not seen within {timeout}s: {found}"
        page = await call(rpc, "getEvents", since=since, timeout=min(5.0, remaining))
        assert page["gap"] is False, page
        found += [e for e in page["events"] if all(e.get(k) == v for k, v in match.items())]
        since = page["nextSince"]
    return found, since


def waiters(feed: EventFeed) -> int:
    """Coroutines parked on the feed's current pulse (asyncio.Event internals)."""
    return len(feed._pulse.current()._waiters)


def publish_task_event(feed: EventFeed, number: int = 0) -> None:
    """A schema-valid task event, for tests that need events at will."""
    feed.publish("task", {"taskID": f"task-{number}", "kind": "test.sleep", "state": "running",
                          "previousState": "initializing", "progress": None,
                          "change": "state"})


async def until_waiting(feed: EventFeed, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while waiters(feed) < count:
        assert time.monotonic() < deadline, f"{waiters(feed)} of {count} waiters parked"
        await asyncio.sleep(0.02)


# -- the feed itself ---------------------------------------------------------------------


def test_sequence_numbers_and_epoch() -> None:
    feed = EventFeed()
    assert len(feed.epoch) == 32
    assert int(feed.epoch, 16) >= 0
    assert EventFeed().epoch != feed.epoch
    empty = feed.read(0)
    assert (empty.events, empty.next_since, empty.oldest_seq, empty.last_seq, empty.gap) == (
        [], 0, 1, 0, False)
    for number in range(3):
        feed.publish("test", {"n": number}, 1700000000.5)
    page = feed.read(0)
    assert [e["seq"] for e in page.events] == [1, 2, 3]
    assert page.events[0] == {"seq": 1, "at": "2023-11-14T22:13:20.500000Z", "type": "test",
                              "n": 0}
    assert (page.next_since, page.oldest_seq, page.last_seq, page.gap) == (3, 1, 3, False)
    assert page.to_api()["epoch"] == feed.epoch
    rest = feed.read(3)
    assert (rest.events, rest.next_since, rest.gap) == ([], 3, False)
    first_two = feed.read(0, max_events=2)
    assert [e["seq"] for e in first_two.events] == [1, 2]
    assert first_two.next_since == 2
    assert [e["seq"] for e in feed.read(1, epoch=feed.epoch).events] == [2, 3]


def test_falling_behind_the_bound_is_a_gap() -> None:
    feed = EventFeed(max_events=5)
    for number in range(12):
        feed.publish("test", {"n": number})
    assert (feed.oldest_seq, feed.last_seq) == (8, 12)
    for since in (0, 6):
        page = feed.read(since)
        assert page.gap is True
        assert [e["seq"] for e in page.events] == [8, 9, 10, 11, 12]
        assert page.next_since == 12
        assert page.oldest_seq == 8
    page = feed.read(7)  # nothing missed: 8 is the next one
    assert page.gap is False
    assert [e["seq"] for e in page.events] == [8, 9, 10, 11, 12]
    # Slices from either end of the deque.
    assert [e["seq"] for e in feed.read(7, max_events=2).events] == [8, 9]
    assert [e["seq"] for e in feed.read(9, max_events=2).events] == [10, 11]
    gapped = feed.read(6, max_events=2)
    assert gapped.gap
    assert [e["seq"] for e in gapped.events] == [8, 9]
    assert gapped.next_since == 9


def test_another_epoch_or_a_future_position_is_a_gap() -> None:
    feed = EventFeed()
    for number in range(3):
        feed.publish("test", {"n": number})
    other = feed.read(2, epoch="0" * 32)
    assert other.gap is True
    assert [e["seq"] for e in other.events] == [1, 2, 3]
    assert other.next_since == 3
    ahead = feed.read(50)  # a position from an earlier epoch, without the epoch
    assert ahead.gap is True
    assert [e["seq"] for e in ahead.events] == [1, 2, 3]
    fresh = EventFeed()
    nothing = fresh.read(7, epoch=feed.epoch)
    assert (nothing.gap, nothing.events, nothing.next_since, nothing.oldest_seq) == (
        True, [], 0, 1)


async def test_progress_is_throttled_and_never_lost_before_a_transition() -> None:
    feed = EventFeed(progress_interval=0.3)

    def transition(task: str, old: str | None, new: str, done: int) -> None:
        feed.on_task_transition({"taskID": task, "kind": "k", "from": old, "to": new,
                                 "at": "2025-01-01T00:00:00.000000Z",
                                 "progress": progress(done)})

    def progress(done: int) -> dict[str, Any]:
        return {"percent": done / 10, "done": done, "total": 1000, "rate": None, "eta": None}

    def report(task: str, done: int, state: str = "running") -> None:
        feed.on_task_progress({"taskID": task, "kind": "k", "state": state,
                               "progress": progress(done), "at": "2025-01-01T00:00:00Z"})

    transition("a", None, "running", 0)
    report("a", 1)
    report("a", 2)  # within the interval of the transition: held back
    assert feed.last_seq == 1
    transition("a", "running", "done", 2)  # carries the held-back progress
    await asyncio.sleep(0.6)
    events = feed.read(0).events
    assert [(e["state"], e["change"], e["progress"]["done"]) for e in events] == [
        ("running", "state", 0), ("done", "state", 2)]
    assert events[0]["previousState"] is None
    assert events[1]["previousState"] == "running"
    report("a", 3, "done")  # progress of a final task is not an event
    assert feed.last_seq == 2

    transition("b", None, "running", 0)
    started = time.monotonic()
    done = 0
    while time.monotonic() - started < 1.2:
        done += 1
        report("b", done)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.6)  # the trailing update
    elapsed = time.monotonic() - started
    updates = [e for e in feed.read(2).events if e["change"] == "progress"]
    assert updates, "no progress event"
    assert len(updates) <= elapsed / 0.3 + 1, updates
    assert updates[-1]["progress"]["done"] == done  # the latest one is delivered
    assert all(e["state"] == e["previousState"] == "running" for e in updates)
    assert all(e["type"] == "task" and e["taskID"] == "b" for e in updates)
    feed.close()


async def test_stream_reports_a_gap_and_goes_on_from_the_oldest() -> None:
    feed = EventFeed(max_events=5)
    stream = feed.stream(0, follow=True)
    hello = await anext(stream)
    assert hello[0]["type"] == "hello"
    assert hello[0]["epoch"] == feed.epoch
    for number in range(3):
        feed.publish("test", {"n": number})
    assert [e["seq"] for e in await anext(stream)] == [1, 2, 3]
    for number in range(20):  # the reader falls behind the bound
        feed.publish("test", {"n": number})
    gap = await anext(stream)
    assert gap[0]["type"] == "gap"
    assert gap[0]["since"] == 3
    assert gap[0]["oldestSeq"] == 19
    assert [e["seq"] for e in await anext(stream)] == [19, 20, 21, 22, 23]
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    feed.publish("test", {"n": "late"})
    assert [e["seq"] for e in await asyncio.wait_for(waiting, PROMPT)] == [24]
    ending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    feed.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(ending, PROMPT)


# -- getEvents on an in-process agent ----------------------------------------------------


async def test_task_transitions_and_progress_appear_in_order(agents: Any) -> None:
    rpc = await agents(events_progress_interval=0.3)
    start = await call(rpc, "getEvents")
    answer = await call(rpc, "startTask", kind="test.sleep", params={"seconds": 2.5})
    task_id = answer["taskID"]
    events, _ = await collect(
        rpc, start["nextSince"], lambda found: any(e["state"] == "done" for e in found),
        type="task", taskID=task_id)
    transitions = [e for e in events if e["change"] == "state"]
    assert [(e["previousState"], e["state"]) for e in transitions] == [
        (None, "accepted"), ("accepted", "initializing"), ("initializing", "running"),
        ("running", "done")]
    assert all(e["kind"] == "test.sleep" for e in events)
    assert transitions[-1]["progress"]["percent"] == 100.0
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    updates = [e for e in events if e["change"] == "progress"]
    assert updates, "no progress events"
    assert all(e["state"] == e["previousState"] == "running" for e in updates)
    dones = [e["progress"]["done"] for e in updates]
    assert dones == sorted(dones)
    # Throttled: the task reports every ~0.1 s; the feed passes one per 0.3 s.
    assert len(updates) <= 2.5 / 0.3 + 2, updates
    task = await call(rpc, "getTask", taskID=task_id)
    assert task["state"] == "done"


async def test_connection_state_changes_appear(agents: Any, tmp_path: Path) -> None:
    rpc = await agents(**CONNECTIONS_FAST)
    directory = tmp_path / "data"
    directory.mkdir()
    start = await call(rpc, "getEvents")
    await call(rpc, "manageStorageConnection", uri=f"file://{directory}", connectionID="ev-1")
    events, since = await collect(rpc, start["nextSince"],
                                  lambda found: bool(found), type="connection")
    first = events[0]
    assert first["connectionIDs"] == ["ev-1"]
    assert first["uri"] == f"file://{directory}"
    assert (first["previousState"], first["state"], first["error"]) == (
        "connecting", "connected", None)
    directory.rmdir()
    events, since = await collect(rpc, since, lambda found: bool(found), type="connection")
    assert (events[0]["previousState"], events[0]["state"]) == ("connected", "disconnected")
    assert events[0]["error"]["code"] == "ENOENT"
    assert set(events[0]["error"]) >= {"code", "message", "at", "time"}
    directory.mkdir()
    events, _ = await collect(rpc, since, lambda found: any(
        e["state"] == "connected" for e in found), type="connection")
    assert events[-1]["state"] == "connected"
    assert events[-1]["error"] is None


async def test_long_poll_returns_when_an_event_arrives_and_after_its_timeout(rpc) -> None:
    feed = feed_of(rpc)
    since = (await call(rpc, "getEvents"))["lastSeq"]
    began = time.monotonic()
    quiet = await call(rpc, "getEvents", since=since, timeout=0.5)
    assert time.monotonic() - began >= 0.45
    assert (quiet["events"], quiet["nextSince"], quiet["gap"]) == ([], since, False)

    waiting = asyncio.ensure_future(call(rpc, "getEvents", since=since, timeout=50))
    await until_waiting(feed, 1)
    began = time.monotonic()
    feed.publish("task", {"taskID": "x", "kind": "k", "state": "running",
                          "previousState": "initializing", "progress": None,
                          "change": "state"})
    answer = await asyncio.wait_for(waiting, PROMPT)
    assert time.monotonic() - began < PROMPT
    assert [e["seq"] for e in answer["events"]] == [since + 1]
    assert answer["nextSince"] == since + 1
    assert answer["lastSeq"] == since + 1


async def test_two_hundred_waiters_wait_on_one_event(agents: Any) -> None:
    rpc = await agents(max_long_polls=200)  # 64 long-polls at once by default
    feed = feed_of(rpc)
    since = feed.last_seq
    url = rpc.client.make_url("/jsonrpc")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def long_poll(number: int) -> dict[str, Any]:
            body = {"jsonrpc": "2.0", "method": "getEvents", "id": number,
                    "params": {"since": since, "timeout": 55}}
            async with session.post(url, json=body) as response:
                answer = await response.json()
            check_result("getEvents", answer["result"])
            return dict(answer["result"])

        polls = [asyncio.ensure_future(long_poll(n)) for n in range(200)]
        await until_waiting(feed, 200, timeout=60)
        # Parked, not polling: the agent still answers at once.
        began = time.monotonic()
        assert (await call(rpc, "ping"))["version"]
        assert time.monotonic() - began < PROMPT
        assert not any(poll.done() for poll in polls)
        feed.publish("connection", {"connectionIDs": ["c"], "uri": "file:///x",
                                    "state": "connected", "previousState": "connecting",
                                    "error": None})
        answers = await asyncio.wait_for(asyncio.gather(*polls), 30)
    assert all([e["seq"] for e in a["events"]] == [since + 1] for a in answers)
    assert waiters(feed) == 0


async def test_gap_over_rpc_after_falling_behind_and_for_another_epoch(agents: Any) -> None:
    rpc = await agents(events_max=3)
    feed = feed_of(rpc)
    base = feed.last_seq
    for number in range(10):
        publish_task_event(feed, number)
    page = await call(rpc, "getEvents", since=base, timeout=5)
    assert page["gap"] is True
    assert page["oldestSeq"] == base + 8
    assert page["lastSeq"] == base + 10
    assert [e["seq"] for e in page["events"]] == [base + 8, base + 9, base + 10]
    assert page["nextSince"] == base + 10
    caught_up = await call(rpc, "getEvents", since=page["nextSince"], epoch=page["epoch"])
    assert caught_up["gap"] is False
    assert caught_up["events"] == []
    other = await call(rpc, "getEvents", since=base + 10, epoch="another-agent", timeout=30)
    assert other["gap"] is True
    assert other["epoch"] == feed.epoch
    assert [e["seq"] for e in other["events"]] == [base + 8, base + 9, base + 10]


async def test_bad_params_are_refused(agents: Any) -> None:
    rpc = await agents(events_max_wait=5)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"since": -1}, "params.since"),
        ({"since": "3"}, "params.since"),
        ({"timeout": -1}, "params.timeout"),
        ({"timeout": "soon"}, "params.timeout"),
        ({"maxEvents": 0}, "params.maxEvents"),
        ({"maxEvents": 10001}, "params.maxEvents"),
        ({"epoch": ""}, "params.epoch"),
        ({"epoch": 7}, "params.epoch"),
    ]
    for params, field in bad:
        failure = await fails(rpc, "getEvents", **params)
        assert failure.code == -32602, (params, failure)
        assert failure.data["field"] == field, (params, failure)
    unknown = await fails(rpc, "getEvents", follow=True)
    assert unknown.code == -32602
    # The maximum follows the setting events_max_wait (5 here).
    above = await fails(rpc, "getEvents", timeout=5.5)
    assert above.code == -32602
    assert above.name == "InvalidParams"
    assert above.data["field"] == "params.timeout"
    assert above.data["maximum"] == 5
    answer = await call(rpc, "getEvents", timeout=5, epoch="elsewhere")  # gap: at once
    assert answer["gap"] is True


# -- GET /events and shutdown -------------------------------------------------------------


async def test_stream_endpoint_sends_ndjson_lines(rpc) -> None:
    feed = feed_of(rpc)
    publish_task_event(feed, 1)
    response = await rpc.client.get("/events")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in (await response.text()).splitlines()]
    assert lines[0]["type"] == "hello"
    assert lines[0]["epoch"] == feed.epoch
    assert [line["seq"] for line in lines[1:]] == list(range(1, feed.last_seq + 1))

    since = feed.last_seq
    async with rpc.client.get(f"/events?follow=1&since={since}") as follow:
        hello = json.loads(await asyncio.wait_for(follow.content.readline(), PROMPT))
        assert hello["type"] == "hello"
        assert hello["lastSeq"] == since
        assert not hello["gap"]
        publish_task_event(feed, 2)
        line = json.loads(await asyncio.wait_for(follow.content.readline(), PROMPT))
        assert (line["seq"], line["taskID"]) == (since + 1, "task-2")
    for query in ("since=-1", "since=x", "follow=maybe"):
        refused = await rpc.client.get(f"/events?{query}")
        assert refused.status == 400
        assert (await refused.json())["error"]["name"] == "InvalidParams"


class Served:
    """An agent app served like the daemon serves it (``web.AppRunner``: handlers
    are not cancelled when their client goes away, unlike aiohttp's test server)."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = task_config(tmp_path)
        self.app = make_app(self.config)
        self.runner = web.AppRunner(self.app)
        self.cleaned = False

    async def __aenter__(self) -> Served:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cleanup()
        kill_task_processes(self.config.state_path)

    async def cleanup(self) -> None:
        if not self.cleaned:
            self.cleaned = True
            await self.runner.cleanup()

    @property
    def feed(self) -> EventFeed:
        feed: EventFeed = self.app[AGENT].events
        return feed

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}{path}"


async def test_a_stream_ends_when_its_client_goes_away(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(feed_module, "STREAM_IDLE_CHECK", 0.2)
    async with Served(tmp_path) as served, aiohttp.ClientSession() as session:
        response = await session.get(served.url("/events?follow=1"))
        assert json.loads(await response.content.readline())["type"] == "hello"
        await until_waiting(served.feed, 1)
        response.close()  # the client goes away without a word
        deadline = time.monotonic() + PROMPT
        while waiters(served.feed):
            assert time.monotonic() < deadline, "the stream still follows the feed"
            await asyncio.sleep(0.05)


async def test_shutdown_releases_long_polls_and_streams(tmp_path: Path) -> None:
    async with Served(tmp_path) as served, aiohttp.ClientSession() as session:
        body = {"jsonrpc": "2.0", "method": "getEvents", "id": 1,
                "params": {"since": served.feed.last_seq, "timeout": 60}}

        async def long_poll() -> dict[str, Any]:
            async with session.post(served.url("/jsonrpc"), json=body) as response:
                return dict(await response.json())

        poll = asyncio.ensure_future(long_poll())
        stream = await session.get(served.url("/events?follow=1"))
        assert json.loads(await stream.content.readline())["type"] == "hello"
        await until_waiting(served.feed, 2)
        began = time.monotonic()
        await asyncio.wait_for(served.cleanup(), 30)
        answer = await asyncio.wait_for(poll, PROMPT)
        assert answer["result"]["events"] == []
        assert answer["result"]["gap"] is False
        assert await asyncio.wait_for(stream.content.read(), PROMPT) == b""
        assert time.monotonic() - began < 20


# -- real agent processes -------------------------------------------------------------------


def test_a_restarted_agent_has_a_new_epoch(tmp_path: Path) -> None:
    with agent_runner(tmp_path) as runner:
        first = runner.start().call("getEvents")
        runner.agent.stop()
        agent = runner.start()
        second = agent.call("getEvents", since=first["lastSeq"], epoch=first["epoch"])
        assert second["epoch"] != first["epoch"]
        assert second["gap"] is True
        again = agent.call("getEvents", since=second["nextSince"], epoch=second["epoch"])
        assert again["gap"] is False


def _line_reader(stream: Any) -> tuple[queue.Queue[bytes], threading.Thread]:
    """Lines of ``stream`` as they come (b"" at its end), read by a thread."""
    lines: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        for line in iter(stream.readline, b""):
            lines.put(line)
        lines.put(b"")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


@pytest.mark.tool("curl")
def test_curl_follows_the_stream(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    curl = shutil.which("curl") or "curl"
    with agent_runner(tmp_path) as runner:
        agent = runner.start()
        # One stream whose client goes away before an event, one before the shutdown.
        gone_before_event, gone_before_stop = (subprocess.Popen(
            [curl, "-sS", "-N", "--unix-socket", str(agent.socket_path),
             "http://localhost/events?follow=1"],
            stdout=subprocess.PIPE) for _ in range(2))
        readers = [_line_reader(gone_before_event.stdout), _line_reader(gone_before_stop.stdout)]
        try:
            for lines, _ in readers:
                hello = json.loads(lines.get(timeout=20))
                assert hello["type"] == "hello"
                assert hello["follow"] is True
            agent.call("manageStorageConnection", uri=f"file://{tmp_path}/data",
                       connectionID="curl-1")
            for lines, _ in readers:
                deadline = time.monotonic() + 30
                while True:
                    line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
                    assert line, "the stream ended"
                    event = json.loads(line)
                    if event["type"] == "connection":
                        break
                assert event["connectionIDs"] == ["curl-1"]
                assert event["state"] == "connected"
            # A dump over the Unix socket ends by itself.
            dump = subprocess.run(
                [curl, "-sS", "--unix-socket", str(agent.socket_path),
                 "http://localhost/events"], capture_output=True, timeout=30, check=True)
            dumped = [json.loads(line) for line in dump.stdout.splitlines()]
            assert dumped[0]["type"] == "hello"
            assert dumped[0]["follow"] is False
            assert any(e.get("connectionIDs") == ["curl-1"] for e in dumped[1:])
            # Clients going away: the agent ends those streams quietly, on the next
            # event or at shutdown.
            gone_before_event.terminate()
            gone_before_event.wait(timeout=10)
            since = agent.call("getEvents")["lastSeq"]
            agent.call("manageStorageConnection", uri=f"file://{tmp_path}/other",
                       connectionID="curl-2")
            assert agent.call("getEvents", since=since, timeout=30)["events"]
            gone_before_stop.terminate()
            gone_before_stop.wait(timeout=10)
            agent.stop()
            assert agent.proc.returncode == 0
            assert "Traceback" not in agent.log_path.read_text(errors="replace")
        finally:
            for proc, (_, reader) in zip((gone_before_event, gone_before_stop), readers,
                                         strict=True):
                proc.kill()
                proc.wait(timeout=10)
                reader.join(timeout=10)  # EOF once curl is gone
                assert proc.stdout is not None
                proc.stdout.close()
