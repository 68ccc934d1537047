"""Followers of the agent's streams against real agent processes (issue 15, item 11):
``GET /events?follow=1`` and ``GET /tasks/{id}/output?follow=1``.

* An idle stream sends keep-alives (a ``keepalive`` line; a NUL byte on the
  output stream when asked for), so that proxies and clients do not time it out.
* Slow followers (sockets that ask and never read) cost a bounded amount of
  the agent's memory while they are connected, and it is given back when they
  go (RSS of the agent process, with psutil).
* A follower that takes nothing for ``stream_stall_timeout`` is disconnected.

Followers use the agent's Unix socket (root there is admin; a loopback TCP
caller is anonymous). Events come from file:// connections managed and
unmanaged in JSON-RPC batches: one ``connection`` event per manage, a thousand
a second, and nothing else grows meanwhile (no task records). Their paths are
long (~700 bytes: about 0.9 KB an event) so that what a follower holds shows
clearly in the RSS.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import AgentProcess, UnixHTTPConnection
from tests.tasks_support import AgentRunner, agent_runner, become_subreaper, until

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
KEEPALIVE = 0.5  # stream_keepalive_interval of these agents
CONNECTIONS = 100  # file:// targets, one event each per round
RING = 1000  # events_max of the memory test's agent


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


@contextlib.contextmanager
def follow(agent: AgentProcess, path: str,
           timeout: float = 10) -> Iterator[http.client.HTTPResponse]:
    """``GET path`` over the Unix socket; the response, read as it comes."""
    conn = UnixHTTPConnection(str(agent.socket_path), timeout)
    conn.connect()
    sock = conn.sock
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        yield response
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a Pump thread blocked reading it
        conn.close()


def rpc_batch(agent: AgentProcess, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    body = json.dumps([{"jsonrpc": "2.0", "method": method, "params": params, "id": number}
                       for number, (method, params) in enumerate(calls)]).encode()
    status, data = agent.http("POST", "/jsonrpc", body, unix=True, timeout=60)
    assert status == 200, data
    answers = json.loads(data)
    assert all("result" in answer for answer in answers), answers[:3]
    return list(answers)


class Events:
    """Makes ``connection`` events: manage (one event each), then unmanage, 100 targets."""

    def __init__(self, runner: AgentRunner) -> None:
        deep = runner.images
        for part in "abc":
            deep = deep / (part * 220)  # long URIs: bigger events
        self.dirs = [deep / f"d{n}" for n in range(CONNECTIONS)]
        for directory in self.dirs:
            directory.mkdir(parents=True)

    def round(self, agent: AgentProcess) -> None:
        """CONNECTIONS more events, published by the time it returns."""
        goal = last_seq(agent) + len(self.dirs)
        rpc_batch(agent, [("manageStorageConnection", {"uri": f"file://{d}",
                                                       "connectionID": f"c{n}"})
                          for n, d in enumerate(self.dirs)])
        # Each is connected (its event) once its first probe answers.
        until(lambda: last_seq(agent) >= goal, timeout=30, interval=0.01,
              what="the connection events")
        rpc_batch(agent, [("unmanageStorageConnection", {"connectionID": f"c{n}"})
                          for n in range(len(self.dirs))])

    def produce(self, agent: AgentProcess, count: int) -> None:
        for _ in range(-(-count // len(self.dirs))):
            self.round(agent)


def last_seq(agent: AgentProcess) -> int:
    return int(agent.call("getEvents", unix=True, maxEvents=1)["lastSeq"])


def slow_follower(agent: AgentProcess, path: str = "/events?follow=1") -> socket.socket:
    """A client that asks to follow and never reads a byte."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(agent.socket_path))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return sock


def rss(agent: AgentProcess) -> float:
    return float(psutil.Process(agent.proc.pid).memory_info().rss) / MiB


# -- keep-alives -------------------------------------------------------------------------


