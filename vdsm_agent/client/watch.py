"""``--watch``: follow one task (or job) with a live progress bar until it is final.

A ``Follower`` knows which verbs to call (the agent's waitTask and
getTaskOutput here; the engine's waitJob and getTask in
``vdsm_agent.engine.cli``) and turns their answers into a ``Snapshot``;
``watch`` draws snapshots until one is final and returns the exit code: 0
when the task is done, 1 when it failed, was canceled or interrupted (a job:
failed or partial). Ctrl-C stops watching and leaves the task running (130).

On a terminal (stderr) rich draws one bar line: state, bar, percent, bytes
done/total, rate, ETA (the task's own figures), and the task's latest output
line under it; elsewhere one plain line per state change or tenth of the way.
The final task goes to stdout when stdout is not a terminal or a table was
asked for, so ``--watch > task.json`` keeps the outcome.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from vdsm_agent.client.schema import SchemaView
from vdsm_agent.client.units import (
    BYTE_KINDS,
    human_bytes,
    human_duration,
    human_rate,
)

if TYPE_CHECKING:
    from vdsm_agent.client.calling import Caller
    from vdsm_agent.client.program import Program

# How long one poll waits (a waitTask long-poll returns at once when the task ends).
POLL_SECONDS = 0.5
# Output read to find the latest line: the tail of what the task wrote.
OUTPUT_TAIL = 4096
FINAL_TASK_STATES = frozenset({"done", "failed", "canceled", "interrupted"})
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z ")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclasses.dataclass
class Snapshot:
    """What the watch shows at one moment."""

    title: str  # "copy 1b2c3d4e"
    state: str
    progress: Mapping[str, Any] | None = None  # percent, done, total, rate, eta
    in_bytes: bool = False  # progress counts bytes
    line: str = ""  # the task's latest output line
    final: bool = False
    ok: bool = False
    summary: str = ""  # said at the end: "done in 6.2s", "failed: Name: detail"
    result: Any = None  # the final task (or job), printed on stdout
    result_verb: str = ""  # the verb whose result schema describes ``result``
    again: str = ""  # how to look again: "vdsm-agent-client getTask taskID=..."


class Follower(Protocol):
    def poll(self, wait: float) -> Snapshot:
        """The latest snapshot, after waiting up to ``wait`` seconds for a change."""


def latest_line(data: str) -> str:
    """The last non-blank line of output (lines end with \\n or \\r: qemu-img
    redraws its progress with \\r), without its timestamp or control characters."""
    for piece in reversed(re.split(r"[\r\n]", data)):
        text = _CONTROL.sub("", piece).strip()
        if text:
            return _TIMESTAMP.sub("", text)
    return ""


def task_summary(task: Mapping[str, Any]) -> str:
    """'done in 6.2s', 'failed: PathNotAllowed: ...', from a final task."""
    state = str(task.get("state"))
    error = task.get("error")
    words = state
    took = _seconds_between(task.get("startedAt"), task.get("endedAt"))
    if took is not None:
        words += f" in {human_duration(took)}"
    if isinstance(error, dict) and error.get("name"):
        words += f": {error['name']}"
        if error.get("detail"):
            words += f": {error['detail']}"
    return words


def _seconds_between(start: Any, end: Any) -> float | None:
    from datetime import datetime

    if not isinstance(start, str) or not isinstance(end, str):
        return None
    try:
        began = datetime.fromisoformat(start.replace("Z", "+00:00"))
        ended = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max((ended - began).total_seconds(), 0.0)


class OutputTail:
    """Follows a task's output by offset (getTaskOutput), keeping its latest line."""

    def __init__(self, caller: Caller, verb: str, params: Mapping[str, Any]) -> None:
        self.caller = caller
        self.verb = verb
        self.params = dict(params)
        self.offset: int | None = None
        self.line = ""

    def update(self, size: Any, truncated_before: Any = 0) -> str:
        """Read what was written since the last call (the tail only, the first time)."""
        if not isinstance(size, int) or (self.offset is not None and size <= self.offset):
            return self.line
        start = self.offset if self.offset is not None else max(size - OUTPUT_TAIL, 0)
        if isinstance(truncated_before, int):
            start = max(start, truncated_before)
        answer = self.caller.call(self.verb, {**self.params, "offset": start,
                                              "maxBytes": 65536})
        if isinstance(answer, dict):
            line = latest_line(str(answer.get("data", "")))
            self.line = line or self.line
            next_offset = answer.get("nextOffset")
            self.offset = next_offset if isinstance(next_offset, int) else size
        return self.line


class AgentTask:
    """An agent's task: waitTask long-polls (at most ``wait``), getTaskOutput for
    the latest line. ``start``: startTask's params, to start it first."""

    def __init__(self, caller: Caller, task_id: str | None,
                 start: Mapping[str, Any] | None = None) -> None:
        self.caller = caller
        if start is not None:
            accepted = caller.call("startTask", start)
            task_id = str(accepted["taskID"])
        assert task_id is not None
        self.task_id = task_id
        self.output = OutputTail(caller, "getTaskOutput", {"taskID": task_id})

    def poll(self, wait: float) -> Snapshot:
        task = self.caller.call("waitTask", {"taskID": self.task_id, "timeout": wait})
        state = str(task.get("state"))
        line = self.output.update(task.get("outputSize"), task.get("outputTruncatedBefore"))
        kind = str(task.get("kind", ""))
        final = state in FINAL_TASK_STATES
        return Snapshot(
            title=f"{kind} {self.task_id[:8]}", state=state, progress=task.get("progress"),
            in_bytes=kind in BYTE_KINDS, line=line, final=final, ok=state == "done",
            summary=f"task {self.task_id} {task_summary(task)}", result=task,
            result_verb="getTask",
            again=f"{self.caller.program.prog} getTask taskID={self.task_id}")


