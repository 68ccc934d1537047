"""Gluster rebalance and remove-brick as agent tasks, against real GlusterFS (issue 22).

glusterd on this host (the session's, tests/connections_support.py), a
distributed volume of 2-3 bricks under tmp per test, files written through a
FUSE mount and their sha256 read back through it; a real agent process runs
the tasks (tests/tasks_support.py ``agent_runner``).
"""

from __future__ import annotations

import os
import signal
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.connections_support import GlusterServer, gluster, pid_gone
from tests.gluster_support import Volume, gluster_volume, kill_glusterd, restart_glusterd
from tests.support import RpcFailure, until
from tests.tasks_support import AgentRunner, agent_runner
from vdsm_agent.system import gluster as cli
from vdsm_agent.tasks.gluster_discovery import task_id_for

# The session's glusterd and its fixture (gluster_server), shared with the
# connection tests: one glusterd per session, on its fixed port.
pytest_plugins = ["tests.connections_support"]

pytestmark = [pytest.mark.root, pytest.mark.tool("glusterd"), pytest.mark.tool("gluster")]

FILES = 300
SIZE = 16 * 1024
# Files for the glusterd-kill test: with 900 (about 10 s of migration at "lazy") the
# restarted glusterd (5-6 s later on a loaded machine) answered "brick operations
# failed" to every status read in 3 runs of 7, until the task was lost.
KILL_FILES = 6 * FILES


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[AgentRunner]:
    # cancel_grace above the ~5 s a Gluster start takes: the cancel then runs "stop".
    with agent_runner(tmp_path, cancel_grace=20) as started:
        started.start()
        yield started


@pytest.fixture
def volume(gluster_server: GlusterServer, tmp_path: Path) -> Iterator[Volume]:
    with gluster_volume(gluster_server, tmp_path / "gluster", bricks=2) as made:
        made.write_files(FILES, SIZE)
        yield made


def wait(runner: AgentRunner, task_id: str, timeout: float = 60) -> dict[str, Any]:
    """The task once final (waitTask in steps: the test client's HTTP timeout is 30 s)."""
    def final() -> dict[str, Any] | None:
        task: dict[str, Any] = runner.agent.call("waitTask", taskID=task_id, timeout=10)
        return task if task["state"] in ("done", "failed", "canceled", "interrupted") else None
    return dict(until(final, timeout=timeout, interval=0))


def output(runner: AgentRunner, task_id: str) -> str:
    answer = runner.agent.call("getTaskOutput", taskID=task_id, offset=0, maxBytes=1 << 20)
    return str(answer["data"])


def refused(call: Any) -> RpcFailure:
    with pytest.raises(RpcFailure) as info:
        call()
    return info.value


def test_rebalance_after_add_brick_runs_to_done_with_real_counts(
        runner: AgentRunner, volume: Volume) -> None:
    before = volume.checksums()
    assert len(before) == FILES
    new_brick = volume.add_brick()
    assert volume.files_on(new_brick) == []
    call = runner.agent.call
    task_id = call("startTask", kind="gluster.rebalance",
                   params={"volume": volume.name})["taskID"]
    # The volume is locked while the rebalance is in flight: a second one, or a
    # remove-brick, is ResourceBusy naming the holder.
    busy = refused(lambda: call("startTask", kind="gluster.rebalance",
                                params={"volume": volume.name}))
    assert busy.name == "ResourceBusy"
    assert busy.data["holder"] == task_id
    assert busy.data["resource"] == f"gluster-volume:{volume.name}"
    assert [h["taskID"] for h in busy.data["holders"]] == [task_id]
    busy = refused(lambda: call("startTask", kind="gluster.removeBrick", params={
        "volume": volume.name, "bricks": [volume.brick(new_brick)]}))
    assert busy.name == "ResourceBusy", busy.data
    assert busy.data["holder"] == task_id

    task = wait(runner, task_id)
    assert task["state"] == "done", task
    result = task["result"]
    moved = len(volume.files_on(new_brick))
    assert moved > 0
    assert result["glusterTaskID"] == volume.rebalance_task_id()
    assert task["external"] == {"glusterTaskID": result["glusterTaskID"]}
    assert result["status"] == "completed"
    assert result["files"] >= moved  # Gluster's count of what it moved
    assert result["bytes"] == result["files"] * SIZE
    assert result["scanned"] >= FILES
    assert result["failures"] == 0
    assert task["progress"]["done"] >= FILES  # files scanned
    assert task["resources"] == [f"gluster-volume:{volume.name}"]
    text = output(runner, task_id)
    assert f"Gluster task {result['glusterTaskID']}" in text
    # Progress as Gluster counts it: a line each time the counts change, the last the
    # result's (files and bytes moved, files scanned, failures).
    assert (f"completed: {result['files']} files ({result['bytes']} bytes) moved, "
            f"{result['scanned']} scanned, 0 failures") in text
    assert volume.checksums() == before
    # That the lock goes with the task: the discovery test, whose discovered rebalance
    # takes the volume after the agent's own one ended.


