"""Logging set-up: one line per record on stderr, or the journal with fields.

Under systemd, when stderr is the service's journal stream, records go to the
journal by its native protocol instead, with TASK_ID and CONNECTION_ID fields
(``system/journal.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from vdsm_agent.system.journal import JournalHandler, stderr_is_journal

FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
JOURNAL_FORMAT = "[%(name)s] %(message)s"
STORM_INTERVAL = 10.0  # seconds between the lines of one storm (StormLog)


class Formatter(logging.Formatter):
    """``logging.Formatter`` with the date and time part formatted once per second
    (the standard one calls strftime for every line, audit lines included)."""

    _second: int | None = None
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._text},{int(record.msecs):03d}"


def configure(level: str) -> None:
    handler: logging.Handler
    if stderr_is_journal():
        # journald stamps each entry and knows the level (PRIORITY).
        handler = JournalHandler(identifier=_program())
        handler.setFormatter(logging.Formatter(JOURNAL_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    skip_unused_record_fields()


def _program() -> str:
    """The journal's SYSLOG_IDENTIFIER: the command's name (vdsm-agent, vdsm-engine)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") else "vdsm-agent"


def skip_unused_record_fields() -> None:
    """Do not collect what no line shows: the caller's file and line, thread,
    process and multiprocessing names. Every mutating call writes an audit
    line, and collecting these was a third of its cost. This is the logging
    HOWTO's "Optimization" recipe (``logging._srcfile = None`` is how it says
    to skip the caller lookup); ``%(pathname)s``, ``%(lineno)d``,
    ``%(funcName)s``, ``%(thread)d`` and ``%(process)d`` then print as None."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None


class StormLog:
    """Events that can come by the thousand a second (refused connections,
    failed accepts) logged once per interval, never once each.

    The first event of a kind (``key``) is logged at once; the ones that follow
    are counted, and when ``interval`` seconds have passed one line says how
    many there were ("... 1234 more in the last 10 s"); that goes on while they
    do. A storm of any length therefore writes one line per interval and kind.
    Use from the event loop only.
    """

    def __init__(self, logger: logging.Logger, interval: float = STORM_INTERVAL,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        # key -> [events since the last line, the message of the last one]
        self._counts: dict[str, list[Any]] = {}

    def note(self, key: str, message: str) -> None:
        entry = self._counts.get(key)
        if entry is not None:
            entry[0] += 1
            entry[1] = message
            return
        self.logger.log(self.level, "%s (more are counted and logged every %g s)",
                        message, self.interval)
        self._counts[key] = [0, message]
        asyncio.get_running_loop().call_later(self.interval, self._flush, key)

    def _flush(self, key: str) -> None:
        count, message = self._counts[key]
        if not count:  # the storm is over: the next event is logged at once again
            del self._counts[key]
            return
        self.logger.log(self.level, "%s: %d more in the last %g s", message, count,
                        self.interval)
        self._counts[key] = [0, message]
        asyncio.get_running_loop().call_later(self.interval, self._flush, key)
