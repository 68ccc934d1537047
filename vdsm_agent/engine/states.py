"""The engine's state names: hosts, jobs, steps, and how tasks read across hosts.

Steps and jobs each have ONE transition table here and one check of it
(``check_step_move``, ``check_job_move``), as the agent's tasks have
``tasks/states.py``. The store moves a step only through
``store.steps.move_step`` and a job only through ``store.steps.move_job``,
which call them (``tests/test_engine_states.py`` checks both: every edge, and
that no other code writes a step's or a job's state)::

    step:  pending -> running -> done | failed | canceled
           pending -> done | failed | canceled    (answered final at once, refused,
                                                   host removed)
    job:   pending -> running -> done | failed | partial
           pending -> done | failed | partial     (every step ended in one go)

A job's state is derived from its steps' (``job_state``); since a step never
goes back, neither does its job.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

from vdsm_agent.tasks.states import FINAL as TASK_FINAL_STATES
from vdsm_agent.tasks.states import State as TaskState

__all__ = ["JOB_TRANSITIONS", "STEP_TRANSITIONS", "TASK_FINAL", "HostStatus",
           "IllegalMove", "JobState", "StepState", "TaskState", "check_job_move",
           "check_step_move"]

TASK_FINAL: frozenset[str] = frozenset(str(state) for state in TASK_FINAL_STATES)
# How the engine shows a task (or a connection) of a host it cannot currently see.
UNKNOWN = "unknown"


class HostStatus(enum.StrEnum):
    CONNECTING = "connecting"  # registered, not answered yet
    UP = "up"
    NON_RESPONSIVE = "non-responsive"  # unresponsive_after failed attempts in a row
    MAINTENANCE = "maintenance"  # not polled, no steps run (set by setHostMaintenance)


class StepState(enum.StrEnum):
    PENDING = "pending"  # not yet accepted by the host (never tried, or the host was down)
    RUNNING = "running"  # accepted; a task step stays here until its task is final
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"  # its task was canceled


STEP_FINAL: frozenset[str] = frozenset({StepState.DONE, StepState.FAILED, StepState.CANCELED})
# The one transition table of steps (``store.steps.move_step`` is the one function
# that moves one): a pending step may be accepted (running) or end at once (its
# call answered with a final outcome, or failed); a running one only ends.
STEP_TRANSITIONS: Mapping[StepState, frozenset[StepState]] = {
    StepState.PENDING: frozenset({StepState.RUNNING, StepState.DONE, StepState.FAILED,
                                  StepState.CANCELED}),
    StepState.RUNNING: frozenset({StepState.DONE, StepState.FAILED, StepState.CANCELED}),
    StepState.DONE: frozenset(),
    StepState.FAILED: frozenset(),
    StepState.CANCELED: frozenset(),
}


class JobState(enum.StrEnum):
    PENDING = "pending"  # no step accepted yet
    RUNNING = "running"
    DONE = "done"  # every step done
    FAILED = "failed"  # every step final, none done
    PARTIAL = "partial"  # every step final, some done and some not


JOB_FINAL: frozenset[str] = frozenset({JobState.DONE, JobState.FAILED, JobState.PARTIAL})
# The one transition table of jobs (``store.steps.move_job`` is the one function that
# moves one): a job is what its steps make it (``job_state``), and steps only go
# forwards, so a job never goes back to pending, nor leaves a final state.
JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.DONE, JobState.FAILED,
                                 JobState.PARTIAL}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.PARTIAL}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.PARTIAL: frozenset(),
}


_S = TypeVar("_S", "StepState", "JobState")


class IllegalMove(ValueError):
    """A step or job move its table does not allow: a bug of the engine, never an
    answer to a caller (the change is rolled back with its transaction)."""

    def __init__(self, what: str, source: str, target: str) -> None:
        super().__init__(f"{what}: {source} -> {target} is not allowed")
        self.source = source
        self.target = target


def _check(table: Mapping[_S, frozenset[_S]], what: str, source: _S, target: _S) -> None:
    # Staying in an unfinished state is no move (a step accepted again stays
    # running); a final state has no way out, not even to itself.
    if target == source and table[source]:
        return
    if target not in table[source]:
        raise IllegalMove(what, source, target)


def check_step_move(source: StepState, target: StepState, what: str = "step") -> None:
    """``IllegalMove`` unless ``STEP_TRANSITIONS`` lets a step go from source to target."""
    _check(STEP_TRANSITIONS, what, source, target)


def check_job_move(source: JobState, target: JobState, what: str = "job") -> None:
    """``IllegalMove`` unless ``JOB_TRANSITIONS`` lets a job go from source to target."""
    _check(JOB_TRANSITIONS, what, source, target)


def job_state(step_states: list[str]) -> JobState:
    """A job's state from its steps' states."""
    if all(state in STEP_FINAL for state in step_states):
        done = sum(1 for state in step_states if state == StepState.DONE)
        if done == len(step_states):
            return JobState.DONE
        return JobState.PARTIAL if done else JobState.FAILED
    if all(state == StepState.PENDING for state in step_states):
        return JobState.PENDING
    return JobState.RUNNING


def step_state_for_task(task_state: str) -> StepState:
    """The final state of a startTask step whose task ended in ``task_state``."""
    if task_state == TaskState.DONE:
        return StepState.DONE
    if task_state == TaskState.CANCELED:
        return StepState.CANCELED
    return StepState.FAILED
