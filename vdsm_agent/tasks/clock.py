"""Timestamps: epoch floats inside, RFC 3339 UTC strings on the API."""

from __future__ import annotations

import datetime
import time


def now() -> float:
    """Wall-clock time rounded to the microsecond, the precision of the API's strings:
    a timestamp a caller read back (e.g. createdAfter) compares equal to the stored one."""
    return round(time.time(), 6)


def rfc3339(timestamp: float | None) -> str | None:
    """``2025-01-02T03:04:05.123456Z`` for an epoch timestamp (None stays None)."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp; ValueError unless it has a zone.

    Python 3.11's ``fromisoformat`` accepts RFC 3339 (``Z`` or an offset) and
    more; a naive time is refused because it would silently mean local time.
    """
    moment = datetime.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError("the timestamp has no time zone (use Z for UTC)")
    return moment.timestamp()