def test_an_idle_events_stream_sends_keepalive_lines(tmp_path: Path) -> None:
    with agent_runner(tmp_path, stream_keepalive_interval=KEEPALIVE) as runner:
        agent = runner.start()
        with follow(agent, "/events?follow=1") as stream:
            hello = json.loads(stream.readline())
            assert hello["type"] == "hello"
            began = time.monotonic()
            alive = [json.loads(stream.readline()) for _ in range(3)]
            took = time.monotonic() - began
            for line in alive:
                assert set(line) == {"type", "at", "lastSeq"}  # no seq: not an event
                assert line["type"] == "keepalive"
                assert line["lastSeq"] == hello["lastSeq"]
            assert took < 3 * KEEPALIVE + 5  # an upper bound with room for a loaded host
            # Events still come, between keep-alives.
            task_id = agent.call("startTask", unix=True, kind="test.sleep",
                                 params={"seconds": 0.1})["taskID"]
            while (line := json.loads(stream.readline()))["type"] == "keepalive":
                pass
            assert (line["type"], line["taskID"], line["seq"]) == ("task", task_id,
                                                                   hello["lastSeq"] + 1)


class Pump:
    """Reads a stream in a thread, so that the test can wait for bytes with a deadline."""

    def __init__(self, stream: http.client.HTTPResponse) -> None:
        self._pieces: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()
        self.ended = False

    def _run(self, stream: http.client.HTTPResponse) -> None:
        try:
            while piece := stream.read1(4096):
                self._pieces.put(piece)
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass  # the test closed it (http.client is not made to be closed by another thread)
        self._pieces.put(b"")

    def read_for(self, seconds: float) -> bytes:
        """What comes within ``seconds`` (less if the stream ends)."""
        data = b""
        deadline = time.monotonic() + seconds
        while not self.ended and (left := deadline - time.monotonic()) > 0:
            try:
                piece = self._pieces.get(timeout=left)
            except queue.Empty:
                break
            self.ended = not piece
            data += piece
        return data

    def rest(self, timeout: float = 30) -> bytes:
        """Everything until the stream ends (within ``timeout``)."""
        data = self.read_for(timeout)
        assert self.ended, "the stream did not end"
        return data


def test_a_silent_tasks_output_stream_sends_nul_bytes_when_asked(tmp_path: Path) -> None:
    with agent_runner(tmp_path, stream_keepalive_interval=KEEPALIVE) as runner:
        agent = runner.start()
        task_id = agent.call("startTask", unix=True, kind="test.sleep",
                             params={"seconds": 60, "printEvery": 0})["taskID"]
        until(lambda: agent.call("getTask", unix=True, taskID=task_id)["state"] == "running",
              timeout=30)
        path = f"/tasks/{task_id}/output?follow=1"
        with follow(agent, path) as plain:  # without keepalive=1: the exact bytes only
            assert b"\0" not in Pump(plain).read_for(4 * KEEPALIVE)
        with follow(agent, path + "&keepalive=1") as stream:
            pump = Pump(stream)
            head = pump.read_for(4 * KEEPALIVE + 1)
            assert head.count(b"\0") >= 2, head
            agent.call("cancelTask", unix=True, taskID=task_id)
            body = head + pump.rest()  # the stream ends with the task
        output = agent.call("getTaskOutput", unix=True, taskID=task_id, maxBytes=MiB)
        assert output["eof"] is True
        assert body.replace(b"\0", b"").decode() == output["data"]


# -- slow followers ----------------------------------------------------------------------