def test_remove_brick_migrates_commit_refused_before_completion_no_file_lost(
        runner: AgentRunner, gluster_server: GlusterServer, tmp_path: Path) -> None:
    with gluster_volume(gluster_server, tmp_path / "gluster", bricks=3) as volume:
        volume.write_files(FILES, SIZE)
        before = volume.checksums()
        leaving = volume.bricks[2]
        held = volume.files_on(leaving)
        assert held, "the brick to remove holds no file: nothing to migrate"
        brick = volume.brick(leaving)
        params = {"volume": volume.name, "bricks": [brick]}
        call = runner.agent.call

        # Nothing started yet: the commit is refused, named, and changes nothing.
        early = refused(lambda: call("startTask", kind="gluster.removeBrickCommit",
                                     params=params))
        assert early.name == "GlusterTaskNotComplete", early.data
        assert early.data["status"] == "not started"

        # Started then canceled at once (during Gluster's ~5 s start): the cancel
        # stops the migration, and a commit of a stopped remove-brick is refused.
        first = call("startTask", kind="gluster.removeBrick", params=params)["taskID"]
        until(lambda: call("getTask", taskID=first)["state"] == "running", timeout=20)
        call("cancelTask", taskID=first)
        task = wait(runner, first)
        assert task["state"] == "canceled", task
        assert "stopped the remove-brick" in output(runner, first)
        # Gluster forgets a stopped remove-brick.
        with pytest.raises(cli.GlusterError, match="not started"):
            cli.remove_brick_status(volume.name, [brick])
        not_complete = refused(lambda: call("startTask", kind="gluster.removeBrickCommit",
                                            params=params))
        assert not_complete.name == "GlusterTaskNotComplete"
        assert not_complete.data["status"] == "not started"
        assert brick in volume.brick_names()

        # Run to completion: every file off the brick, then the commit works.
        second = call("startTask", kind="gluster.removeBrick", params=params)["taskID"]
        task = wait(runner, second)
        assert task["state"] == "done", task
        assert task["result"]["status"] == "completed"
        assert task["result"]["bricks"] == [brick]
        assert task["result"]["failures"] == 0
        assert volume.files_on(leaving) == []
        commit = call("startTask", kind="gluster.removeBrickCommit", params=params)["taskID"]
        task = wait(runner, commit)
        assert task["state"] == "done", task
        assert task["result"]["committed"] is True
        assert brick not in volume.brick_names()
        assert len(volume.brick_names()) == 2
        assert volume.checksums() == before  # no file lost, none changed


