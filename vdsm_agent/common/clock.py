"""Timestamps: epoch floats inside, RFC 3339 UTC strings on the API.

Every timestamp the agent and the engine show goes through ``rfc3339``:
``2025-01-02T03:04:05.123456Z`` (tasks, events, jobs, hosts), or with
``digits=3`` ``2025-01-02T03:04:05.123Z`` (a connection's ``lastError.time``,
``lastCheck`` and ``nextRetryAt``, whose contract has milliseconds).
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Any, Literal, overload

from vdsm_agent import errors


def now() -> float:
    """Wall-clock time rounded to the microsecond, the precision of the API's strings:
    a timestamp a caller read back (e.g. createdAfter) compares equal to the stored one."""
    return round(time.time(), 6)


@overload
def rfc3339(timestamp: float, digits: Literal[3, 6] = 6) -> str: ...
@overload
def rfc3339(timestamp: None, digits: Literal[3, 6] = 6) -> None: ...
@overload
def rfc3339(timestamp: float | None, digits: Literal[3, 6] = 6) -> str | None: ...


def rfc3339(timestamp: float | None, digits: Literal[3, 6] = 6) -> str | None:
    """``2025-01-02T03:04:05.123456Z`` for an epoch timestamp (None stays None);
    with ``digits=3``, ``...05.123Z`` (the microseconds cut to milliseconds)."""
    if timestamp is None:
        return None
    # Same result as datetime.fromtimestamp(...).strftime("...%fZ") (and, with
    # 3 digits, as isoformat(timespec="milliseconds")) at a third of the cost
    # (every event and API task carries several of these): whole microseconds,
    # half to even, and the seconds part formatted once per second.
    fraction, whole = math.modf(timestamp)
    seconds, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    elif micros < 0:
        seconds, micros = seconds - 1, micros + 1_000_000
    if _last_second[0] != seconds:
        _last_second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    if digits == 3:
        return f"{_last_second[1]}.{micros // 1000:03d}Z"
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


def parse_param(text: str, field: str) -> float:
    """``parse_rfc3339`` of a param; InvalidParams naming ``field`` (e.g.
    ``params.deadline``, rule ``format``) when it is not a timestamp."""
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise errors.InvalidParams(f"{field.rsplit('.', 1)[-1]}: {exc}", field=field,
                                   rule="format") from None
