"""Log records to the systemd journal with fields: TASK_ID, CONNECTION_ID, PRIORITY.

Under systemd, stderr is a journal stream already (``JOURNAL_STREAM`` names
it); lines written there are searchable by unit but carry no fields of their
own. When stderr *is* that stream, ``logs.configure`` switches to this
handler, which speaks journald's native protocol
(https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): one datagram per record to
``/run/systemd/journal/socket``, ``KEY=value`` lines (a value holding a
newline is written as the key, a newline, its length as 64-bit little
endian, the value and a newline), and a record too large for a datagram
sent as a sealed memfd. That is what ``systemd.journal`` (python3-systemd, a
C extension that needs libsystemd to build) does, in fifty lines.

Fields: ``MESSAGE``, ``PRIORITY`` (syslog levels), ``SYSLOG_IDENTIFIER``,
``LOGGER`` (the Python logger's name), ``TASK_ID`` and ``CONNECTION_ID``.
The last two come from the record's ``task_id``/``connection_id`` attributes
(``extra=``), else from the message: every line of the agent about a task
starts ``task %s:`` and every line about connections ``connection %s:``
(IDs joined by commas: one field each), so ``journalctl -u vdsm-agent
TASK_ID=...`` shows a task's whole life without touching any call site.
When journald cannot be reached the line goes to stderr as before.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator, Mapping

SOCKET = "/run/systemd/journal/socket"
# syslog priorities (journalctl -p)
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6), (logging.DEBUG, 7))
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_PREFIXES = (("task %s", "TASK_ID"), ("connection %s", "CONNECTION_ID"))


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is the journal stream systemd gave the service."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def priority(level: int) -> int:
    for threshold, value in PRIORITIES:
        if level >= threshold:
            return value
    return 7


def record_ids(record: logging.LogRecord) -> Iterator[tuple[str, str]]:
    """TASK_ID / CONNECTION_ID of a record: ``extra=`` attributes, else its message's
    ``task %s:`` / ``connection %s:`` prefix."""
    explicit = False
    for attribute, field in (("task_id", "TASK_ID"), ("connection_id", "CONNECTION_ID")):
        value = getattr(record, attribute, None)
        if value:
            explicit = True
            yield field, str(value)
    if explicit or not isinstance(record.msg, str) or not record.args:
        return
    for prefix, field in _PREFIXES:
        if record.msg.startswith(prefix) and isinstance(record.args, tuple):
            for value in str(record.args[0]).split(","):
                if value and value != "-":
                    yield field, value
            return


def encode(fields: list[tuple[str, str]]) -> bytes:
    """The native protocol's datagram for ``fields`` (keys: upper case, digits, _)."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    def __init__(self, identifier: str, path: str = SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self._socket: socket.socket | None = None

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        fields = [("MESSAGE", self.format(record)), ("PRIORITY", str(priority(record.levelno))),
                  ("SYSLOG_IDENTIFIER", self.identifier), ("LOGGER", record.name)]
        fields += record_ids(record)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode(self.fields(record))
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(data)
        except OSError:
            self._close()
            # journald restarting or gone: the line is not lost, it goes to stderr.
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()

    def _send(self, data: bytes) -> None:
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too large for a datagram
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("vdsm-agent-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            assert self._socket is not None
            self._socket.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def close(self) -> None:
        self._close()
        super().close()
