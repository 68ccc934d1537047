"""A ``loop://`` connection never binds a file outside the allowed roots (issue 15, item 3).

Replayed on a real agent by a real non-root user who owns the allowed root
(``tests/confinement_support.py``): root manages a ``loop://`` connection
over the agent's Unix socket, and the moment the answer comes back the user
(a process of its own, told through a pipe) replaces the image by a symlink
to a victim file outside the root — by renaming a symlink over the image,
or by exchanging the image's parent directory with a symlink to the
outside directory (``renameat2(RENAME_EXCHANGE)`` through ctypes). The
agent's connect races that swap.

Whatever wins, the kernel must never report a loop device backed by the
victim (``LOOP_GET_STATUS64``: st_dev/st_ino, not names), a connected
connection's device must be backed by the image the user made, and
``unmanageStorageConnection`` must answer ``disconnected: true`` only when
no loop device is bound to either file any more. A ``wipe`` task of the
device the connection bound, after the swap, must leave the victim as it was.

Before the fix, ``losetup -f --show -- IMAGE`` opened the image by name after
the check at manage time: it followed the swapped-in symlink and bound the
victim (a wipe of the device the connection named then zeroed it), and
disconnect, looking for a device whose sysfs ``backing_file`` was the image's
name — which the swap had changed, also when the image itself was bound —
found none and answered ``disconnected: true`` with the device still bound.
Run against that code, the victim was bound in 258 of 300 rounds, a device
was left bound after ``disconnected: true`` in all 300, and the wipe zeroed
the victim in most of the 24 rounds.
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.confinement_support import (
    Arena,
    User,
    agent_factory,
    arena,
    local_user,
    random_file,
    sha256,
    submit,
    wait,
)
from tests.loop_support import LoopJanitor, devices_bound_to, loop_janitor
from tests.support import AgentProcess, RpcFailure
from vdsm_agent.system import loopdev

__all__ = ["agent_factory", "arena", "local_user", "loop_janitor"]  # fixtures, used by name

pytestmark = [pytest.mark.root]

MiB = 1024 * 1024
TRIES = 300  # manage/swap/unmanage rounds, half of each kind of swap
WIPE_TRIES = 24
BUDGET = 60.0  # seconds: a slow machine runs fewer rounds rather than time out
AGENT_FLAGS = ("--probe-interval", "0.5", "--backoff-base", "0.2", "--backoff-cap", "1",
               "--backoff-floor", "0.2")

# Run as the user: one file operation per line read, "ok" or "error ..." written back.
SWAPPER = r"""
import ctypes, os, platform, sys
RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}[platform.machine()]
AT_FDCWD, RENAME_EXCHANGE = -100, 2
libc = ctypes.CDLL(None, use_errno=True)

def exchange(one, other):
    if libc.syscall(RENAMEAT2, AT_FDCWD, os.fsencode(one), AT_FDCWD, os.fsencode(other),
                    RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))

def image(name, size):
    fd = os.open(name + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, int(size))
    os.close(fd)
    os.rename(name + ".new", name)

OPS = {"image": image, "symlink": os.symlink, "rename": os.rename, "exchange": exchange,
       "mkdir": os.mkdir}
print("ready", flush=True)
for line in sys.stdin:
    op, *args = line.split()
    try:
        OPS[op](*args)
        print("ok", flush=True)
    except OSError as exc:
        print("error", exc, flush=True)