def test_slow_followers_cost_bounded_memory_given_back_when_they_go(tmp_path: Path) -> None:
    followers = 60
    # Streams count against max_long_polls (64 by default): room for these and the test's.
    with agent_runner(tmp_path, events_max=RING, stream_stall_timeout=600,
                      max_long_polls=followers + 20) as runner:
        events = Events(runner)
        agent = runner.start()
        events.produce(agent, RING)  # a full ring: what a new follower (since=0) gets first
        for _ in range(3):  # warm up: followers that read it all
            status, dump = agent.http("GET", "/events", unix=True)
            assert status == 200
            assert dump.count(b"\n") > RING
        time.sleep(1.5)
        baseline = rss(agent)

        slow = [slow_follower(agent) for _ in range(followers)]
        try:
            peak = rss(agent)
            for _ in range(3):  # the ring turns over while they hold their streams
                events.produce(agent, RING // 2)
                time.sleep(0.5)
                peak = max(peak, rss(agent))
            status, _ = agent.http("GET", "/health", unix=True)
            assert status == 200
        finally:
            for sock in slow:
                sock.close()
        print(f"\nRSS with {followers} slow followers: baseline {baseline:.1f} MiB, "
              f"peak {peak:.1f} MiB (+{peak - baseline:.1f})")
        # Each holds ~130 KiB of the agent's memory (64 KiB of unsent data, a piece, a
        # batch); it held ~1.5 MB each before (a 1000-event batch, encoded and buffered).
        assert peak - baseline < 16, (baseline, peak)
        # Given back soon after they left (glibc keeps freed heap pages until
        # malloc_trim: +5.5 MiB stayed without it, and +47 MiB before the bound).
        after = until(lambda: (now := rss(agent)) < baseline + 4.5 and now, timeout=10,
                      what=f"RSS back near {baseline:.1f} MiB (now {rss(agent):.1f})")
        print(f"RSS after they left: {after:.1f} MiB (+{after - baseline:.1f})")


def test_slow_output_followers_memory_is_given_back(tmp_path: Path) -> None:
    followers = 20
    with agent_runner(tmp_path, stream_stall_timeout=600,
                      max_long_polls=followers + 20) as runner:
        agent = runner.start()
        task_id = agent.call("startTask", unix=True, kind="test.sleep", params={
            "seconds": 60, "outputBytes": 8 * MiB, "printEvery": 0})["taskID"]
        until(lambda: agent.call("getTask", unix=True, taskID=task_id)["outputSize"]
              >= 8 * MiB, timeout=60, what="8 MiB of output")
        status, _ = agent.http("GET", f"/tasks/{task_id}/output", unix=True)  # warm up
        assert status == 200
        time.sleep(1.5)
        baseline = rss(agent)
        slow = [slow_follower(agent, f"/tasks/{task_id}/output?follow=1")
                for _ in range(followers)]
        try:
            time.sleep(2)
            peak = rss(agent)
        finally:
            for sock in slow:
                sock.close()
        print(f"\nRSS with {followers} slow output followers: baseline {baseline:.1f} MiB, "
              f"peak {peak:.1f} MiB (+{peak - baseline:.1f})")
        # Each holds one read of the task's output (1 MiB, tasks/manager.py) and at
        # most 128 KiB of unsent data; before, also that read again, buffered whole.
        assert peak - baseline < 1.5 * followers, (baseline, peak)
        # Given back once they left: before, the handlers' frames (and their 1 MiB
        # reads) hung on a reference cycle of asyncio's until a full collection.
        after = until(lambda: (now := rss(agent)) < baseline + 4.5 and now, timeout=10,
                      what=f"RSS back near {baseline:.1f} MiB (now {rss(agent):.1f})")
        print(f"RSS after they left: {after:.1f} MiB (+{after - baseline:.1f})")
        agent.call("cancelTask", unix=True, taskID=task_id)


def test_a_follower_that_takes_nothing_is_dropped(tmp_path: Path) -> None:
    stall = 2.0
    with agent_runner(tmp_path, stream_stall_timeout=stall) as runner:
        events = Events(runner)
        agent = runner.start()
        events.produce(agent, 1000)  # ~0.9 MB to send: more than the socket buffers take
        stalled = slow_follower(agent)  # takes nothing
        trickle = slow_follower(agent)  # takes 32 KiB every 0.2 s: slow, but reading
        with follow(agent, "/events?follow=1") as stream:  # and one that reads at once
            reader = Pump(stream)
            trickle.settimeout(10)
            taken = 0
            ends = time.monotonic() + 2.5 * stall
            while time.monotonic() < ends:
                piece = trickle.recv(32768)
                assert piece, "the slow follower was dropped"
                taken += len(piece)
                time.sleep(0.2)
            stalled.settimeout(15)
            received = 0
            while piece := stalled.recv(65536):  # what the socket holds, then the end
                received += len(piece)
            assert 0 < received < 900_000  # not all of it: dropped
            stalled.close()
            events.round(agent)
            data = b""
            deadline = time.monotonic() + 30
            while data.count(b'"seq"') < 1000 + CONNECTIONS and time.monotonic() < deadline:
                data += reader.read_for(1)
            lines = [json.loads(line) for line in data.splitlines()]
            assert lines[0]["type"] == "hello"
            seqs = [line["seq"] for line in lines if "seq" in line]
            assert seqs == list(range(1, 1000 + CONNECTIONS + 1))  # it got everything
            trickle.settimeout(10)
            while taken < 900_000:  # and the slow one gets it all too, at its pace
                piece = trickle.recv(65536)
                assert piece, "the slow follower was dropped"
                taken += len(piece)
        trickle.close()
        logs = runner.logs()
        dropped = [line for line in logs.splitlines() if "dropped a follower" in line]
        assert len(dropped) == 1, dropped
        assert "stream_stall_timeout" in dropped[0]
        assert "Traceback" not in logs
