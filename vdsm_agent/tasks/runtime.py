"""In-memory companions of unfinished tasks, and small loop-side helpers."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vdsm_agent import errors
from vdsm_agent.system.space import is_no_space
from vdsm_agent.tasks import files, output
from vdsm_agent.tasks.record import TaskRecord


class Pulse:
    """Wakes every current waiter at once; later waiters wait for the next pulse."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        """The event the next ``fire`` sets (take it *before* looking at the state)."""
        return self._event


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` was set within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


@dataclasses.dataclass(eq=False)
class Active:
    """An unfinished task: its record (the truth once persisted) and its process."""

    record: TaskRecord
    state_dir: Path
    pidfd: int | None = None
    own_child: bool = False  # spawned by this agent process (so we reap it)
    zygote_child: bool = False  # forked by our zygote (it reaps it and tells the status)
    last_seq: int = -1
    last_beat: float = dataclasses.field(default_factory=time.monotonic)
    kill_timer: asyncio.TimerHandle | None = None
    finalizing: bool = False
    # Its process is gone, but its final record could not be stored yet (the
    # state disk is full): the manager tries again until it can.
    unrecorded: TaskRecord | None = None

    @property
    def id(self) -> str:
        return self.record.id

    # The asyncio objects below are made on first use. A queued task needs none
    # of them, and every object a queued task keeps is walked by each garbage
    # collection while the queue lasts: made eagerly they were 6 of its 13
    # tracked objects (with their inner events and deques), and a queue of
    # 30,000 paused the loop up to 180 ms per collection (docs/benchmarks.md,
    # "Tasks").

    @functools.cached_property
    def lock(self) -> asyncio.Lock:
        """Held for every change of the task's state."""
        return asyncio.Lock()

    @functools.cached_property
    def finished(self) -> asyncio.Event:
        """Set when the task has left memory, final."""
        return asyncio.Event()

    @functools.cached_property
    def output_pulse(self) -> Pulse:
        """Fired when the task's output grows, and when it ends."""
        return Pulse()

    @functools.cached_property
    def task_files(self) -> files.TaskFiles:
        """Its directory's paths, built on first use: a queued task needs none
        until it is launched, and the pathlib joins were a tenth of a submit."""
        return files.task_files(self.state_dir, self.id)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the monitor read for one task: its status file and output extent."""

    status: dict[str, Any] | None
    extent: output.Extent


def read_snapshots(task_dirs: list[files.TaskFiles]) -> list[Snapshot]:
    """Blocking: run in a worker thread. Small files only."""
    snapshots = []
    for task_files in task_dirs:
        status = files.read_json(task_files.status)
        snapshots.append(Snapshot(status if isinstance(status, dict) else None,
                                  output.extent(task_files.output)))
    return snapshots


@dataclasses.dataclass(frozen=True)
class FinalFiles:
    outcome: dict[str, Any] | None
    status: dict[str, Any] | None
    extent: output.Extent


def read_final(task_files: files.TaskFiles) -> FinalFiles:
    """Blocking: the outcome, last status and output extent of an ended task. The
    room allocated for an outcome it never wrote is given back."""
    files.remove_quietly(task_files.outcome_room)
    outcome = files.read_json(task_files.outcome)
    status = files.read_json(task_files.status)
    return FinalFiles(outcome if isinstance(outcome, dict) else None,
                      status if isinstance(status, dict) else None,
                      output.extent(task_files.output))


def merge_progress(old: dict[str, Any], reported: dict[str, Any] | None) -> dict[str, Any]:
    """Progress that never goes backwards: done and percent only grow."""
    if not reported:
        return old
    done = max(int(old.get("done") or 0), int(reported.get("done") or 0))
    total = reported.get("total")
    if total is None:
        total = old.get("total")
    percent = old.get("percent")
    if total:
        percent = max(percent or 0.0, min(100.0, round(done * 100.0 / total, 2)))
    return {"percent": percent, "done": done, "total": total,
            "rate": reported.get("rate"), "eta": reported.get("eta")}


def completed_progress(progress: dict[str, Any]) -> dict[str, Any]:
    total = progress.get("total")
    done = max(int(progress.get("done") or 0), int(total or 0))
    return {**progress, "percent": 100.0, "done": done, "eta": 0.0}


def write_spec(task_files: files.TaskFiles, spec: dict[str, Any]) -> None:
    """Blocking: create the task directory and its spec before spawning, and the
    room for its outcome, so that it can record how it ended on a full disk."""
    task_files.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    files.write_json_atomic(task_files.spec, spec)
    try:
        files.preallocate(task_files.outcome_room, files.OUTCOME_ROOM)
    except OSError as exc:
        if is_no_space(exc):
            raise
        # A filesystem without fallocate: the outcome is written as it comes.


class BatchInserter:
    """Group commit for new tasks: concurrent submits share one durable transaction.

    ``insert`` queues a record and returns a future of its caller's answer.
    While one commit (an fsync) is in flight the next records gather and go
    together in the following one, so throughput grows with concurrency
    instead of being one fsync per task. ``write_batch`` returns the records
    already stored under one of the batch's IDs (those are not written).

    Right after its batch is committed, ``on_written(record, stored)`` runs on
    the loop (``stored``: the record already stored under its ID, else None)
    and its return value, or exception, is the answer; a record that cannot be
    written gets ``on_failed(record, error)`` instead. Both run whether or not
    the caller still waits, so a committed row is always followed up (no row
    without a manager), and no task per insert is needed for that.
    """

    def __init__(self, write_batch: Callable[[list[TaskRecord]],
                                             Awaitable[dict[str, TaskRecord]]],
                 on_written: Callable[[TaskRecord, TaskRecord | None], Any],
                 on_failed: Callable[[TaskRecord, BaseException], None]) -> None:
        self._write_batch = write_batch
        self._on_written = on_written
        self._on_failed = on_failed
        self._waiting: list[tuple[TaskRecord, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def insert(self, record: TaskRecord) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((record, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        batch: list[tuple[TaskRecord, asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    stored = await self._write_batch([record for record, _ in batch])
                except errors.StorageFull as exc:
                    # No record of the batch was written, and none would be alone.
                    for record, future in batch:
                        self._fail(record, future, exc)
                    batch = []
                    continue
                except Exception:
                    # One bad record must not fail its neighbours: retry one by one.
                    while batch:
                        await self._write_one(*batch[0])
                        batch.pop(0)
                    continue
                for record, future in batch:
                    self._answer(record, future, stored.get(record.id))
                batch = []
        except BaseException as exc:  # cancelled (the agent stops): nothing was written
            for record, future in [*batch, *self._waiting]:
                self._on_failed(record, exc)
                future.cancel()
            self._waiting = []
            raise

    async def _write_one(self, record: TaskRecord, future: asyncio.Future[Any]) -> None:
        try:
            stored = await self._write_batch([record])
        except Exception as exc:
            self._fail(record, future, exc)
        else:
            self._answer(record, future, stored.get(record.id))

    def _fail(self, record: TaskRecord, future: asyncio.Future[Any],
              error: BaseException) -> None:
        self._on_failed(record, error)
        if not future.done():
            future.set_exception(error)

    def _answer(self, record: TaskRecord, future: asyncio.Future[Any],
                stored: TaskRecord | None) -> None:
        """Follow a written record up; its answer goes to the caller if it still waits."""
        try:
            answer = self._on_written(record, stored)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(answer)