"""


class Swapper:
    """The user's process, doing file operations in the allowed root on command."""

    def __init__(self, user: User, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-I", "-c", SWAPPER], user=user.uid, group=user.gid,
            extra_groups=[], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "ready\n", (line, self.proc.stderr.read() if self.proc.stderr else "")

    def send(self, *ops: str) -> None:
        """Start the operations (one line each) without waiting for them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(op + "\n" for op in ops))
        self.proc.stdin.flush()

    def done(self, count: int = 1) -> None:
        assert self.proc.stdout is not None
        for _ in range(count):
            answer = self.proc.stdout.readline()
            assert answer == "ok\n", answer

    def do(self, *ops: str) -> None:
        self.send(*ops)
        self.done(len(ops))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def swapper(arena: Arena) -> Iterator[Swapper]:
    process = Swapper(arena.user, arena.root)
    try:
        yield process
    finally:
        process.stop()


def attached(status: dict[str, Any]) -> str | None:
    """The loop device a connection's status says it has bound, if any."""
    device = status["connectionInfo"].get("device")
    return str(device) if status["connected"] and device else None


class Round:
    """One manage/swap/unmanage round and what the kernel showed during it."""

    def __init__(self, agent: AgentProcess, victim: loopdev.Backing) -> None:
        self.agent = agent
        self.victim = victim
        self.seen: collections.Counter[str] = collections.Counter()
        self.faults: list[str] = []

    def manage(self, connection_id: str, image: Path) -> bool:
        try:
            self.agent.call("manageStorageConnection", uri=f"loop://{image}",
                            connectionID=connection_id)
        except RpcFailure as failure:  # the image is in place: nothing to refuse
            self.faults.append(f"{connection_id}: manage refused: {failure.error}")
            return False
        return True

    def outcome(self, connection_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The status once the first connect has ended (connected, or refused)."""
        deadline = time.monotonic() + timeout
        while True:
            status: dict[str, Any] = self.agent.call("getStorageConnection",
                                                     connectionID=connection_id)
            if status["state"] != "connecting" or status["lastError"] is not None:
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.002)

    def check_bound(self, label: str, status: dict[str, Any], image: loopdev.Backing) -> None:
        """The victim is never bound; a connected device is backed by the image."""
        if devices_bound_to(self.victim):
            self.faults.append(f"{label}: a loop device is bound to the victim: {status}")
            self.seen["victim bound"] += 1
        device = attached(status)
        if device is not None:
            current = loopdev.status_of(device)
            if current is None or current.backing != image:
                self.faults.append(f"{label}: {device} is not backed by the image: {status}")
            # ENOENT: bound before the swap, then the swap unlinked the image (renamed
            # over it); the device still serves it, and the probe says so.
            error = status["lastError"]
            self.seen["bound the image" + (f", then {error['code']}" if error else "")] += 1
        else:
            self.seen[f"refused at connect: {status['lastError']['code']}"] += 1

    def unmanage(self, label: str, connection_id: str, *backings: loopdev.Backing) -> None:
        answer = self.agent.call("unmanageStorageConnection", connectionID=connection_id)
        left = devices_bound_to(self.victim, *backings)
        if answer["disconnected"] and left:
            self.faults.append(f"{label}: disconnected: true, yet bound: {left}")
            self.seen["left bound"] += 1
        if not answer["disconnected"]:
            self.faults.append(f"{label}: not disconnected: {answer}")
        for number, backing in left.items():  # keep later rounds meaningful
            loopdev.detach(number, backing, wait=2)


class Images:
    """The images of the rounds, and the victim outside the root.

    Even rounds: ``f/disk.img``, a new file each round, then a symlink to the
    victim renamed over it. Odd rounds: ``d/disk.img`` (the same file every
    round), its directory ``d`` then exchanged with ``dlink``, a symlink to
    the outside directory, where the victim has the same name; exchanged
    back after the round.
    """

    def __init__(self, arena: Arena, swapper: Swapper, janitor: LoopJanitor) -> None:
        self.root = arena.root
        self.swapper = swapper
        self.janitor = janitor
        self.victim = random_file(arena.outside / "disk.img", MiB)  # root's, 0644
        self.victim_id = janitor.track(self.victim)
        swapper.do("mkdir f", "mkdir d", f"image d/disk.img {MiB}",
                   f"symlink {arena.outside} dlink")
        self.steady_id = janitor.track(self.root / "d" / "disk.img")

    def round(self, number: int) -> tuple[Path, loopdev.Backing, str, tuple[str, ...]]:
        """The image of round ``number``, its identity, the swap, and the swap's undo."""
        if number % 2 == 0:
            self.swapper.do(f"image f/disk.img {MiB}", f"symlink {self.victim} f/swap")
            image = self.root / "f" / "disk.img"
            return image, self.janitor.track(image), "rename f/swap f/disk.img", ()
        return self.root / "d" / "disk.img", self.steady_id, "exchange d dlink", (
            "exchange d dlink",)


def test_a_loop_image_swapped_for_a_symlink_never_binds_the_outside_file(
        loop_janitor: LoopJanitor, arena: Arena, agent_factory: Any,
        swapper: Swapper) -> None:
    agent = agent_factory(*AGENT_FLAGS)
    images = Images(arena, swapper, loop_janitor)
    rounds = Round(agent, images.victim_id)
    started = time.monotonic()
    done = 0
    while done < TRIES and time.monotonic() - started < BUDGET:
        image, image_id, swap, undo = images.round(done)
        label = f"round {done} ({swap})"
        connection_id = f"r{done}"
        if rounds.manage(connection_id, image):
            swapper.send(swap)  # the moment manage answered
            swapper.done()
            status = rounds.outcome(connection_id)
            rounds.check_bound(label, status, image_id)
            rounds.unmanage(label, connection_id, image_id)
        else:
            swapper.do(swap)
        if undo:
            swapper.do(*undo)
        done += 1
    elapsed = time.monotonic() - started
    print(f"\nloop swap race: {done} rounds in {elapsed:.1f}s: {dict(rounds.seen)}")
    assert not rounds.faults, (len(rounds.faults), rounds.faults[:5], dict(rounds.seen))
    assert done >= 100, f"only {done} rounds in {BUDGET}s"
    # The race was run: some swaps came before the connect resolved the image.
    assert any(key.startswith("refused at connect") for key in rounds.seen), rounds.seen
    assert loop_janitor.bound() == {}


def test_a_wipe_of_the_loop_device_after_the_swap_never_touches_the_outside_file(
        loop_janitor: LoopJanitor, arena: Arena, agent_factory: Any,
        swapper: Swapper) -> None:
    agent = agent_factory(*AGENT_FLAGS)
    images = Images(arena, swapper, loop_janitor)
    victim = images.victim
    data = sha256(victim)
    rounds = Round(agent, images.victim_id)
    wiped = 0
    zeroed: list[str] = []
    for number in range(WIPE_TRIES):
        image, image_id, swap, undo = images.round(number)
        label = f"round {number} ({swap})"
        connection_id = f"w{number}"
        if not rounds.manage(connection_id, image):
            swapper.do(swap, *undo)
            continue
        swapper.send(swap)
        swapper.done()
        status = rounds.outcome(connection_id)
        rounds.check_bound(label, status, image_id)
        # The device the connection names, whatever its state: what a caller would wipe.
        device = status["connectionInfo"].get("device")
        if device:
            answer = submit(agent, "wipe", device=device)
            task = wait(agent, answer["result"]["taskID"]) if "result" in answer else answer
            if task.get("state") == "done":
                wiped += 1
            else:
                rounds.faults.append(f"{label}: the wipe of {device}: {task}")
            if sha256(victim) != data:
                zeroed.append(f"{label}: the wipe of {device} changed the victim")
                victim.write_bytes(os.urandom(MiB))  # new data, same inode: go on
                data = sha256(victim)
        rounds.unmanage(label, connection_id, image_id)
        if undo:
            swapper.do(*undo)
    print(f"\nloop swap + wipe: {wiped} wipes in {WIPE_TRIES} rounds: {dict(rounds.seen)}")
    assert not zeroed, zeroed
    assert not rounds.faults, (len(rounds.faults), rounds.faults[:5], dict(rounds.seen))
    assert wiped, "no round bound a device to wipe: the test proves nothing"
    assert sha256(victim) == data


def test_unmanage_at_once_after_manage_leaves_nothing_bound(
        loop_janitor: LoopJanitor, arena: Arena, agent_factory: Any,
        swapper: Swapper) -> None:
    """The unmanage stops the connect wherever it is (the bind runs in a thread and
    cannot be abandoned half-way): disconnected is true, and nothing stays bound."""
    agent = agent_factory(*AGENT_FLAGS)
    swapper.do(f"image disk.img {MiB}")
    image = arena.root / "disk.img"
    identity = loop_janitor.track(image)
    left = []
    for number in range(100):
        agent.call("manageStorageConnection", uri=f"loop://{image}", connectionID=f"u{number}")
        answer = agent.call("unmanageStorageConnection", connectionID=f"u{number}")
        assert answer["disconnected"] is True, answer
        if devices_bound_to(identity):
            left.append(number)
            for device, backing in devices_bound_to(identity).items():
                loopdev.detach(device, backing, wait=2)
    assert not left, left
