"""The gluster CLI's XML and the status mapping, without glusterd (issue 22).

The XML is what GlusterFS 10.3 printed on this machine (tests/test_gluster.py
runs the real thing); the mapping of Gluster's statuses a real volume rarely
shows (failed, a paused or unknown status) is driven here through a task
kind whose status reads are scripted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from vdsm_agent.errors import Failure
from vdsm_agent.system import gluster
from vdsm_agent.tasks.kinds.base import Canceled, KindEnv, TaskFailure
from vdsm_agent.tasks.kinds.gluster_rebalance import GlusterRebalance
from vdsm_agent.tasks.kinds.gluster_remove_brick import GlusterRemoveBrick
from vdsm_agent.tasks.kinds.gluster_task import GlusterTask

STATUS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput><opRet>0</opRet><opErrno>0</opErrno><opErrstr/>
  <volRebalance><task-id>427201c4-29b6-4bd2-8305-52e51d3b2f09</task-id><op>3</op>
    <nodeCount>1</nodeCount>
    <node><nodeName>localhost</nodeName><files>35</files><size>700000</size>
      <lookups>200</lookups><failures>0</failures><skipped>0</skipped><status>1</status>
      <statusStr>in progress</statusStr><runtime>1.00</runtime></node>
    <aggregate><files>35</files><size>700000</size><lookups>200</lookups>
      <failures>0</failures><skipped>0</skipped><status>1</status>
      <statusStr>in progress</statusStr><runtime>1.00</runtime></aggregate>
  </volRebalance></cliOutput>"""
REFUSED = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput><opRet>-1</opRet><opErrno>30800</opErrno>
  <opErrstr>Volume nosuch does not exist</opErrstr><cliOp>volRebalance</cliOp>
  <output>Volume nosuch does not exist</output></cliOutput>"""
TASKS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput><opRet>0</opRet><opErrno>0</opErrno><opErrstr/><volStatus><volumes>
  <volume><volName>gv</volName><tasks><task><type>Remove brick</type>
    <id>832f307d-579e-4a44-afc2-5f551ec9615a</id><status>1</status>
    <statusStr>in progress</statusStr><params><brick>vm:/tmp/glx/b3</brick></params>
  </task></tasks></volume>
  <volume><volName>other</volName><tasks/></volume>
</volumes></volStatus></cliOutput>"""


def test_status_xml_is_parsed() -> None:
    root = gluster.parse(["gluster"], STATUS)
    status = gluster._task_status(root.find("volRebalance"))
    assert status == gluster.TaskStatus("427201c4-29b6-4bd2-8305-52e51d3b2f09", 1,
                                        "in progress", files=35, size=700000, lookups=200,
                                        failures=0, skipped=0, runtime=1.0)


def test_op_ret_minus_one_is_an_error_though_the_cli_exits_0() -> None:
    with pytest.raises(gluster.GlusterError, match="does not exist") as info:
        gluster.parse(["gluster"], REFUSED)
    assert info.value.op_errno == 30800
    with pytest.raises(gluster.GlusterError, match="unreadable"):
        gluster.parse(["gluster"], "Connection failed. Please check if gluster daemon")


def test_volume_tasks_lists_every_volumes_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gluster, "run", lambda args, timeout=0: gluster.parse(args, TASKS))
    assert gluster.volume_tasks() == [gluster.VolumeTask(
        "gv", "Remove brick", "832f307d-579e-4a44-afc2-5f551ec9615a", "in progress",
        ("vm:/tmp/glx/b3",))]


def test_no_cli_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gluster, "GLUSTER", "/nonexistent/gluster")
    with pytest.raises(gluster.GlusterUnavailable, match="cannot start"):
        gluster.rebalance_status("gv")


@pytest.mark.parametrize("name", ["all", "-x", "_x", "a b", "v;rm", "", "x" * 65, "force"])
def test_volume_names_the_cli_could_misread_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        gluster.check_volume(name)


@pytest.mark.parametrize("brick", ["h:relative", "-h:/x", "h:/a/../b", "h:/a//b", "h:/a/./b",
                                   "h:/a\nb", "h:/x y", "h", ":/x", "h:/"])
def test_bricks_the_cli_could_misread_are_refused(brick: str) -> None:
    with pytest.raises(ValueError):
        gluster.check_brick(brick)


class Ctx:
    """A TaskContext that records what the work says."""

    def __init__(self) -> None:
        self.env = KindEnv()
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.done = 0
        self.cancel = False
        self.external: dict[str, Any] = {}

    def progress(self, done: int, total: int | None) -> None:
        self.done = done

    def heartbeat(self) -> None:
        return None

    def print(self, line: str) -> None:
        self.lines.append(line)

    def write(self, data: bytes) -> None:
        return None

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def check_cancel(self) -> None:
        if self.cancel:
            raise Canceled()

    @property
    def cancel_requested(self) -> bool:
        return self.cancel

    def sleep(self, seconds: float) -> None:
        return None

    def throttle(self, nbytes: int) -> None:
        return None

    def report_external(self, **values: Any) -> None:
        self.external.update(values)