def agent_watchers() -> dict[str, Any]:
    """The agent client's --watch verbs."""
    return {
        "getTask": lambda caller, params: AgentTask(caller, params["taskID"]),
        "waitTask": lambda caller, params: AgentTask(caller, params["taskID"]),
        "startTask": lambda caller, params: AgentTask(caller, None, start=params),
    }


# -- drawing --------------------------------------------------------------------------


def progress_words(snapshot: Snapshot) -> dict[str, str]:
    """The bar's text fields: percent, amount (done/total), rate, eta."""
    progress = snapshot.progress or {}
    percent = progress.get("percent")
    done, total = progress.get("done"), progress.get("total")
    rate, eta = progress.get("rate"), progress.get("eta")
    words = {"percent": f"{percent:3.0f}%" if isinstance(percent, int | float) else "   -",
             "amount": "", "rate": "", "eta": ""}
    if snapshot.in_bytes and isinstance(done, int):
        words["amount"] = (f"{human_bytes(done)}/{human_bytes(total)}"
                           if isinstance(total, int) else human_bytes(done))
    if snapshot.in_bytes and isinstance(rate, int | float) and rate > 0:
        words["rate"] = human_rate(rate)
    if isinstance(eta, int | float) and not snapshot.final:
        words["eta"] = f"ETA {human_duration(eta)}"
    return words


class PlainDisplay:
    """Not a terminal: a line per state change and per tenth of the way."""

    def __init__(self) -> None:
        self.last: tuple[str, int] | None = None

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, snapshot: Snapshot) -> None:
        words = progress_words(snapshot)
        percent = (snapshot.progress or {}).get("percent")
        step = int(percent // 10) if isinstance(percent, int | float) else -1
        if (snapshot.state, step) == self.last:
            return
        self.last = (snapshot.state, step)
        text = " ".join(part for part in (snapshot.title, snapshot.state, words["percent"].strip(),
                                          words["amount"], words["rate"], words["eta"]) if part)
        print(text, file=sys.stderr, flush=True)


class BarDisplay:
    """A terminal: rich's live progress bar, and the latest output line under it."""

    def __init__(self) -> None:
        from rich.console import Console, RenderableType
        from rich.progress import BarColumn, Progress, TextColumn
        from rich.text import Text

        class _Progress(Progress):
            line = ""

            def get_renderables(self) -> Any:
                renderables: list[RenderableType] = [self.make_tasks_table(self.tasks)]
                if self.line:
                    renderables.append(Text(self.line, no_wrap=True, overflow="ellipsis",
                                            style="dim"))
                yield from renderables

        self.console = Console(file=sys.stderr, highlight=False, emoji=False)
        self.progress = _Progress(
            TextColumn("{task.description}"),
            TextColumn("{task.fields[state]}", style="bold"),
            BarColumn(bar_width=None),
            TextColumn("{task.fields[percent]}"),
            TextColumn("{task.fields[amount]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            console=self.console, refresh_per_second=4, expand=True)
        self.task_id: Any = None

    def __enter__(self) -> BarDisplay:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.progress.stop()

    def update(self, snapshot: Snapshot) -> None:
        progress = snapshot.progress or {}
        total = progress.get("total") if isinstance(progress.get("total"), int) else None
        done: float = progress["done"] if isinstance(progress.get("done"), int) else 0
        if total is None and isinstance(progress.get("percent"), int | float):
            total, done = 100, float(progress["percent"])
        if snapshot.final and snapshot.ok and total:
            done = total
        words = progress_words(snapshot)
        fields: dict[str, Any] = {"state": snapshot.state, "percent": words["percent"],
                                  "amount": words["amount"], "rate": words["rate"],
                                  "eta": words["eta"]}
        if self.task_id is None:
            self.task_id = self.progress.add_task(snapshot.title, total=total, **fields)
        self.progress.update(self.task_id, total=total, completed=done, **fields)
        self.progress.line = snapshot.line
        self.progress.refresh()


def watch(program: Program, caller: Caller, follower: Follower,
          options: argparse.Namespace) -> int:
    """Draw the follower's snapshots until one is final; the exit code."""
    from vdsm_agent.client import command

    display: BarDisplay | PlainDisplay = (BarDisplay() if sys.stderr.isatty()
                                          else PlainDisplay())
    snapshot: Snapshot | None = None
    try:
        with display:
            while True:
                snapshot = follower.poll(POLL_SECONDS)
                display.update(snapshot)
                if snapshot.final:
                    break
    except KeyboardInterrupt:
        again = f"; see it with: {snapshot.again}" if snapshot and snapshot.again else ""
        print(f"{program.prog}: stopped watching; the task goes on{again}", file=sys.stderr)
        return command.EXIT_INTERRUPTED
    colour = command.colors_on(sys.stderr)
    mark = ("\x1b[1;32m" if snapshot.ok else "\x1b[1;31m") if colour else ""
    print(f"{mark}{snapshot.summary}{chr(27) + '[0m' if colour else ''}", file=sys.stderr)
    verb = caller.schema.verb(snapshot.result_verb)
    if verb is not None and (not sys.stdout.isatty() or command.wants_table(options)):
        command.print_result(program, snapshot.result, verb,
                             SchemaView(caller.schema.document), options)
    return command.EXIT_OK if snapshot.ok else command.EXIT_APPLICATION_ERROR
