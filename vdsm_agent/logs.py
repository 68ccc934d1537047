"""Logging set-up: one line per record on stderr (the journal under systemd)."""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    skip_unused_record_fields()


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
