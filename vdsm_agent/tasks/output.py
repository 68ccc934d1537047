"""Task console output: append-only byte stream kept in capped segment files.

The child appends to ``output/<start>.out`` where ``<start>`` is the stream
offset of the segment's first byte (20 digits, so names sort). When a segment
reaches a quarter of the cap a new one starts; when the kept bytes exceed the
cap the oldest segments are deleted. Offsets never change, so a reader keeps
its place, and ``truncated_before`` (the first kept offset) says what was lost.

Readers (the agent, in a worker thread) never hold more than the bytes they
were asked for, whatever the output size.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

SEGMENT_RE = re.compile(r"^(\d{20})\.out$")
MIN_SEGMENT = 1024
_LIST_RETRIES = 5


def segment_name(start: int) -> str:
    return f"{start:020d}.out"


def list_segments(directory: Path) -> list[int]:
    """Start offsets of the segments present, ascending."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    starts = [int(match.group(1)) for name in names if (match := SEGMENT_RE.match(name))]
    starts.sort()
    return starts


@dataclasses.dataclass(frozen=True)
class Extent:
    """The kept part of a task's output: [start, end)."""

    start: int
    end: int


def extent(directory: Path) -> Extent:
    for _ in range(_LIST_RETRIES):
        starts = list_segments(directory)
        if not starts:
            return Extent(0, 0)
        try:
            size = os.stat(directory / segment_name(starts[-1])).st_size
        except FileNotFoundError:
            continue  # rotated away between listing and stat: look again
        return Extent(starts[0], starts[-1] + size)
    return Extent(0, 0)


@dataclasses.dataclass(frozen=True)
class Chunk:
    data: bytes
    offset: int  # where ``data`` starts (moved forward if the asked part was dropped)
    next_offset: int
    truncated_before: int
    end: int  # end of the output written so far


def read(directory: Path, offset: int, max_bytes: int) -> Chunk:
    """Up to ``max_bytes`` of output from ``offset``."""
    for _ in range(_LIST_RETRIES):
        try:
            return _read_once(directory, offset, max_bytes)
        except FileNotFoundError:
            continue  # a segment was dropped under us; the listing is stale
    kept = extent(directory)
    start = max(offset, kept.start)
    return Chunk(b"", start, start, kept.start, kept.end)


def _read_once(directory: Path, offset: int, max_bytes: int) -> Chunk:
    starts = list_segments(directory)
    if not starts:
        return Chunk(b"", offset, offset, 0, 0)
    last_size = os.stat(directory / segment_name(starts[-1])).st_size
    end = starts[-1] + last_size
    first = starts[0]
    position = max(offset, first)
    parts: list[bytes] = []
    wanted = max_bytes
    for index, start in enumerate(starts):
        limit = starts[index + 1] if index + 1 < len(starts) else end
        if wanted <= 0 or position >= end:
            break
        if position >= limit:
            continue
        size = min(wanted, limit - position)
        data = _pread(directory / segment_name(start), position - start, size)
        if not data:
            break
        parts.append(data)
        position += len(data)
        wanted -= len(data)
        if position < limit:
            break  # short read: the segment is still being written
    data = b"".join(parts)
    begin = max(offset, first)
    return Chunk(data, begin, begin + len(data), first, end)


def _pread(path: Path, at: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, at)
    finally:
        os.close(fd)


class Writer:
    """The child's side: append bytes, rotate and drop segments to respect the cap.

    A write may fail (``OSError``: the state disk is full); the writer stays
    usable, and the bytes it did write are counted, so offsets stay true when
    later writes succeed. The directory and the first segment are made at the
    first write, so that making a writer never fails.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_size = max(MIN_SEGMENT, max_bytes // 4)
        starts = list_segments(directory)
        # A restarted child never happens today, but appending after what is
        # there keeps offsets monotonic if it ever does.
        self.offset = extent(directory).end if starts else 0
        self._segment_start = starts[-1] if starts else 0
        self._fd = -1

    def _open(self, start: int) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / segment_name(start)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._segment_start + self.segment_size - self.offset
            if room <= 0:
                self._rotate()
                continue
            if self._fd < 0:
                self._fd = self._open(self._segment_start)
            written = os.write(self._fd, view[:room])
            self.offset += written
            view = view[written:]

    def _rotate(self) -> None:
        # The new segment is opened first: if that fails the writer keeps its
        # current one, and the next write tries again.
        fd = self._open(self.offset)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segment_start = self.offset
        self._drop_oldest()

    def _drop_oldest(self) -> None:
        starts = list_segments(self.directory)
        # Make room for the new segment to fill up: kept bytes stay <= max_bytes.
        # The segment being written is never dropped.
        limit = self.offset + self.segment_size - self.max_bytes
        while len(starts) > 1 and starts[0] < limit:
            try:
                os.unlink(self.directory / segment_name(starts.pop(0)))
            except FileNotFoundError:
                pass

    def flush(self) -> None:
        """Make the output durable (done once, before the outcome is recorded)."""
        if self._fd >= 0:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
