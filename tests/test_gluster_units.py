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