def test_remove_brick_without_migrate_forces_it_out_and_leaves_its_files_behind(
        runner: AgentRunner, gluster_server: GlusterServer, tmp_path: Path) -> None:
    """migrate: false is Gluster's remove-brick ... force: no Gluster task, nothing to
    commit; the brick leaves the volume at once, its files with it (still on the
    brick's directory, gone from the mount), every other file intact."""
    with gluster_volume(gluster_server, tmp_path / "gluster", bricks=3) as volume:
        volume.write_files(FILES, SIZE)
        before = volume.checksums()
        leaving = volume.bricks[2]
        held = set(volume.files_on(leaving))
        assert held, "the brick to remove holds no file"
        brick = volume.brick(leaving)
        call = runner.agent.call
        task_id = call("startTask", kind="gluster.removeBrick", params={
            "volume": volume.name, "bricks": [brick], "migrate": False})["taskID"]
        task = wait(runner, task_id)
        assert task["state"] == "done", (task, output(runner, task_id))
        assert task["result"] == {"volume": volume.name, "bricks": [brick],
                                  "status": "removed"}
        assert task["external"] is None  # no Gluster task to follow
        assert "without migrating their data" in output(runner, task_id)
        assert brick not in volume.brick_names()
        assert len(volume.brick_names()) == 2
        with pytest.raises(cli.GlusterError):
            cli.remove_brick_status(volume.name, [brick])  # nothing to commit
        assert set(volume.files_on(leaving)) == held  # left on the brick, not deleted
        after = volume.checksums()
        assert set(after) == set(before) - held  # gone from the volume
        assert after == {name: digest for name, digest in before.items()
                         if name not in held}


def test_bad_names_are_refused_before_any_command(runner: AgentRunner) -> None:
    call = runner.agent.call
    for params in ({"volume": "-x"}, {"volume": "all"}, {"volume": "a b"},
                   {"volume": "v;rm"}):
        failure = refused(lambda p=params: call("startTask", kind="gluster.rebalance",
                                                params=p))
        assert failure.name == "InvalidParams", failure.data
    for brick in ("host:relative", "-h:/x", "host:/a/../b", "host:/a//b", "h:/a\nb",
                  "host:/x force"):
        failure = refused(lambda b=brick: call("startTask", kind="gluster.removeBrick",
                                               params={"volume": "v", "bricks": [b]}))
        assert failure.name == "InvalidParams", (brick, failure.data)
    with pytest.raises(ValueError):
        cli.check_brick("host:/a/../b")
    with pytest.raises(ValueError):
        cli.check_volume("all")
    assert cli.check_brick("vm:/tmp/b-1/x_y") == "vm:/tmp/b-1/x_y"


def test_unknown_volume_is_a_named_error(runner: AgentRunner,
                                         gluster_server: GlusterServer) -> None:
    failure = refused(lambda: runner.agent.call("startTask", kind="gluster.rebalance",
                                                params={"volume": "nosuchvolume"}))
    assert failure.name == "GlusterCommandFailed"
    assert "does not exist" in failure.data["opErrstr"]
    assert failure.data["field"] == "params.params.volume"


def test_glusterd_killed_mid_task_is_reported_and_the_task_found_again(
        gluster_server: GlusterServer, tmp_path: Path) -> None:
    if gluster_server.glusterd is None:
        pytest.skip("glusterd was running before the session: not ours to kill")
    # Discovery off: no other volume's task (the shared glusterd's) and no CLI read of
    # it around the kill; the task's own reads only.
    with agent_runner(tmp_path, cancel_grace=20, gluster_discovery_interval=0) as runner, \
            gluster_volume(gluster_server, tmp_path / "gluster", bricks=2) as volume:
        runner.start()
        volume.write_files(KILL_FILES, SIZE)
        before = volume.checksums()
        volume.add_brick()
        # Slow the migration down so that it outlives glusterd's absence (a few
        # seconds, and the restarted glusterd's reconnection to the rebalance
        # process): glusterd 10.3 learns a rebalance's end only from the rebalance
        # process, so one that ends while glusterd is down is never reported (that
        # task ends GlusterTaskLost, docs/gluster.md). Freezing the process instead
        # (SIGSTOP) left it stuck after SIGCONT here.
        gluster("volume", "set", volume.name, "cluster.rebal-throttle", "lazy")
        call = runner.agent.call
        task_id = call("startTask", kind="gluster.rebalance",
                       params={"volume": volume.name})["taskID"]
        until(lambda: "Gluster task" in output(runner, task_id), timeout=30)
        until(lambda: "in progress: " in output(runner, task_id), timeout=10)
        # Gluster's task ID in the task while it runs; checked against the CLI's
        # status at the end (a CLI status read right before the kill left glusterd
        # failing the task's status reads after its restart until the task was lost).
        gluster_id = external_while_running(runner, task_id)
        kill_glusterd(gluster_server)
        try:
            # No heartbeat while glusterd does not answer: stale (stale_after 1.5 s).
            until(lambda: call("getTask", taskID=task_id)["state"] == "stale",
                  timeout=20, what="the task stale")
        finally:
            restart_glusterd(gluster_server)
        task = wait(runner, task_id, timeout=60)
        text = output(runner, task_id)
        assert task["state"] == "done", (task, text)
        assert "glusterd does not answer" in text
        assert "glusterd answers again" in text
        assert any("glusterd does not answer" in w for w in task["warnings"])
        assert task["result"]["glusterTaskID"] == volume.rebalance_task_id() == gluster_id
        assert task["external"] == {"glusterTaskID": gluster_id}  # kept through the end
        assert volume.checksums() == before


