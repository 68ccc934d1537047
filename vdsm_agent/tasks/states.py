"""Task states and the one transition table.

Every state change of a task goes through ``check_transition`` (normal life
cycle) or ``check_reset`` (the administrator's ``resetTaskState``); nothing
else in the code base decides which moves are legal.

Life cycle (docs/tasks.md has the picture)::

    accepted -> initializing -> running -> done | failed | canceled
    running <-> stale            (heartbeat missing / resumed)
    initializing|running|stale -> interrupted   (process gone, no outcome)
    accepted -> canceled | failed               (cancel / deadline before start)

``initializing`` may also end directly (done, failed, ...) because a short task
can finish before the agent has seen it report ``running``; and ``stale`` may
end directly because a task can recover and finish between two samples.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class State(enum.StrEnum):
    ACCEPTED = "accepted"
    INITIALIZING = "initializing"
    RUNNING = "running"
    STALE = "stale"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"


FINAL: frozenset[State] = frozenset({State.DONE, State.FAILED, State.CANCELED,
                                     State.INTERRUPTED})
UNFINISHED: frozenset[State] = frozenset(State) - FINAL
# States in which a task holds a run slot (its process exists or is being made).
RUNNING_SLOT: frozenset[State] = frozenset({State.INITIALIZING, State.RUNNING, State.STALE})

TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.ACCEPTED: frozenset({State.INITIALIZING, State.CANCELED, State.FAILED}),
    State.INITIALIZING: frozenset({State.RUNNING}) | FINAL,
    State.RUNNING: frozenset({State.STALE}) | FINAL,
    State.STALE: frozenset({State.RUNNING}) | FINAL,
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELED: frozenset(),
    State.INTERRUPTED: frozenset(),
}

# resetTaskState: to failed from any unfinished state (once the process is
# gone), to done from any unfinished state when the kind verifies the work.
RESET_TARGETS: frozenset[State] = frozenset({State.FAILED, State.DONE})
RESET_TRANSITIONS: Mapping[State, frozenset[State]] = {
    state: (RESET_TARGETS if state in UNFINISHED else frozenset()) for state in State
}


class IllegalTransition(ValueError):
    """A move the table does not allow (a bug when it comes from the life cycle)."""

    def __init__(self, source: State, target: State, table: str) -> None:
        super().__init__(f"{table}: {source} -> {target} is not allowed")
        self.source = source
        self.target = target


def allowed(source: State, target: State) -> bool:
    return target in TRANSITIONS[source]


def check_transition(source: State, target: State) -> None:
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(source, target, "transition")


def check_reset(source: State, target: State) -> None:
    if target not in RESET_TRANSITIONS[source]:
        raise IllegalTransition(source, target, "reset")


def parse(name: str) -> State | None:
    """The state called ``name``, or None for an unknown name."""
    try:
        return State(name)
    except ValueError:
        return None
