"""The engine's state names: hosts, jobs, steps, and how tasks read across hosts."""

from __future__ import annotations

import enum

from vdsm_agent.tasks.states import FINAL as TASK_FINAL_STATES
from vdsm_agent.tasks.states import State as TaskState

__all__ = ["STEP_TRANSITIONS", "TASK_FINAL", "HostStatus", "JobState", "StepState",
           "TaskState"]

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
STEP_TRANSITIONS: dict[StepState, frozenset[StepState]] = {
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
