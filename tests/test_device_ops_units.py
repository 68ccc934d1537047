"""Unit tests of the device-operation kinds' pieces (no root, no devices)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.device_ops_support import Agent, agent, agents
from vdsm_agent import errors, settings
from vdsm_agent.tasks.kinds import KINDS, KindEnv, blockio, priority, safety, tools
from vdsm_agent.tasks.kinds.base import Canceled, TaskFailure
from vdsm_agent.tasks.kinds.copy import PERCENT, resolve_destination
from vdsm_agent.tasks.kinds.format import signature_error
from vdsm_agent.tasks.kinds.fsck import e2fsck_percent

__all__ = ["agent", "agents"]  # fixtures, used by name


class FakeContext:
    """A TaskContext that records what the work reports."""

    def __init__(self, cancel_after: float | None = None) -> None:
        self.env = KindEnv()
        self.output = b""
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.progress_seen: list[tuple[int, int | None]] = []
        self.started = time.monotonic()
        self.cancel_after = cancel_after

    @property
    def cancel_requested(self) -> bool:
        return (self.cancel_after is not None
                and time.monotonic() - self.started > self.cancel_after)

    def progress(self, done: int, total: int | None) -> None:
        self.progress_seen.append((done, total))

    def heartbeat(self) -> None: ...

    def print(self, line: str) -> None:
        self.lines.append(line)

    def write(self, data: bytes) -> None:
        self.output += data

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def check_cancel(self) -> None:
        if self.cancel_requested:
            raise Canceled()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def throttle(self, nbytes: int) -> None: ...


# -- parsing ------------------------------------------------------------------------------------


def test_e2fsck_progress_lines_map_to_an_overall_percent() -> None:
    assert e2fsck_percent("1 0 8 /dev/loop0") == 0
    assert e2fsck_percent("1 4 8 /dev/loop0") == 35
    assert e2fsck_percent("2 8 8 lab") == 90
    assert e2fsck_percent("5 10 10 lab") == 100
    for junk in ("", "Pass 1: Checking inodes", "9 1 2 x", "1 2 0 x", "a b c d"):
        assert e2fsck_percent(junk) is None


def test_qemu_img_progress_is_parsed_from_carriage_return_updates() -> None:
    seen: list[str] = []
    splitter = tools._Splitter(seen.append)
    splitter.feed(b"    (0.00/100%)\r    (45.5")
    splitter.feed(b"0/100%)\r    (100.00/100%)\r\nerror: x")
    splitter.close()
    assert seen == ["    (0.00/100%)", "    (45.50/100%)", "    (100.00/100%)", "",
                    "error: x"]
    percents = [float(m.group(1)) for text in seen if (m := PERCENT.search(text))]
    assert percents == [0.0, 45.5, 100.0]


def test_split_aligned_covers_the_range_exactly() -> None:
    block = 512
    for offset in (0, 1, 100, 511, 512, 513, 1000, 4096):
        for length in (0, 1, 11, 411, 412, 512, 1000, 5000):
            head, (first, last), tail = blockio.split_aligned(offset, length, block)
            pieces = [piece for piece in (head, (first, last), tail)
                      if piece is not None and piece[1] > piece[0]]
            covered = sorted(pieces)
            assert sum(end - start for start, end in covered) == length, (offset, length)
            position = offset
            for start, end in covered:
                assert start == position
                position = end
            assert first % block == 0
            assert last % block == 0
            for edge in (head, tail):
                if edge is not None and edge[1] > edge[0]:
                    assert edge[0] // block == (edge[1] - 1) // block


def test_zeroing_helpers_on_a_file(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"\xff" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        blockio.zero_partial(fd, 512, 700, 900)
        assert blockio.zero_samples(fd, 700, 200, 512) is None
        assert blockio.zero_samples(fd, 600, 400, 512) == 600
        assert blockio.zero_samples(fd, 700, 201, 512) == 900
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[700:900] == bytes(200)
    assert data[:700] == b"\xff" * 700
    assert data[900:] == b"\xff" * (8192 - 900)


# -- tools ----------------------------------------------------------------------------------------


def test_check_arg_refuses_option_like_values() -> None:
    assert tools.check_arg("/dev/loop0", "device") == "/dev/loop0"
    for bad in ("", "-f", "--force", "a\0b", "a\nb"):
        with pytest.raises(TaskFailure):
            tools.check_arg(bad, "device")


def test_run_copies_output_and_reports_the_exit_code() -> None:
    ctx = FakeContext()
    segments: list[str] = []
    result = tools.run(ctx, ["printf", "one\\rtwo\\nthree\\n"], on_segment=segments.append)
    assert result.returncode == 0
    assert ctx.output == b"one\rtwo\nthree\n"
    assert segments == ["one", "two", "three"]
    assert ctx.lines == ["$ printf 'one\\rtwo\\nthree\\n'"]
    assert tools.run(ctx, ["false"]).returncode == 1


def test_run_feeds_a_progress_pipe() -> None:
    ctx = FakeContext()
    lines: list[str] = []
    code = "import os, sys; os.write(int(sys.argv[1]), b'1 5 10 dev\\n2 1 2 dev\\n')"
    result = tools.run(ctx, ["python3", "-c", code, "{progress_fd}"], progress_fd=True,
                       on_progress=lines.append)
    assert result.returncode == 0
    assert lines == ["1 5 10 dev", "2 1 2 dev"]


def test_run_stops_the_tool_on_a_cancel() -> None:
    ctx = FakeContext(cancel_after=0.3)
    started = time.monotonic()
    with pytest.raises(Canceled):
        tools.run(ctx, ["sleep", "30"])
    assert time.monotonic() - started < 10


def test_run_of_a_missing_tool_fails_clearly() -> None:
    with pytest.raises(TaskFailure) as info:
        tools.run(FakeContext(), ["no-such-tool-anywhere"])
    assert info.value.name == "ToolFailed"


# -- priority -------------------------------------------------------------------------------------


def test_ioprio_values() -> None:
    assert priority.ioprio_value("idle") == 3 << 13
    assert priority.ioprio_value("best-effort") == (2 << 13) | 7
    assert priority.IONICE_CLASSES == settings.IONICE_CLASSES


def test_priority_is_applied_to_the_calling_thread_only_here() -> None:
    result: dict[str, Any] = {}

    def worker() -> None:
        # ioprio_set(IOPRIO_WHO_PROCESS, 0) acts on the calling thread.
        result["apply"] = priority.apply(0, "idle")
        result["ioprio"] = priority.current_ioprio()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    description, problems = result["apply"]
    assert problems == []
    assert "I/O class idle" in description
    assert result["ioprio"] >> 13 == 3


@pytest.mark.parametrize(("name", "text"), [("task_nice", "20"), ("task_nice", "-1"),
                                            ("task_ionice_class", "realtime")])
def test_priority_settings_are_validated(name: str, text: str) -> None:
    setting = next(s for s in settings.SETTINGS if s.name == name)
    with pytest.raises(ValueError):
        setting.parse(text)


# -- safety pieces --------------------------------------------------------------------------------


def _device(**values: Any) -> dict[str, Any]:
    base = {"path": "/dev/x", "identity": "dev:7:9:100", "size": 100, "fstype": None,
            "uuid": None, "serial": None, "label": None, "partitionTable": None,
            "partitions": [], "probeError": None}
    return {**base, **values}


def test_expect_mismatches_are_listed() -> None:
    safety.check_expect("/dev/x", _device(), {"size": 100, "fstype": None})
    with pytest.raises(errors.PreconditionFailed) as info:
        safety.check_expect("/dev/x", _device(fstype="ext4", uuid="u"),
                            {"size": 100, "fstype": None, "uuid": "u", "identity": "other"})
    assert info.value.data["mismatches"] == [
        {"field": "fstype", "expected": None, "actual": "ext4"},
        {"field": "identity", "expected": "other", "actual": "dev:7:9:100"}]
    # A signature that could not be read never matches.
    with pytest.raises(errors.PreconditionFailed):
        safety.check_expect("/dev/x", _device(probeError="I/O error"), {"fstype": None})


def test_format_refuses_signatures_and_unknown_devices() -> None:
    assert signature_error("/dev/x", _device()) is None
    for values, words in (({"fstype": "xfs", "label": "a"}, "xfs signature (label 'a')"),
                          ({"partitionTable": "gpt"}, "gpt partition table"),
                          ({"partitions": ["xp1"]}, "partitions (xp1)"),
                          ({"probeError": "timed out"}, "cannot be read")):
        refusal = signature_error("/dev/x", _device(**values))
        assert refusal is not None
        assert words in refusal.detail
        assert refusal.data["field"] == "params.params.force"


def test_copy_destination_confinement(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    roots = (str(root),)
    field = "params.params.destination"
    new = resolve_destination(str(root / "new.img"), roots, field)
    with contextlib.closing(new):
        assert (new.kind, new.path, new.exists, new.target) == (
            "file", str(root / "new.img"), False, None)
        assert new.parent is not None
        assert new.parent.path == str(root)
        assert new.name == "new.img"
    (root / "old.img").write_bytes(b"x")
    with contextlib.closing(resolve_destination(str(root / "old.img"), roots, field)) as old:
        assert old.exists is True
        info = os.stat(root / "old.img")
        assert old.target is not None
        assert old.target.identity == f"file:{info.st_dev}:{info.st_ino}"
    (root / "link.img").symlink_to(root / "old.img")
    os.link(root / "old.img", tmp_path / "outside-link.img")
    for bad in (str(root / ".." / "x.img"), str(tmp_path / "x.img"), str(root / "link.img"),
                str(root / "old.img")):  # the last one is hard-linked from outside now
        with pytest.raises(errors.PathNotAllowed):
            resolve_destination(bad, roots, field)
    with pytest.raises(errors.InvalidParams):
        resolve_destination(str(root / "nodir" / "x.img"), roots, field)
    with pytest.raises(errors.PathNotAllowed):
        resolve_destination("/dev/null", roots, field)


# -- API: kinds and schemas -------------------------------------------------------------------


async def test_kinds_are_registered_with_their_schemas(agent: Agent) -> None:
    kinds = {kind["name"]: kind for kind in (await agent.call("getTaskKinds"))["kinds"]}
    assert {"checksum", "wipe", "format", "fsck", "copy"} <= set(kinds)
    assert set(KINDS) <= set(kinds) | {"test.sleep"}
    for name in ("wipe", "format", "fsck", "copy"):
        assert kinds[name]["destructive"] is True
        assert "expect" in kinds[name]["paramsSchema"]["properties"]
    assert kinds["wipe"]["paramsSchema"]["properties"]["method"]["enum"] == ["zero", "discard"]
    assert kinds["copy"]["paramsSchema"]["properties"]["destinationFormat"]["default"] == "raw"
    caps = await agent.call("getCapabilities")
    assert {"wipe", "format", "fsck", "copy"} <= set(caps["taskKinds"])


@pytest.mark.parametrize(("kind", "params", "field", "rule"), [
    ("wipe", {"device": "dev/loop0"}, "params.params.device", "pattern"),
    ("wipe", {"device": "/dev/loop0", "method": "shred"}, "params.params.method", "enum"),
    ("wipe", {"device": "/dev/loop0", "length": -1}, "params.params.length", "minimum"),
    ("format", {"device": "/dev/loop0", "fstype": "ntfs"}, "params.params.fstype", "enum"),
    ("format", {"device": "/dev/loop0", "fstype": "ext4", "label": "-L"},
     "params.params.label", "pattern"),
    ("format", {"device": "/dev/loop0", "fstype": "ext4", "label": "x" * 17},
     "params.params.label", "maxLength"),
    ("fsck", {"device": "/dev/loop0", "repair": "yes"}, "params.params.repair", "type"),
    ("copy", {"source": "/a", "destination": "/b", "destinationFormat": "vmdk"},
     "params.params.destinationFormat", "enum"),
    ("wipe", {"device": "/dev/loop0", "expect": {"colour": "red"}},
     "params.params.expect.colour", "additionalProperties"),
    ("wipe", {"device": "/dev/loop0", "expect": {}}, "params.params.expect", "minProperties"),
])
async def test_params_are_checked_against_the_kind_schemas(
        agent: Agent, kind: str, params: dict[str, Any], field: str, rule: str) -> None:
    failure = await agent.refused(kind, **params)
    assert failure.code == -32602
    assert (failure.data["field"], failure.data["rule"]) == (field, rule)


async def test_a_xfs_label_longer_than_12_is_refused(agent: Agent) -> None:
    # Checked before the device is looked at.
    failure = await agent.refused("format", device="/dev/null", fstype="xfs",
                                  label="thirteen-char")
    assert (failure.data["field"], failure.data["rule"]) == ("params.params.label", "length")


def test_verify_answers_a_verdict_even_when_the_target_is_gone(tmp_path: Path) -> None:
    from vdsm_agent.tasks.kinds.checksum import Checksum
    from vdsm_agent.tasks.kinds.copy import Copy
    from vdsm_agent.tasks.kinds.format import Format
    from vdsm_agent.tasks.kinds.wipe import Wipe

    env = KindEnv(allowed_roots=(str(tmp_path),), task_dir=str(tmp_path))
    cases = [
        (Wipe, {"device": "/dev/no-such-device", "method": "zero", "offset": 0}),
        (Format, {"device": "/dev/no-such-device", "fstype": "ext4", "force": False}),
        (Copy, {"source": str(tmp_path / "gone.img"), "destination": str(tmp_path / "x.img"),
                "destinationFormat": "raw", "create": True}),
        (Checksum, {"path": str(tmp_path / "gone.img"), "algorithm": "sha256", "offset": 0}),
    ]
    for kind, params in cases:
        verdict = kind.verify(params, env)
        assert not verdict.complete, kind.name
        assert verdict.detail, kind.name
