"""In-flight limits: JSON-RPC calls (and streams) served at once, per connection and in total.

A call takes one slot from admission until its answer is ready; a batch
takes one slot per member, all at once when it arrives, in member order, so
that which members are refused is predictable: those beyond the free slots
answer ``LimitExceeded`` (code 400) at once. Nothing ever waits for a slot —
a full agent answers immediately rather than queueing callers into a hang.

Two counters and a comparison: cheap enough for the hot path. The event loop
is single-threaded, so no lock is needed.
"""

from __future__ import annotations

from vdsm_agent import errors
from vdsm_agent.security.identity import Caller


class Limiter:
    __slots__ = ("in_flight", "max_per_connection", "max_total")

    def __init__(self, max_total: int, max_per_connection: int) -> None:
        self.max_total = max_total
        self.max_per_connection = max_per_connection
        self.in_flight = 0

    def admit(self, caller: Caller, wanted: int = 1) -> int:
        """Take up to ``wanted`` slots for ``caller``'s connection; return how many."""
        room = min(self.max_total - self.in_flight,
                   self.max_per_connection - caller.in_flight)
        granted = wanted if wanted <= room else max(room, 0)
        self.in_flight += granted
        caller.in_flight += granted
        return granted

    def release(self, caller: Caller, count: int = 1) -> None:
        self.in_flight -= count
        caller.in_flight -= count

    def refusal(self, caller: Caller) -> errors.LimitExceeded:
        """The error for a call that got no slot, naming the limit that was hit."""
        if caller.in_flight >= self.max_per_connection:
            return errors.LimitExceeded(
                f"at most {self.max_per_connection} calls may be in flight on one "
                "connection (a batch counts one per member)",
                limit="max_requests_per_connection", max=self.max_per_connection)
        return errors.LimitExceeded(
            f"the agent is serving its limit of {self.max_total} calls at once; retry later",
            limit="max_concurrent_requests", max=self.max_total)
