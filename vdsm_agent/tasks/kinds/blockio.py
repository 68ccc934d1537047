"""Block device I/O for the kinds: direct I/O with aligned buffers, discard, geometry.

``O_DIRECT`` needs the buffer, the offset and the length aligned to the
device's logical block size; an anonymous ``mmap`` is page aligned (4096,
a multiple of every logical block size Linux supports), so one mmap buffer
serves every device. Unaligned edges of a byte range are written by
read-modify-write of their logical block, still through ``O_DIRECT``.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import struct

BLKSSZGET = 0x1268  # logical block size (int)
BLKDISCARD = 0x1277  # discard a byte range: uint64 start, uint64 length


def logical_block_size(fd: int) -> int:
    value = array.array("i", [0])
    fcntl.ioctl(fd, BLKSSZGET, value, True)
    return int(value[0]) or 512


def _queue_dir(rdev: int) -> str:
    """The sysfs queue/ directory of a block device by its device number (a
    partition's is its disk's)."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    own = os.path.join(base, "queue")
    return own if os.path.isdir(own) else os.path.join(base, "..", "queue")


def _read_int(path: str) -> int:
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def discard_limits(rdev: int) -> tuple[int, int]:
    """(granularity, max bytes per request) of the device numbered ``rdev`` (the
    ``st_rdev`` of a descriptor); max 0: the device cannot discard."""
    queue = _queue_dir(rdev)
    return (_read_int(os.path.join(queue, "discard_granularity")),
            _read_int(os.path.join(queue, "discard_max_bytes")))


def discard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD of ``[offset, offset + length)`` (OSError EOPNOTSUPP if unsupported)."""
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))


class AlignedBuffer:
    """A zero-filled, page-aligned buffer for O_DIRECT I/O."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.map)

    def close(self) -> None:
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # a slice is still referenced somewhere: the GC unmaps it later

    def __enter__(self) -> AlignedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"short write at offset {offset}")
        view = view[written:]
        offset += written


def read_all(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def zero_partial(fd: int, block: int, start: int, end: int) -> None:
    """Zero ``[start, end)`` inside one logical block by read-modify-write (O_DIRECT)."""
    base = start - start % block
    assert end <= base + block
    with AlignedBuffer(max(block, mmap.PAGESIZE)) as buffer, buffer.view[:block] as view:
        if read_all(fd, view, base) != block:
            raise OSError(f"short read at offset {base}")
        view[start - base:end - base] = bytes(end - start)
        write_all(fd, view, base)


def split_aligned(offset: int, length: int, block: int) -> tuple[tuple[int, int] | None,
                                                                 tuple[int, int],
                                                                 tuple[int, int] | None]:
    """An unaligned byte range as (head, aligned middle, tail), each (start, end).

    The head and tail lie within one logical block each (or are None); the
    middle may be empty.
    """
    end = offset + length
    first = -(-offset // block) * block  # first aligned offset at or after offset
    last = end - end % block  # last aligned offset at or before end
    if first >= last:
        # Everything within one or two blocks, no aligned middle.
        if offset // block == (end - 1) // block or length == 0:
            return ((offset, end) if length else None), (first, first), None
        return (offset, first), (first, first), (first, end)
    head = (offset, first) if offset != first else None
    tail = (last, end) if end != last else None
    return head, (first, last), tail


def zero_samples(fd: int, offset: int, length: int, block: int, count: int = 64,
                 sample: int = 64 * 1024) -> int | None:
    """Read ``count`` spread samples of the range (first and last bytes included);
    the offset of the first non-zero byte found, or None if all samples are zeros."""
    if length <= 0:
        return None
    sample = max(sample - sample % block, block)
    starts = {offset, max(offset, offset + length - sample)}
    step = max(length // count, 1)
    starts.update(range(offset, offset + length, step))
    size = sample + 2 * block
    with AlignedBuffer(-(-size // mmap.PAGESIZE) * mmap.PAGESIZE) as buffer:
        for start in sorted(starts):
            stop = min(start + sample, offset + length)
            base = start - start % block
            span = -(-(stop - base) // block) * block
            with buffer.view[:span] as view:
                got = read_all(fd, view, base)
                data = view[start - base:min(stop - base, got)].tobytes()
            if data.strip(b"\0"):
                return start + next(i for i, byte in enumerate(data) if byte)
    return None