def scripted(*statuses: str) -> tuple[GlusterTask, Ctx, list[str]]:
    ctx = Ctx()
    stops: list[str] = []
    sequence: Iterator[str] = iter(statuses)

    class Scripted(GlusterTask):
        name = "test.gluster"
        gluster_name = "rebalance"
        description = ""
        params_schema: dict[str, Any] = {}
        result_schema: dict[str, Any] = {}

        def start(self) -> str:
            return "427201c4-29b6-4bd2-8305-52e51d3b2f09"

        def status(self) -> gluster.TaskStatus:
            return gluster.TaskStatus("427201c4-29b6-4bd2-8305-52e51d3b2f09", None,
                                      next(sequence), files=3, lookups=10, failures=1)

        def stop(self) -> None:
            stops.append("stop")

    return Scripted({"volume": "gv"}, ctx), ctx, stops


def test_completed_is_done_with_the_counts() -> None:
    task, ctx, _ = scripted("in progress", "completed")
    result = task.perform()
    assert result["status"] == "completed"
    assert (result["files"], result["scanned"], result["failures"]) == (3, 10, 1)
    assert ctx.done == 10


def test_failed_is_gluster_task_failed() -> None:
    task, _, stops = scripted("in progress", "failed")
    with pytest.raises(TaskFailure) as info:
        task.perform()
    assert info.value.name == Failure.GLUSTER_TASK_FAILED
    task.cleanup()
    assert stops == []  # it ended: nothing to stop


def test_stopped_elsewhere_is_canceled_and_not_stopped_again() -> None:
    task, ctx, stops = scripted("in progress", "stopped")
    with pytest.raises(Canceled):
        task.perform()
    task.cleanup()
    assert stops == []
    assert any("stopped outside the agent" in line for line in ctx.lines)


def test_an_unknown_status_is_a_warning_and_the_task_goes_on() -> None:
    task, ctx, _ = scripted("paused", "paused", "completed")
    assert task.perform()["status"] == "completed"
    assert ctx.warnings == ["Gluster reports the rebalance as 'paused'"]


def test_a_cancel_stops_the_gluster_task() -> None:
    task, ctx, stops = scripted("in progress", "in progress")
    ctx.cancel = True
    task.gluster_task_id = "427201c4-29b6-4bd2-8305-52e51d3b2f09"
    task.stop_needed = True
    with pytest.raises(Canceled):
        task.follow()
    task.cleanup()
    assert stops == ["stop"]


def test_a_busy_glusterd_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([gluster.GlusterError([], "Another transaction is in progress for gv. "
                                             "Please try again after some time."),
                    gluster.GlusterError([], "Another transaction is in progress"),
                    gluster.parse([], STATUS)])

    def once(args: list[str], timeout: float) -> Any:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(gluster, "_run_once", once)
    monkeypatch.setattr(gluster, "BUSY_RETRY", 0.0)
    assert gluster.rebalance_status("gv").status == "in progress"
    monkeypatch.setattr(gluster, "_run_once", lambda args, timeout: (_ for _ in ()).throw(
        gluster.GlusterError([], "Volume gv does not exist")))
    with pytest.raises(gluster.GlusterError, match="does not exist"):
        gluster.rebalance_status("gv")  # not retried


# -- the mapping on parsed answers ------------------------------------------------------------
#
# The real kinds, following a Gluster task (``glusterTaskID``: no start), with the CLI's
# answers fed in at the lowest level (``gluster._run_once``: parsed as the real ones are).
# The answers have the shape GlusterFS 10.3 printed here; "failed" (status 4, failures
# counted) is what it answered when a brick's process was killed mid-rebalance (also run
# for real: tests/test_gluster.py), the others it never printed in our runs.

GLUSTER_ID = "f2587ede-9fe3-4cbf-a431-b70e0790b4e8"


def answer(section: str, code: int | None, text: str | None, *, files: int = 8,
           size: int = 131072, lookups: int = 506, failures: int = 0) -> str:
    code_xml = "" if code is None else f"<status>{code}</status>"
    text_xml = "" if text is None else f"<statusStr>{text}</statusStr>"
    counts = (f"<files>{files}</files><size>{size}</size><lookups>{lookups}</lookups>"
              f"<failures>{failures}</failures><skipped>0</skipped>{code_xml}{text_xml}"
              "<runtime>3.00</runtime>")
    return ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<cliOutput>'
            "<opRet>0</opRet><opErrno>0</opErrno><opErrstr/>"
            f"<{section}><task-id>{GLUSTER_ID}</task-id><nodeCount>1</nodeCount>"
            f"<node><nodeName>localhost</nodeName>{counts}</node>"
            f"<aggregate>{counts}</aggregate></{section}></cliOutput>")


