"""Unit tests of the task building blocks: the transition table, output segments,
page tokens, progress merging, timestamps, path confinement and process identity."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdsm_agent import errors
from vdsm_agent.common import clock, paging
from vdsm_agent.tasks import listing, output, process, reading, runtime, states
from vdsm_agent.tasks.kinds import KINDS, enabled
from vdsm_agent.tasks.kinds import paths as kind_paths
from vdsm_agent.tasks.states import State

# -- the transition table: every edge, and every non-edge --------------------------------

EDGES = {
    ("accepted", "initializing"), ("accepted", "canceled"), ("accepted", "failed"),
    ("initializing", "running"), ("initializing", "done"), ("initializing", "failed"),
    ("initializing", "canceled"), ("initializing", "interrupted"),
    ("running", "stale"), ("running", "done"), ("running", "failed"),
    ("running", "canceled"), ("running", "interrupted"),
    ("stale", "running"), ("stale", "done"), ("stale", "failed"), ("stale", "canceled"),
    ("stale", "interrupted"),
}
ALL_PAIRS = [(a.value, b.value) for a in State for b in State]


def test_state_names_are_the_contract() -> None:
    assert [s.value for s in State] == ["accepted", "initializing", "running", "stale", "done",
                                        "failed", "canceled", "interrupted"]
    assert {s.value for s in states.FINAL} == {"done", "failed", "canceled", "interrupted"}


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS)
def test_transition_table_edge(source: str, target: str) -> None:
    allowed = (source, target) in EDGES
    assert states.allowed(State(source), State(target)) is allowed
    if allowed:
        states.check_transition(State(source), State(target))
    else:
        with pytest.raises(states.IllegalTransition):
            states.check_transition(State(source), State(target))


def test_final_states_have_no_way_out() -> None:
    for state in states.FINAL:
        assert states.TRANSITIONS[state] == frozenset()
        assert states.RESET_TRANSITIONS[state] == frozenset()


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS)
def test_reset_table_edge(source: str, target: str) -> None:
    allowed = State(source) not in states.FINAL and target in ("failed", "done")
    if allowed:
        states.check_reset(State(source), State(target))
    else:
        with pytest.raises(states.IllegalTransition):
            states.check_reset(State(source), State(target))


# -- output segments ------------------------------------------------------------------------


def test_output_reads_across_segments(tmp_path: Path) -> None:
    writer = output.Writer(tmp_path, max_bytes=1 << 20)  # segments of 256 KiB
    data = bytes(range(256)) * 4096  # 1 MiB
    writer.write(data[:300_000])
    writer.write(data[300_000:])
    writer.close()
    assert len(output.list_segments(tmp_path)) == 4
    assert output.extent(tmp_path) == output.Extent(0, len(data))
    chunk = output.read(tmp_path, 200_000, 400_000)
    assert chunk.data == data[200_000:600_000]
    assert (chunk.offset, chunk.next_offset, chunk.end) == (200_000, 600_000, len(data))
    past = output.read(tmp_path, len(data) + 10, 100)
    assert past.data == b""
    assert past.next_offset == len(data) + 10


def test_output_cap_drops_oldest_segments_and_keeps_offsets(tmp_path: Path) -> None:
    writer = output.Writer(tmp_path, max_bytes=4096)  # segments of 1 KiB
    data = os.urandom(50_000)
    for start in range(0, len(data), 700):
        writer.write(data[start:start + 700])
        kept = output.extent(tmp_path)
        assert kept.end - kept.start <= 4096
    writer.close()
    kept = output.extent(tmp_path)
    assert kept.end == len(data)
    chunk = output.read(tmp_path, 0, 1 << 20)
    assert chunk.offset == chunk.truncated_before == kept.start > 0
    assert chunk.data == data[kept.start:]


def test_output_of_a_task_that_wrote_nothing(tmp_path: Path) -> None:
    chunk = output.read(tmp_path / "missing", 0, 100)
    assert (chunk.data, chunk.offset, chunk.end, chunk.truncated_before) == (b"", 0, 0, 0)


def test_utf8_cut_is_left_for_the_next_read() -> None:
    text = "héllo €".encode()
    assert reading.utf8_whole(text) == text
    assert reading.utf8_whole(text[:-1]) == "héllo ".encode()
    assert reading.utf8_whole(text[:-2]) == "héllo ".encode()
    assert reading.utf8_whole(text[:2]) == b"h"
    assert reading.utf8_whole("€".encode()[:1]) == "€".encode()[:1]  # nothing to give back


# -- page tokens, progress, timestamps ---------------------------------------------------------


def test_page_tokens_are_bound_to_their_filter() -> None:
    query = listing.parse_filter({"state": ["done"], "kind": "checksum"})
    fingerprint = listing.fingerprint(query)
    token = paging.encode_token([1700000000.123456, "abc"], fingerprint)
    key = (float, str)
    assert paging.decode_token(token, fingerprint, "listTasks", key) == (1700000000.123456, "abc")
    other = listing.fingerprint(listing.parse_filter({"state": "done"}))
    with pytest.raises(errors.InvalidParams):
        paging.decode_token(token, other, "listTasks", key)
    with pytest.raises(errors.InvalidParams):
        paging.decode_token("!!!", fingerprint, "listTasks", key)
    # A token made with the right filter but a key of the wrong shape: InvalidParams,
    # never an internal error when the key is used.
    for bad_key in (["x", "abc"], [1.5], [1.5, "abc", "extra"], "1.5"):
        crafted = paging.encode_token(bad_key, fingerprint)
        with pytest.raises(errors.InvalidParams):
            paging.decode_token(crafted, fingerprint, "listTasks", key)


def test_progress_merge_never_goes_backwards() -> None:
    progress = runtime.merge_progress(
        {"percent": None, "done": 0, "total": None, "rate": None, "eta": None},
        {"done": 50, "total": 100, "rate": 10.0, "eta": 5.0})
    assert progress == {"percent": 50.0, "done": 50, "total": 100, "rate": 10.0, "eta": 5.0}
    later = runtime.merge_progress(progress, {"done": 30, "total": 100, "rate": 1.0,
                                              "eta": 70.0})
    assert later["done"] == 50
    assert later["percent"] == 50.0
    assert runtime.completed_progress(later)["percent"] == 100.0


def test_timestamps_round_trip_through_rfc3339() -> None:
    now = clock.now()
    text = clock.rfc3339(now)
    assert text is not None
    assert text.endswith("Z")
    assert clock.parse_rfc3339(text) == now
    assert clock.parse_rfc3339("2025-01-01T01:00:00+01:00") == clock.parse_rfc3339(
        "2025-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="time zone"):
        clock.parse_rfc3339("2025-01-01T00:00:00")


# -- kinds and paths ---------------------------------------------------------------------------


def test_test_kinds_only_when_enabled() -> None:
    production = {"checksum", "copy", "format", "fsck", "gluster.rebalance",
                  "gluster.removeBrick", "gluster.removeBrickCommit", "wipe"}
    assert set(enabled(False)) == production
    assert set(enabled(True)) == set(KINDS) == production | {"test.sleep"}


def test_path_confinement_refuses_links_and_dotdot(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.img").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"y")
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "inner").symlink_to(root / "a.img")
    roots = (str(root),)
    with kind_paths.resolve(str(root / "a.img"), roots, "f") as target:
        assert (target.kind, target.path) == ("file", str(root / "a.img"))
    # A symlink is never followed, not even one that stays inside the root.
    for bad in (str(root / "escape"), str(root / "inner"), str(root / ".." / "secret"),
                str(tmp_path / "secret")):
        with pytest.raises(errors.PathNotAllowed):
            kind_paths.resolve(bad, roots, "f")
    # A sibling directory whose name starts like the root is not under it.
    sibling = tmp_path / "rootX"
    sibling.mkdir()
    (sibling / "b.img").write_bytes(b"z")
    with pytest.raises(errors.PathNotAllowed):
        kind_paths.resolve(str(sibling / "b.img"), roots, "f")
    with pytest.raises(errors.InvalidParams):
        kind_paths.resolve(str(root) + "/nul\0byte", roots, "f")


def test_a_resolved_target_reads_its_inode_whatever_the_name_becomes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.img").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"y")
    with kind_paths.resolve(str(root / "a.img"), (str(root),), "f") as target:
        (root / "a.img").rename(root / "moved.img")
        (root / "a.img").symlink_to(tmp_path / "secret")  # swapped for a link after the check
        fd = kind_paths.open_data(target)
        try:
            assert os.read(fd, 10) == b"x"
        finally:
            os.close(fd)
        assert kind_paths.size_of(target) == 1


# -- process identity (PID + start time) -------------------------------------------------------


def test_child_computes_its_start_time_like_psutil() -> None:
    import psutil

    from vdsm_agent.tasks.child import start_time

    for pid in (os.getpid(), 1):
        assert abs(start_time(pid) - psutil.Process(pid).create_time()) < 0.01


def test_process_identity_detects_pid_reuse() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import psutil

        created = psutil.Process(child.pid).create_time()
        assert process.matches(process.Identity(child.pid, created))
        # Same PID, different start time: another process that reused the PID.
        assert not process.matches(process.Identity(child.pid, created - 100))
        assert process.attach(process.Identity(child.pid, created - 100)) is None
        pidfd = process.attach(process.Identity(child.pid, created))
        assert pidfd is not None
        assert not process.exited(pidfd)
        child.kill()
        child.wait()
        time.sleep(0.05)
        assert process.exited(pidfd)
        os.close(pidfd)
    finally:
        child.kill()
        child.wait()
    assert not process.matches(process.Identity(child.pid, created))


# -- group commit --------------------------------------------------------------------------------


async def test_batch_inserter_groups_concurrent_inserts_and_isolates_failures() -> None:
    import asyncio

    from vdsm_agent.tasks.record import TaskRecord

    batches: list[list[str]] = []

    stored = TaskRecord(id="old", kind="k", params={}, request_hash="h", state=State.DONE,
                        created_at=0.0)

    async def write(records: list[TaskRecord]) -> dict[str, TaskRecord]:
        await asyncio.sleep(0.01)  # an fsync
        if any(r.id == "bad" for r in records):
            raise ValueError("constraint")
        batches.append([r.id for r in records if r.id != "old"])
        return {r.id: stored for r in records if r.id == "old"}

    written: list[str] = []
    failed: list[str] = []

    def on_written(record: TaskRecord, known: TaskRecord | None) -> TaskRecord | None:
        written.append(record.id)
        return known

    def on_failed(record: TaskRecord, error: BaseException) -> None:
        failed.append(record.id)

    inserter = runtime.BatchInserter(write, on_written, on_failed)

    def record(task_id: str) -> TaskRecord:
        return TaskRecord(id=task_id, kind="k", params={}, request_hash="", state=State.ACCEPTED,
                          created_at=0.0)

    await asyncio.gather(*(inserter.insert(record(str(i))) for i in range(20)))
    assert sorted(i for batch in batches for i in batch) == sorted(str(i) for i in range(20))
    assert len(batches) <= 2  # grouped: the first alone, the rest together
    batches.clear()
    results = await asyncio.gather(inserter.insert(record("a")), inserter.insert(record("bad")),
                                   inserter.insert(record("b")), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], ValueError)
    assert results[2] is None
    assert sorted(i for batch in batches for i in batch) == ["a", "b"]
    # An ID already stored is not written: its insert answers with the stored record.
    batches.clear()
    results = await asyncio.gather(inserter.insert(record("c")), inserter.insert(record("old")))
    assert results == [None, stored]
    assert [i for batch in batches for i in batch] == ["c"]
    # Each record is followed up once, whether it was written or not.
    assert sorted(written) == sorted([*map(str, range(20)), "a", "b", "c", "old"])
    assert failed == ["bad"]
    # A caller that goes away does not stop the follow-up of its committed record.
    batches.clear()
    waiter = asyncio.ensure_future(inserter.insert(record("d")))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.sleep(0.05)
    assert batches == [["d"]]
    assert written[-1] == "d"


async def test_insert_new_writes_new_ids_durably_and_reports_stored_ones(tmp_path: Path) -> None:
    import sqlite3
    import uuid

    from vdsm_agent.store.db import Store
    from vdsm_agent.tasks import repository
    from vdsm_agent.tasks.record import TaskRecord

    def record(request: str = "r", task_id: str | None = None) -> TaskRecord:
        return TaskRecord(id=task_id or str(uuid.uuid4()), kind="test.sleep",
                          params={"seconds": 1}, request_hash=request, state=State.ACCEPTED,
                          created_at=clock.now())

    store = await Store.open(tmp_path / "agent.db")
    try:
        # Its durable writes go through a connection that syncs every commit.
        assert await store.run(lambda: repository._durable_connection().execute(
            "PRAGMA synchronous").fetchone()[0]) == 2  # FULL
        lone, first, second = record(), record(), record()
        assert await store.run(repository.insert_new, [lone]) == {}
        assert await store.run(repository.insert_new, [first, second]) == {}
        for written in (lone, first, second):
            assert await store.run(repository.get, written.id) == written
        # An ID stored already (alone, or among new ones) is not written again:
        # the stored record is the answer, and the new ones are written.
        retry = record("other", lone.id)
        assert await store.run(repository.insert_new, [retry]) == {lone.id: lone}
        third = record()
        assert await store.run(repository.insert_new, [third, retry]) == {lone.id: lone}
        assert await store.run(repository.get, third.id) == third
        assert await store.run(repository.get, lone.id) == lone
        # A batch with a record the store refuses writes none of it.
        fourth, bad = record(), record()
        bad = dataclasses.replace(bad, kind=None)  # type: ignore[arg-type]
        with pytest.raises(sqlite3.IntegrityError):
            await store.run(repository.insert_new, [fourth, bad])
        assert await store.run(repository.get, fourth.id) is None
    finally:
        await store.close()
    # Reopened (as after a power loss), everything committed is there.
    store = await Store.open(tmp_path / "agent.db")
    try:
        assert await store.run(repository.get, third.id) == third
    finally:
        await store.close()


def test_rfc3339_matches_datetime_formatting() -> None:
    import datetime
    import random

    from vdsm_agent.common import clock

    rng = random.Random(7)
    edges = [0.0, 0.9999995, 1.0000005, 1700000000.1234565, 1700000000.9999999, 2e9 + 0.5e-6]
    samples = edges + [rng.uniform(0, 4e9) for _ in range(20000)]
    for timestamp in samples:
        expected = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
        assert clock.rfc3339(timestamp) == expected, timestamp
    assert clock.rfc3339(None) is None
