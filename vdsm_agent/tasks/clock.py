"""Timestamps: epoch floats inside, RFC 3339 UTC strings on the API."""

from __future__ import annotations

import datetime
import math
import time
from typing import Any


def now() -> float:
    """Wall-clock time rounded to the microsecond, the precision of the API's strings:
    a timestamp a caller read back (e.g. createdAfter) compares equal to the stored one."""
    return round(time.time(), 6)


def rfc3339(timestamp: float | None) -> str | None:
    """``2025-01-02T03:04:05.123456Z`` for an epoch timestamp (None stays None)."""
    if timestamp is None:
        return None
    # Same result as datetime.fromtimestamp(...).strftime("...%fZ") at a third
    # of the cost (every event and API task carries several of these): whole
    # microseconds, half to even, and the seconds part formatted once per second.
    fraction, whole = math.modf(timestamp)
    seconds, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    elif micros < 0:
        seconds, micros = seconds - 1, micros + 1_000_000
    if _last_second[0] != seconds:
        _last_second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return f"{_last_second[1]}.{micros:06d}Z"


_last_second: list[Any] = [None, ""]


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp; ValueError unless it has a zone.

    Python 3.11's ``fromisoformat`` accepts RFC 3339 (``Z`` or an offset) and
    more; a naive time is refused because it would silently mean local time.
    """
    moment = datetime.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError("the timestamp has no time zone (use Z for UTC)")
    return moment.timestamp()
