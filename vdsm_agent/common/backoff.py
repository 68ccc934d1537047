"""Retry delays: capped exponential backoff with full jitter.

``delay(n) = max(floor, uniform(0, min(cap, base * 2**n)))`` where ``n`` is the
number of attempts that already failed in the current outage. Full jitter
(Marc Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog)
spreads the retries of many clients that lost the same server at the same
instant, so that they do not hammer it in lock-step when it comes back; the
floor keeps a retry storm off a target that fails at once (a refused port).

Used by the connection monitors (reconnect attempts; the counter is reset
after the target has been healthy for ``backoff_reset``, never by a single
good probe, so a flapping target keeps backing off) and by the engine's host
workers (calls to a host that does not answer).
"""

from __future__ import annotations

import dataclasses
import random

# Beyond this exponent base * 2**n is far above any sane cap; clamping it keeps
# the float arithmetic finite for a target that has been down for weeks.
_MAX_EXPONENT = 62


@dataclasses.dataclass(frozen=True)
class Backoff:
    """The backoff policy: all times in seconds."""

    base: float = 2.0
    cap: float = 120.0
    floor: float = 1.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap <= 0 or self.floor < 0:
            raise ValueError("backoff base and cap must be positive, floor not negative")
        if self.floor > self.cap:
            raise ValueError(f"backoff floor {self.floor} is above the cap {self.cap}")

    def ceiling(self, failures: int) -> float:
        """The upper bound of the delay after ``failures`` failed attempts."""
        return max(self.floor, self._upper(failures))

    def delay(self, failures: int, rng: random.Random) -> float:
        """A jittered delay before the next attempt, in [floor, ceiling(failures)]."""
        return max(self.floor, rng.uniform(0.0, self._upper(failures)))

    def _upper(self, failures: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(max(failures, 0), _MAX_EXPONENT))