def external_while_running(runner: AgentRunner, task_id: str) -> str:
    """Gluster's task ID as getTask and listTasks show it while the task runs
    (external.glusterTaskID), reported by the task's process as soon as gluster
    returned it."""
    call = runner.agent.call
    def reported() -> dict[str, Any] | None:
        task: dict[str, Any] = call("getTask", taskID=task_id)
        return task if task["external"] else None
    task = until(reported, timeout=5, interval=0.1, what="external.glusterTaskID in getTask")
    # Unfinished: stale too when a status read failed meanwhile (glusterd busy with
    # another session's transaction on a loaded machine); it is followed again.
    assert task["state"] in ("running", "stale"), task
    gluster_id = str(task["external"]["glusterTaskID"])
    listed = {t["id"]: t for t in call("listTasks")["tasks"]}
    assert listed[task_id]["external"] == {"glusterTaskID": gluster_id}
    return gluster_id


DISCOVERY_INTERVAL = 1.0
# A CLI-started task is in listTasks within one interval plus a round (the CLI,
# the submit) and the getTask polls.
DISCOVERY_BOUND = DISCOVERY_INTERVAL + 4.0


def test_rebalance_started_with_the_cli_is_discovered_with_the_same_end(
        gluster_server: GlusterServer, tmp_path: Path) -> None:
    with agent_runner(tmp_path, cancel_grace=20,
                      gluster_discovery_interval=DISCOVERY_INTERVAL) as runner, \
            gluster_volume(gluster_server, tmp_path / "gluster", bricks=2) as volume:
        runner.start()
        volume.write_files(FILES, SIZE)
        before = volume.checksums()
        volume.add_brick()
        call = runner.agent.call
        # A rebalance the agent started is not taken for a discovered one.
        own = call("startTask", kind="gluster.rebalance",
                   params={"volume": volume.name})["taskID"]
        own_task = wait(runner, own)
        assert own_task["state"] == "done"
        time.sleep(2 * DISCOVERY_INTERVAL)  # rounds that see it completed in Gluster

        volume.add_brick()
        answer = gluster("volume", "rebalance", volume.name, "start", "--xml").stdout
        started = time.monotonic()
        gluster_id = ET.fromstring(answer).findtext("volRebalance/task-id")
        assert gluster_id

        def found() -> dict[str, Any] | None:
            try:
                return dict(call("getTask", taskID=task_id_for(gluster_id)))
            except RpcFailure as failure:
                if failure.name != "TaskNotFound":
                    raise
                return None
        task = until(found, timeout=DISCOVERY_BOUND, interval=0.1, what="the discovery")
        elapsed = time.monotonic() - started
        assert elapsed <= DISCOVERY_BOUND
        assert task["kind"] == "gluster.rebalance"
        assert task["params"] == {"volume": volume.name, "glusterTaskID": gluster_id}
        assert task["resources"] == [f"gluster-volume:{volume.name}"]
        # The followed task's ID is kept in the task as the agent's own (the process
        # reports it at its first step); this rebalance may end before that is seen.
        shown = until(lambda: call("getTask", taskID=task["id"])["external"], timeout=5,
                      interval=0.1, what="external.glusterTaskID in getTask")
        assert shown == {"glusterTaskID": gluster_id}
        final = wait(runner, task["id"])
        assert final["state"] == "done", (final, output(runner, task["id"]))
        status = cli.rebalance_status(volume.name)
        assert status.task_id == gluster_id
        assert final["result"]["glusterTaskID"] == gluster_id
        assert final["external"] == {"glusterTaskID": gluster_id}
        assert final["result"]["status"] == status.status == "completed"
        assert (final["result"]["files"], final["result"]["scanned"]) == (
            status.files, status.lookups)
        assert final["result"]["files"] > 0
        assert volume.checksums() == before
        # The volume's rebalances: the agent's own and the discovered one, nothing
        # doubled (other volumes' may be listed too: discovery looks at every volume).
        listed = call("listTasks", filter={"kind": "gluster.rebalance"})["tasks"]
        assert sorted(t["id"] for t in listed if t["params"]["volume"] == volume.name) == \
            sorted([own, task["id"]])
        print(f"discovered in {elapsed:.2f}s")


