"""A task's progress reaches getTask promptly, with a true rate (issue 16).

What was seen: a rate-limited copy (qemu-img -r 8M) showed ``progress: null``
while qemu-img's output already said 34%, then moved in steps of 2-3 s, at
"15.8 MiB/s". The causes, each with a test here that fails on the old code:

* the task process wrote its progress only with its heartbeat (every
  ``heartbeat_interval``, 2 s): now new progress is in the status file within
  ``PROGRESS_INTERVAL`` (a new total at once), and the agent reads status files
  every quarter second;
* the rate was measured from the start of the run, and qemu-img counts a chunk
  when it takes it, not when it is written (18 MiB of a 64 MiB copy in 10 ms,
  then 8 MiB/s): now the rate looks back half the run (at most 10 s) and waits
  a second, so that burst leaves the window.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import AgentProcess, agent_factory
from tests.tasks_support import kill_task_processes
from vdsm_agent.tasks import child, files

MiB = 1024 * 1024
RATE = 8 * MiB


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(child.time, "monotonic", fake)
    return fake


def context(tmp_path: Path, heartbeat: float = 2.0) -> child.ChildContext:
    task_files = files.TaskFiles(tmp_path / "task")
    task_files.dir.mkdir()
    spec = {"taskID": "0b6f3c1e-6a3c-4f5e-9d61-1f1c2a3b4c5d", "heartbeatInterval": heartbeat,
            "outputMaxBytes": 1 << 20}
    ctx = child.ChildContext(task_files, spec)
    ctx.heartbeat(force=True)  # as the task process does first
    return ctx


def written(ctx: child.ChildContext) -> dict[str, Any]:
    progress = json.loads(ctx.files.status.read_text())["progress"]
    assert isinstance(progress, dict)
    return progress


def test_new_progress_is_written_within_a_quarter_second(tmp_path, clock):
    ctx = context(tmp_path, heartbeat=2.0)
    clock.now += 0.3
    ctx.progress(0, 64 * MiB)  # the total is known: written at once
    assert written(ctx)["total"] == 64 * MiB
    clock.now += 0.01
    ctx.progress(18 * MiB, 64 * MiB)
    clock.now += 0.25
    ctx.heartbeat()  # the tool's pump calls this every round
    assert written(ctx)["done"] == 18 * MiB  # not 2 s later with the heartbeat


def test_the_rate_is_not_inflated_by_a_burst_at_the_start(tmp_path, clock):
    """qemu-img convert -p -r 8M of 64 MiB of random data, as measured: 28% at once,
    then 3.125% (2 MiB) every 0.25 s."""
    ctx = context(tmp_path)
    clock.now += 0.3
    ctx.progress(0, 64 * MiB)
    clock.now += 0.01
    ctx.progress(18 * MiB, 64 * MiB)  # the claims of the first chunks
    rates = []
    done = 18 * MiB
    for _ in range(16):  # 4 s
        for _ in range(5):
            clock.now += 0.05
            ctx.heartbeat()
        done += 2 * MiB
        ctx.progress(done, 64 * MiB)
        rate = written(ctx)["rate"]
        if rate is not None:
            rates.append(rate / MiB)
    assert rates, "no rate within 4 s"
    assert all(6.5 <= rate <= 9.5 for rate in rates), rates  # the old estimate: 12-40
    eta = written(ctx)["eta"]
    assert eta is not None
    assert abs(eta - (64 * MiB - done) / RATE) < 0.5


# -- a real copy ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("progress")
    images = root / "images"
    images.mkdir()
    with open(images / "random.img", "wb") as image:
        for _ in range(40):
            image.write(os.urandom(MiB))
    with agent_factory(root) as start:
        agent = start(allowed_root=str(images), task_io_rate_limit=RATE)
        try:
            yield agent
        finally:
            kill_task_processes(agent.state_dir)


@pytest.mark.slow
@pytest.mark.tool("qemu-img")
def test_a_rate_limited_copy_shows_prompt_progress_and_its_true_rate(agent):
    images = Path(agent.call("getCapabilities")["allowedRoots"][0])
    started = time.monotonic()
    task_id = agent.call("startTask", kind="copy", params={
        "source": str(images / "random.img"), "destination": str(images / "copy.img")})["taskID"]
    changes: list[tuple[float, float | None, float | None]] = []
    while True:
        task = agent.call("getTask", taskID=task_id)
        progress = task["progress"] or {}
        seen = (progress.get("percent"), progress.get("rate"))
        if task["state"] == "running" and (not changes or changes[-1][1:] != seen):
            changes.append((time.monotonic() - started, *seen))
        if task["state"] in ("done", "failed", "canceled", "interrupted"):
            break
        time.sleep(0.05)
    assert task["state"] == "done", task
    percents = [(at, percent) for at, percent, _ in changes if percent]
    # Prompt: a percentage within a second of the start, then no 2-s steps.
    assert percents[0][0] < 1.2, changes
    moves = [at for (_, before), (at, percent) in itertools.pairwise(percents)
             if percent != before]
    gaps = [later - earlier for earlier, later in itertools.pairwise(moves)]
    assert max(gaps) < 1.2, changes
    # True: the rate never doubles the limit (the old estimate said 15.8 MiB/s).
    rates = [rate / MiB for _, _, rate in changes if rate]
    assert rates, changes
    assert max(rates) < 10.5, changes
    assert 6.0 < task["progress"]["rate"] / MiB < 9.0, task["progress"]