FORGOTTEN = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput><opRet>-1</opRet><opErrno>30800</opErrno>
  <opErrstr>{what} not started for volume gv.</opErrstr><{section}/></cliOutput>"""


def fed(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[list[str]]:
    """The CLI answers ``answers`` in turn; the argument lists it was called with."""
    calls: list[list[str]] = []
    replies = iter(answers)

    def once(args: list[str], timeout: float) -> Any:
        calls.append(list(args))
        return gluster.parse(["gluster", *args], next(replies))
    monkeypatch.setattr(gluster, "_run_once", once)
    monkeypatch.setattr(gluster, "BUSY_RETRY", 0.0)
    return calls


def test_a_failed_answer_fails_the_rebalance_with_gluster_s_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fed(monkeypatch, answer("volRebalance", 1, "in progress"),
        answer("volRebalance", 4, "failed", failures=2))
    ctx = Ctx()
    task = GlusterRebalance({"volume": "gv", "glusterTaskID": GLUSTER_ID}, ctx)
    with pytest.raises(TaskFailure) as info:
        task.perform()
    assert info.value.name == Failure.GLUSTER_TASK_FAILED
    assert info.value.data["glusterTaskID"] == GLUSTER_ID
    assert info.value.data["counts"]["failures"] == 2
    assert ctx.done == 506  # progress: files scanned
    assert "failed: 8 files (131072 bytes) moved, 506 scanned, 2 failures" in ctx.lines[-1]
    task.cleanup()  # it ended: nothing to stop (the fed answers would run out)


@pytest.mark.parametrize(("code", "text", "shown"), [
    (None, "paused", "paused"),  # a status word we do not know
    (9, None, "unknown"),  # a code past gf_defrag_status_t, no statusStr
    (None, None, "unknown"),  # neither
])
def test_a_status_we_do_not_know_is_a_warning_and_the_remove_brick_goes_on(
        monkeypatch: pytest.MonkeyPatch, code: int | None, text: str | None,
        shown: str) -> None:
    calls = fed(monkeypatch, answer("volRemoveBrick", code, text, lookups=100),
                answer("volRemoveBrick", code, text, lookups=200),
                answer("volRemoveBrick", 3, "completed", lookups=900))
    ctx = Ctx()
    task = GlusterRemoveBrick({"volume": "gv", "bricks": ["vm:/b/3"], "migrate": True,
                               "glusterTaskID": GLUSTER_ID}, ctx)
    result = task.perform()
    assert ctx.warnings == [f"Gluster reports the remove-brick as {shown!r}"]  # once
    assert any(line.startswith(f"{shown}: 8 files") for line in ctx.lines)
    assert result["status"] == "completed"
    assert result["bricks"] == ["vm:/b/3"]
    assert (result["scanned"], ctx.done) == (900, 900)
    assert calls[0] == ["remove-brick", "gv", "vm:/b/3", "status"]


@pytest.mark.parametrize(("kind", "section", "what"), [
    (GlusterRebalance, "volRebalance", "Rebalance"),
    (GlusterRemoveBrick, "volRemoveBrick", "remove-brick")])
def test_a_task_gluster_forgets_was_stopped_elsewhere_and_is_canceled(
        monkeypatch: pytest.MonkeyPatch, kind: type[GlusterTask], section: str,
        what: str) -> None:
    """GlusterFS 10.3 answers a status read right after a ``... stop`` with "not
    started" (never "stopped"): the task is canceled at once, not lost after 30 s."""
    fed(monkeypatch, answer(section, 1, "in progress"),
        FORGOTTEN.format(what=what, section=section))
    ctx = Ctx()
    task = kind({"volume": "gv", "bricks": ["vm:/b/3"], "migrate": True,
                 "glusterTaskID": GLUSTER_ID}, ctx)
    with pytest.raises(Canceled):
        task.perform()
    task.cleanup()  # not stopped again (the fed answers would run out)
    assert "stopped outside the agent" in ctx.lines[-1]
    assert "not started for volume gv" in ctx.lines[-1]


@pytest.mark.parametrize(("code", "end"), [
    (3, "done"), (7, "done"),  # completed, fix-layout completed
    (4, "failed"), (8, "failed"),  # failed, fix-layout failed
    (2, "canceled"), (6, "canceled"),  # stopped, fix-layout stopped
])
def test_an_answer_with_only_a_status_code_ends_the_task_by_its_name(
        monkeypatch: pytest.MonkeyPatch, code: int, end: str) -> None:
    """gf_defrag_status_t's codes when an answer has no statusStr (0, 1 and 5: running)."""
    fed(monkeypatch, answer("volRebalance", 0, None), answer("volRebalance", 1, None),
        answer("volRebalance", 5, None), answer("volRebalance", code, None))
    ctx = Ctx()
    task = GlusterRebalance({"volume": "gv", "glusterTaskID": GLUSTER_ID}, ctx)
    outcomes: dict[type[Exception], str] = {TaskFailure: "failed", Canceled: "canceled"}
    try:
        task.perform()
        outcome = "done"
    except (TaskFailure, Canceled) as exc:
        outcome = outcomes[type(exc)]
        failure_name = getattr(exc, "name", None)
        assert failure_name in (None, Failure.GLUSTER_TASK_FAILED)
    assert outcome == end
    assert ctx.warnings == []  # every one of them known
    assert [line.split(":")[0] for line in ctx.lines[1:4]] == [
        "not started", "in progress", "fix-layout in progress"]
