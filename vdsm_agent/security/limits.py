"""In-flight limits: JSON-RPC calls and streams served at once, per connection and in total.

Three pools, so that no caller below admin can wedge the agent
(docs/security.md, "Limits"):

* every call or stream holds a slot of ``max_concurrent_requests`` from
  admission until its answer is ready (a stream: while it streams);
* the last ``reserved_requests`` of those slots (at most a quarter of them)
  are for admin callers only (root on the Unix socket is admin), so an admin
  always finds a slot however busy the agent is with other callers;
* long-polls (``waitTask``, ``getEvents``) and streams (``GET /events``,
  ``GET /tasks/{id}/output``) also hold a slot of ``max_long_polls``,
  whoever calls: callers that wait cannot hold more than that many slots,
  so the ordinary ones stay free for calls that answer at once;
* at most ``max_requests_per_connection`` of them on one connection.

A batch takes one slot per member, in member order, when it arrives, so that
which members are refused is predictable: those beyond the free slots answer
``LimitExceeded`` (code 400) at once, naming the limit. Nothing ever waits for
a slot — a full agent answers immediately rather than queueing callers into a
hang.

Counters and comparisons only: cheap enough for the hot path. The event loop
is single-threaded, so no lock is needed.
"""

from __future__ import annotations

from vdsm_agent import errors
from vdsm_agent.security.identity import Caller
from vdsm_agent.security.roles import Role

# The agent's verbs that wait for something to happen (their timeout is bounded
# by task_max_wait and events_max_wait): each call holds a long-poll slot. A
# program with other ones (the engine: waitJob) gives its own to the Limiter.
LONG_POLL_VERBS = frozenset({"waitTask", "getEvents"})
LONG_POLLS_SAID = "waitTask, getEvents, GET /events, GET /tasks/{id}/output"


def effective_reserve(max_total: int, reserved: int) -> int:
    """The admin-only slots: ``reserved``, but at most a quarter of ``max_total``
    (a small agent is not left with no slots for anyone else)."""
    return max(0, min(reserved, max_total // 4))


class Limiter:
    """One program's in-flight slots. ``program`` names it in refusals ("agent",
    "engine"); ``long_poll_verbs`` are its JSON-RPC long-polls (the dispatcher
    gives each a long-poll slot) and ``long_polls_said`` lists them, with its
    streams, in the refusal's message."""

    __slots__ = ("in_flight", "long_poll_verbs", "long_polls", "long_polls_said",
                 "max_long_polls", "max_ordinary", "max_per_connection", "max_total",
                 "program", "reserved")

    def __init__(self, max_total: int, max_per_connection: int,
                 max_long_polls: int | None = None, reserved: int = 0, *,
                 program: str = "agent", long_poll_verbs: frozenset[str] = LONG_POLL_VERBS,
                 long_polls_said: str = LONG_POLLS_SAID) -> None:
        self.program = program
        self.long_poll_verbs = long_poll_verbs
        self.long_polls_said = long_polls_said
        self.max_total = max_total
        self.max_per_connection = max_per_connection
        self.reserved = effective_reserve(max_total, reserved)
        # What a caller below admin may fill of max_total.
        self.max_ordinary = max_total - self.reserved
        self.max_long_polls = max_total if max_long_polls is None else max_long_polls
        self.in_flight = 0
        self.long_polls = 0

    def cap(self, caller: Caller) -> int:
        """How many of the total slots may be in use when ``caller`` takes one."""
        return self.max_total if caller.role is Role.ADMIN else self.max_ordinary

    def admit(self, caller: Caller, wanted: int = 1) -> int:
        """Take up to ``wanted`` slots for ``caller``'s connection; return how many."""
        room = min(self.cap(caller) - self.in_flight,
                   self.max_per_connection - caller.in_flight)
        granted = wanted if wanted <= room else max(room, 0)
        self.in_flight += granted
        caller.in_flight += granted
        return granted

    def admit_long_poll(self, caller: Caller) -> bool:
        """Take a slot and a long-poll slot for ``caller``, or neither."""
        if self.long_polls >= self.max_long_polls or not self.admit(caller, 1):
            return False
        self.long_polls += 1
        return True

    def release(self, caller: Caller, count: int = 1) -> None:
        self.in_flight -= count
        caller.in_flight -= count

    def release_long_poll(self, caller: Caller) -> None:
        self.long_polls -= 1
        self.release(caller, 1)

    def refusal(self, caller: Caller, long_poll: bool = False) -> errors.LimitExceeded:
        """The error for a call that got no slot, naming the limit that was hit."""
        if caller.in_flight >= self.max_per_connection:
            return errors.LimitExceeded(
                f"at most {self.max_per_connection} calls may be in flight on one "
                "connection (a batch counts one per member)",
                limit="max_requests_per_connection", max=self.max_per_connection)
        if long_poll and self.long_polls >= self.max_long_polls:
            return errors.LimitExceeded(
                f"the {self.program} is serving its limit of {self.max_long_polls} "
                f"long-polls and streams ({self.long_polls_said}) at once; retry later",
                limit="max_long_polls", max=self.max_long_polls)
        if self.in_flight < self.max_total:
            return errors.LimitExceeded(
                f"the {self.program} is serving {self.in_flight} calls at once; its other "
                f"{self.max_total - self.in_flight} slots are kept for admin callers; "
                "retry later", limit="max_concurrent_requests", max=self.max_ordinary)
        return errors.LimitExceeded(
            f"the {self.program} is serving its limit of {self.max_total} calls at once; "
            "retry later",
            limit="max_concurrent_requests", max=self.max_total)
