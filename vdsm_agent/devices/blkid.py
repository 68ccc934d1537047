"""Filesystem and partition-table signatures from ``blkid -p -o export``.

``-p`` (low-level probing) reads the device itself rather than the blkid
cache or udev's database, which this host may not have (no udevd). Exit code
2 means "no signature found", which is a fact (fstype null), not a failure.

No ``-d``: blkid's default export quoting keeps one ``KEY=value`` per line
whatever a label holds (control characters become ``^J``, bytes >= 128 the
``M-`` notation; a newline in a label crafted by whoever writes the device
cannot forge a ``TYPE=`` line), and the output is plain ASCII.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from vdsm_agent.system import commands

log = logging.getLogger(__name__)

NOTHING_FOUND = 2


@dataclasses.dataclass(frozen=True)
class Signature:
    fstype: str | None = None  # TYPE: ext4, xfs, swap, LVM2_member, ...
    label: str | None = None
    uuid: str | None = None
    partition_table: str | None = None  # PTTYPE: dos, gpt, ...
    # Why the device could not be probed; the fields above are then unknown,
    # not absent (a destructive task must not take "unknown" for "blank").
    error: str | None = None


NO_SIGNATURE = Signature()


def unescape_value(text: str) -> str:
    """Undo blkid's export quoting, which puts a backslash before shell-special characters."""
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        out.append(next(chars, "\\") if char == "\\" else char)
    return "".join(out)


def parse_export(text: str) -> dict[str, str]:
    """``KEY=value`` lines into a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            values[key] = unescape_value(value)
    return values


def signature_from(values: Mapping[str, str]) -> Signature:
    return Signature(fstype=values.get("TYPE") or None, label=values.get("LABEL"),
                     uuid=values.get("UUID") or None,
                     partition_table=values.get("PTTYPE") or None)


def failure(message: str) -> Signature:
    return Signature(error=message or "blkid failed")


def interpret(result: commands.CommandResult) -> Signature:
    """A finished blkid run as a signature."""
    stderr = result.stderr.strip()
    if result.returncode == NOTHING_FOUND:
        # blkid also exits 2 when it cannot open the device ("error: DEV:
        # Permission denied"); only a silent 2 means "no signature".
        return failure(stderr) if stderr else NO_SIGNATURE
    if not result.ok:
        # I/O errors, no medium, ambivalent signatures (exit 8): unknown.
        return failure(stderr or f"blkid exit code {result.returncode}")
    return signature_from(parse_export(result.stdout))


def probe(devnode: str, timeout: float) -> Signature:
    """The device's signature: NO_SIGNATURE if it has none, ``error`` set if it cannot be read."""
    argv = ["blkid", "-p", "-o", "export", "--", devnode]
    try:
        result = commands.run(argv, timeout=timeout)
    except (commands.CommandError, UnicodeDecodeError) as exc:
        log.warning("cannot probe %s: %s", devnode, exc)
        return failure(str(exc))
    signature = interpret(result)
    if signature.error:
        log.debug("cannot probe %s: %s", devnode, signature.error)
    return signature