# Slow migrations (GlusterFS 10.3 here: ~10 s for 300 of 900 16-KiB files at "lazy"
# after the ~5-s start), so that the task is still in flight when the test acts on it.
SLOW_FILES = 3 * FILES


def gluster_retried(*args: str) -> str:
    """The gluster CLI's answer, retried while glusterd runs another operation (the
    agent's status reads: "Another transaction is in progress")."""
    def once() -> str | None:
        result = gluster(*args, check=False)
        if result.returncode == 0:
            return result.stdout
        assert "Another transaction" in result.stdout + result.stderr, result
        return None
    return str(until(once, timeout=10, interval=0.2, what=f"gluster {' '.join(args)}"))


def test_rebalance_stopped_with_the_cli_is_canceled_and_one_losing_a_brick_fails(
        runner: AgentRunner, gluster_server: GlusterServer, tmp_path: Path) -> None:
    """Gluster's statuses onto ours, for real: a rebalance someone stops with the CLI
    (Gluster forgets it at once: its status read answers "not started") is canceled,
    and the volume is free again; a rebalance whose brick process dies is failed with
    GlusterTaskFailed and Gluster's counts. No file is lost once the brick is back."""
    with gluster_volume(gluster_server, tmp_path / "gluster", bricks=2) as volume:
        volume.write_files(SLOW_FILES, SIZE)
        before = volume.checksums()
        gluster("volume", "set", volume.name, "cluster.rebal-throttle", "lazy")
        new_brick = volume.add_brick()
        call = runner.agent.call

        stopped = call("startTask", kind="gluster.rebalance",
                       params={"volume": volume.name})["taskID"]
        until(lambda: "Gluster task" in output(runner, stopped), timeout=30)  # started
        gluster_id = external_while_running(runner, stopped)
        gluster_retried("volume", "rebalance", volume.name, "stop")
        task = wait(runner, stopped, timeout=20)  # not GlusterTaskLost after 30 s
        text = output(runner, stopped)
        assert task["state"] == "canceled", (task, text)
        assert task["error"] is None or task["error"]["name"] != "GlusterTaskLost", task
        assert "was stopped outside the agent" in text
        assert "not started" in text  # what Gluster answered
        assert task["external"] == {"glusterTaskID": gluster_id}

        # The lock went with it: a new rebalance is accepted. Its brick process killed
        # mid-migration, Gluster reports it failed.
        failing = call("startTask", kind="gluster.rebalance",
                       params={"volume": volume.name})["taskID"]
        until(lambda: "Gluster task" in output(runner, failing), timeout=30)
        brick_pid = volume.brick_pid(new_brick)
        assert brick_pid > 0
        os.kill(brick_pid, signal.SIGKILL)
        task = wait(runner, failing, timeout=90)
        text = output(runner, failing)
        assert task["state"] == "failed", (task, text)
        assert task["error"]["name"] == "GlusterTaskFailed", task["error"]
        counts = task["error"]["counts"]  # Gluster's (failures: 0 or 2 in our runs)
        assert set(counts) == {"files", "bytes", "scanned", "failures", "skipped", "runtime"}
        assert counts["scanned"] > 0
        assert task["error"]["glusterTaskID"] == task["external"]["glusterTaskID"]
        assert "failed: " in text  # Gluster's last counts line

        # The brick back (once the killed process is reaped: "start force" does
        # nothing for a zombie brick), then every file is there, unchanged.
        until(lambda: pid_gone(brick_pid), timeout=20, what="the killed brick reaped")
        gluster("volume", "start", volume.name, "force")
        until(lambda: volume.brick_pid(new_brick) not in (0, brick_pid), timeout=20,
              interval=0.2, what="the brick back")
        until(lambda: volume.checksums() == before, timeout=30, interval=1,
              what="every file readable again, unchanged")


