"""Numbers as a person reads them: sizes, rates and durations.

Which fields are sizes or durations is decided by their names (``size``,
``outputSize``, ``*Bytes``, ``eta``, ``uptime``, ``latencyMs``...): the
schemas say so only in prose. ``--raw`` turns all of this off.
"""

from __future__ import annotations

import math
import re

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

# Leaf names (the last part of a dotted path) and what they count.
_BYTES = re.compile(r"^(size|outputSize|outputTruncatedBefore|bytes|.*Bytes)$")
_SECONDS = re.compile(r"^(eta|uptime|.*Seconds|seconds|timeout|elapsed)$")
_MILLISECONDS = re.compile(r"^.*Ms$")
# progress.done/total/rate count units that are bytes only for the kinds that
# move data (TaskProgress: "bytes for data-moving kinds"); see progress_in_bytes.
_PROGRESS_UNITS = ("progress.done", "progress.total", "progress.rate")

# The task kinds whose progress counts bytes (checksum, copy, wipe): the others
# count percent steps (format, fsck) or milliseconds (test.sleep).
BYTE_KINDS = frozenset({"checksum", "copy", "wipe"})


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    value = float(count)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(per_second: float, in_bytes: bool = True) -> str:
    if in_bytes:
        return f"{human_bytes(per_second)}/s"
    return f"{per_second:.3g}/s"


def human_duration(seconds: float) -> str:
    """0.4 -> '0.4s', 75 -> '1m15s', 3700 -> '1h01m', 90000 -> '1d01h'."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def human_timestamp(text: str) -> str:
    """RFC 3339 '2026-12-06T03:39:32.185811Z' -> '2026-12-06 03:39:32Z' (seconds)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        return text
    return f"{match.group(1)} {match.group(2)}{match.group(3)}"


def unit_of(path: str, kind: str | None = None) -> str | None:
    """'bytes', 'seconds', 'ms' or None for a dotted field path.

    ``kind``: the task kind of the row, if any, for progress counters."""
    if path in _PROGRESS_UNITS or path.endswith(tuple("." + name for name in _PROGRESS_UNITS)):
        return "bytes" if kind in BYTE_KINDS else None
    if path.endswith("progress.eta") or path == "eta":
        return "seconds"
    leaf = path.rsplit(".", 1)[-1]
    if _BYTES.match(leaf):
        return "bytes"
    if _MILLISECONDS.match(leaf):
        return "ms"
    if _SECONDS.match(leaf):
        return "seconds"
    return None


def humanize(path: str, value: object, kind: str | None = None) -> str | None:
    """The value in words when its field has a unit (or is a timestamp), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return human_timestamp(value) if path.endswith("At") or path == "deadline" else None
    if not isinstance(value, int | float):
        return None
    unit = unit_of(path, kind)
    if unit == "bytes":
        return human_rate(value) if path.endswith("rate") else human_bytes(value)
    if unit == "seconds":
        return human_duration(value)
    if unit == "ms":
        return f"{value:.3g} ms"
    if path.endswith("percent"):
        return f"{value:.0f}%"
    return None
