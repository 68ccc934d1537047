"""The audit log: one line per mutating call, and one per refusal.

Logger ``vdsm_agent.audit`` (it goes wherever the agent logs: stderr, the
journal) and, with the ``audit_log`` setting, also a file of its own. Each
line's message is one JSON object, so that it can be grepped and parsed:

    {"time": "2026-11-22T10:15:00.123Z", "event": "call", "identity": "engine1",
     "transport": "tls", "role": "operate", "verb": "startTask",
     "params": {"kind": "checksum", "params": {"path": "/srv/a.img"}},
     "outcome": "ok", "result": {"taskID": "...", "state": "accepted"}}

``event`` is ``call`` (a mutating call, whatever its outcome: ok, or error
with ``code`` and ``error``), ``forbidden`` (a call beyond the caller's role,
logged at WARNING whatever the verb) or ``limit`` (a mutating call refused by
a concurrency limit). Params are redacted (``security.redact``) and cut to a
bounded size; only identifiers of the result are kept.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from typing import Any

import orjson

from vdsm_agent.common.clock import rfc3339
from vdsm_agent.security import redact
from vdsm_agent.security.identity import Caller

AUDIT = logging.getLogger("vdsm_agent.audit")

MAX_STRING = 256
MAX_ITEMS = 32
MAX_PARAMS_JSON = 4096
# Result members worth keeping: what the call created or touched (jobID: the
# engine's jobs).
RESULT_KEYS = ("taskID", "state", "connectionID", "disconnected", "deleted", "killed",
               "killedPid", "sharedWith", "jobID")


def _now() -> str:
    # The clock's formatter formats the seconds part once per second: formatting a
    # datetime was a tenth of an audited call's cost.
    return rfc3339(time.time(), 3)


def _bounded(item: Any, depth: int = 0) -> Any:
    if isinstance(item, str):
        return item if len(item) <= MAX_STRING else f"{item[:MAX_STRING]}...({len(item)} chars)"
    if depth >= 6:
        return "..."
    if isinstance(item, dict):
        items = list(item.items())
        bounded = {str(key)[:MAX_STRING]: _bounded(element, depth + 1)
                   for key, element in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            bounded["..."] = f"{len(items) - MAX_ITEMS} more"
        return bounded
    if isinstance(item, list | tuple):
        elements = [_bounded(element, depth + 1) for element in item[:MAX_ITEMS]]
        if len(item) > MAX_ITEMS:
            elements.append(f"...{len(item) - MAX_ITEMS} more")
        return elements
    return item


def summarize(params: Any) -> Any:
    """Params as the audit log shows them: secrets masked, size bounded."""
    shown, _ = _summary(params)
    return shown


def _summary(params: Any) -> tuple[Any, Any]:
    """``summarize(params)``, and the same ready to embed in a line: encoded
    once (an ``orjson.Fragment``) when it is JSON."""
    shown = _bounded(redact.value(params))
    try:
        encoded = orjson.dumps(shown, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        text = repr(shown)[:MAX_PARAMS_JSON]
        return text, text
    if len(encoded) > MAX_PARAMS_JSON:
        text = encoded[:MAX_PARAMS_JSON].decode(errors="replace") + "..."
        return text, text
    return shown, orjson.Fragment(encoded)


def _result_summary(result: Any) -> Any:
    if isinstance(result, dict):
        kept = {key: result[key] for key in RESULT_KEYS if key in result}
        task = result.get("task")
        if isinstance(task, dict):
            kept.update({"taskID": task.get("id"), "state": task.get("state")})
        return kept
    return None


# Audit events that are not refusals (the rest: limit, forbidden) log at INFO.
INFO_EVENTS = frozenset({"call", "lease"})


def record(caller: Caller | None, verb: str, params: Any, *, event: str = "call",
           error: dict[str, Any] | None = None, result: Any = None,
           required: str | None = None) -> None:
    """Log one audit line (WARNING for refusals, INFO for calls and lease moves)."""
    entry: dict[str, Any] = {
        "time": _now(),
        "event": event,
        "identity": caller.identity if caller is not None else "in-process",
        "transport": caller.transport if caller is not None else "local",
        "role": str(caller.role) if caller is not None else "admin",
        "verb": verb[:128],
        "params": _summary(params)[1],
    }
    if required is not None:
        entry["required"] = required
    if error is None:
        entry["outcome"] = "ok"
        summary = _result_summary(result)
        if summary:
            entry["result"] = summary
    else:
        data = error.get("data")
        entry["outcome"] = "error"
        entry["code"] = error.get("code")
        entry["error"] = data.get("name") if isinstance(data, dict) else error.get("message")
    level = logging.INFO if event in INFO_EVENTS else logging.WARNING
    if AUDIT.isEnabledFor(level):
        line = orjson.dumps(entry, option=orjson.OPT_NON_STR_KEYS, default=repr).decode()
        AUDIT.log(level, "%s", line)


def open_file(path: str) -> logging.Handler:
    """A handler writing bare audit lines to ``path`` (mode 0640, reopened after rotation)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    os.close(fd)
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    return handler


def install(path: str) -> logging.Handler | None:
    """Audit lines are always on (INFO, even when the agent logs at warning); with a
    path they go to that file too. Returns the file's handler for ``remove``."""
    AUDIT.setLevel(logging.INFO)
    if not path:
        return None
    handler = open_file(path)
    AUDIT.addHandler(handler)
    return handler


def remove(handler: logging.Handler | None) -> None:
    if handler is None:
        return
    AUDIT.removeHandler(handler)
    handler.close()