def test_remove_brick_started_with_the_cli_is_discovered_commit_refused_until_completed(
        gluster_server: GlusterServer, tmp_path: Path) -> None:
    """A remove-brick started with the gluster CLI is found as a gluster.removeBrick
    task (bricks from Gluster's task list) within the bound; it holds the volume; its
    commit is refused while Gluster reports it in progress, and works once done."""
    with agent_runner(tmp_path, cancel_grace=20,
                      gluster_discovery_interval=DISCOVERY_INTERVAL) as runner, \
            gluster_volume(gluster_server, tmp_path / "gluster", bricks=3) as volume:
        runner.start()
        volume.write_files(SLOW_FILES, SIZE)
        before = volume.checksums()
        gluster("volume", "set", volume.name, "cluster.rebal-throttle", "lazy")
        leaving = volume.bricks[2]
        assert volume.files_on(leaving)
        brick = volume.brick(leaving)
        params = {"volume": volume.name, "bricks": [brick]}
        call = runner.agent.call

        answer = gluster_retried("volume", "remove-brick", volume.name, brick, "start",
                                 "--xml")
        started = time.monotonic()
        gluster_id = ET.fromstring(answer).findtext("volRemoveBrick/task-id")
        assert gluster_id
        task_id = task_id_for(gluster_id)

        def found() -> dict[str, Any] | None:
            try:
                return dict(call("getTask", taskID=task_id))
            except RpcFailure as failure:
                if failure.name != "TaskNotFound":
                    raise
                return None
        task = until(found, timeout=DISCOVERY_BOUND, interval=0.1, what="the discovery")
        assert time.monotonic() - started <= DISCOVERY_BOUND
        assert task["kind"] == "gluster.removeBrick"
        assert task["params"] == {**params, "migrate": True, "glusterTaskID": gluster_id}
        assert task["resources"] == [f"gluster-volume:{volume.name}"]

        # While Gluster migrates: the commit is refused, named, nothing changed, and
        # a rebalance is ResourceBusy naming the discovered task.
        early = refused(lambda: call("startTask", kind="gluster.removeBrickCommit",
                                     params=params))
        assert early.name == "GlusterTaskNotComplete", early.data
        assert early.data["status"] == "in progress"
        assert early.data["glusterTaskID"] == gluster_id
        busy = refused(lambda: call("startTask", kind="gluster.rebalance",
                                    params={"volume": volume.name}))
        assert busy.name == "ResourceBusy", busy.data
        assert busy.data["holder"] == task_id
        assert cli.remove_brick_status(volume.name, [brick]).status == "in progress"
        assert brick in volume.brick_names()

        final = wait(runner, task_id)
        assert final["state"] == "done", (final, output(runner, task_id))
        assert final["result"]["status"] == "completed"
        assert final["result"]["glusterTaskID"] == gluster_id
        assert final["result"]["bricks"] == [brick]
        assert final["result"]["files"] >= len(before) // 4  # about a third moved
        assert final["result"]["failures"] == 0
        assert volume.files_on(leaving) == []

        commit = call("startTask", kind="gluster.removeBrickCommit", params=params)["taskID"]
        done = wait(runner, commit)
        assert done["state"] == "done", (done, output(runner, commit))
        assert done["result"] == {"volume": volume.name, "bricks": [brick],
                                  "glusterTaskID": gluster_id, "committed": True}
        assert brick not in volume.brick_names()
        assert volume.checksums() == before  # no file lost, none changed
