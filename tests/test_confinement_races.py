"""Races against confinement, replayed on a real agent by a real non-root user.

The user owns the allowed root (as the ``vdsm`` user owns a storage domain)
and, in a process of its own, swaps names with ``renameat2(RENAME_EXCHANGE)``
in a tight loop while root submits tasks over the agent's Unix socket:

* a copy's destination file, or its parent directory, swapped with a symlink
  to a file (a directory) outside the root: qemu-img must never write
  outside, and a task that ends ``done`` must name, in ``target.identity``,
  a file inside the root (issue 15, item 2). Before the fix, qemu-img opened
  the destination by name after the agent had checked it, and overwrote the
  outside file;
* the header of a qcow2 source rewritten by its owner, back and forth, between
  a plain image and one whose external data file is a secret outside the
  root: no copy ever holds the secret (qemu-img would open the data file by
  the name in the header; the task refuses such an image, and runs qemu-img
  in a Landlock sandbox that lets it open only the task's descriptors, for
  the moment between the check and qemu-img's open);
* a checksum's directory swapped with a regular file (the path vanishes and
  comes back while it is being resolved): every answer is ``accepted`` or a
  named error, never -32603, and a task that starts on such a path fails
  with a named error, never ``InternalError`` (item 10). Before the fix,
  ``stat`` of the path raised ENOTDIR through to the caller.
"""

from __future__ import annotations

import collections
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.confinement_support import (
    FLIPPER,
    Arena,
    MiB,
    Racer,
    agent_factory,
    arena,
    identities_under,
    local_user,
    random_file,
    sha256,
    submit,
    tree,
    wait,
)
from tests.support import AgentProcess
from vdsm_agent.tasks.kinds import sandbox

__all__ = ["agent_factory", "arena", "local_user"]  # fixtures, used by name

pytestmark = [pytest.mark.root, pytest.mark.tool("qemu-img")]

CLUSTER = 64 * 1024  # a qcow2's first cluster: its header and header extensions
LANES = 4  # destinations copied to at once (one task per destination: its lock)
TRIES = 240  # copy tasks, over both races
# Seconds between swaps: each name is one thing or the other for as long as a copy's
# steps take, so some copies see it stay put (done) and some see it change (refused).
SWAP_PAUSE = 0.003
# Errors a copy may end with while its names are swapped under it: all named.
RACE_ERRORS = {"PathNotAllowed", "DestinationReplaced", "InvalidParams"}


def copy_lanes(agent: AgentProcess, lanes: list[dict[str, Any]],
               tries: int) -> list[dict[str, Any]]:
    """Run ``tries`` copies over the lanes (each lane's next copy starts when its last
    one ended); the outcome of each: the submit's error, or the final task."""
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()
    left = [tries]

    def lane(params: dict[str, Any]) -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            answer = submit(agent, "copy", **params)
            if "error" in answer:
                outcome = {"submit": answer["error"]}
            else:
                outcome = {"task": wait(agent, answer["result"]["taskID"])}
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=lane, args=(params,)) for params in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert len(outcomes) == tries
    return outcomes


def judge(outcomes: list[dict[str, Any]], inside: dict[str, Path],
          data: str) -> collections.Counter[str]:
    """Every outcome is a named refusal or failure, or a copy into the root (the file
    its ``target.identity`` names is inside, and holds the source's data)."""
    seen: collections.Counter[str] = collections.Counter()
    for outcome in outcomes:
        if "submit" in outcome:
            error = outcome["submit"]
            assert error["code"] != -32603, error
            assert error["data"]["name"] in RACE_ERRORS, error
            seen[f"refused:{error['data']['name']}"] += 1
            continue
        task = outcome["task"]
        if task["state"] == "done":
            identity = task["result"]["target"]["identity"]
            assert identity in inside, task
            assert sha256(inside[identity]) == data, task
            seen["done"] += 1
        else:
            assert task["state"] == "failed", task
            assert task["error"]["name"] in RACE_ERRORS, task["error"]
            assert task["error"].get("detail"), task["error"]
            seen[f"failed:{task['error']['name']}"] += 1
    return seen


def test_copy_destination_swapped_for_a_symlink_never_writes_outside(
        arena: Arena, agent_factory: Any) -> None:
    """Item 2: the destination file, then its parent directory, swapped for a symlink."""
    agent = agent_factory("--max-running-tasks", str(LANES))
    root, outside = arena.root, arena.outside
    # One source per lane: a task locks its source too.
    source = random_file(root / "source-0.img", 256 * 1024)
    sources = [source] + [root / f"source-{lane}.img" for lane in range(1, LANES)]
    for copy in sources[1:]:
        copy.write_bytes(source.read_bytes())
    # Outside: a victim per lane, beside a directory named like the lanes' own.
    victims = [random_file(outside / f"dest-{lane}.img", 64 * 1024) for lane in range(LANES)]
    files = root / "files"
    files.mkdir()
    lanes = []
    pairs = []
    for lane, victim in enumerate(victims):
        random_file(files / f"dest-{lane}.img", 256 * 1024)
        (files / f"evil-{lane}").symlink_to(victim)
        arena.own(files / f"dest-{lane}.img", files / f"evil-{lane}")
        pairs.append((f"dest-{lane}.img", f"evil-{lane}"))
        lanes.append({"source": str(sources[lane]),
                      "destination": str(files / f"dest-{lane}.img"), "create": lane % 2 == 0})
    arena.own(files)
    outside_before = tree(outside)
    with Racer(arena.user, files, pairs, pause=SWAP_PAUSE):
        file_outcomes = copy_lanes(agent, lanes, TRIES // 2)
    file_seen = judge(file_outcomes, identities_under(root), sha256(source))

    # The parent directory itself swapped with a symlink to the outside directory.
    parent = root / "dir"
    parent.mkdir()
    (root / "dir-link").symlink_to(outside)
    lanes = []
    for lane in range(LANES):
        random_file(parent / f"dest-{lane}.img", 256 * 1024)
        arena.own(parent / f"dest-{lane}.img")
        # Odd lanes write new files (created by the task) into the swapped directory.
        name = f"dest-{lane}.img" if lane % 2 == 0 else f"new-{lane}.img"
        lanes.append({"source": str(sources[lane]), "destination": str(parent / name),
                      "create": True})
    arena.own(parent, root / "dir-link")
    with Racer(arena.user, root, [("dir", "dir-link")], pause=SWAP_PAUSE):
        dir_outcomes = copy_lanes(agent, lanes, TRIES // 2)
    dir_seen = judge(dir_outcomes, identities_under(root), sha256(source))

    assert tree(outside) == outside_before  # not a byte written, not a file made
    # The race did happen: both sides of it were seen.
    print("file swaps:", dict(file_seen), "directory swaps:", dict(dir_seen))
    for seen in (file_seen, dir_seen):
        assert seen["done"] >= 3, seen
        assert sum(count for what, count in seen.items() if what != "done") >= 3, seen


def test_a_qcow2_header_rewritten_under_a_copy_never_leaks_a_file_outside(
        arena: Arena, agent_factory: Any) -> None:
    """Copies of an image whose owner flips its header between "plain" and "external
    data file: a secret outside the root"."""
    if sandbox.abi_version() <= 0:
        pytest.skip("no Landlock in this kernel: the window between the task's check "
                    "and qemu-img's open stays open (docs/device-operations.md)")
    agent = agent_factory("--max-running-tasks", "2")
    root = arena.root
    secret = arena.outside / "secret.raw"
    image = root / "image.qcow2"  # its clusters map 1:1 onto the secret
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", str(image), "1M"], check=True,
                   timeout=60)
    secret.write_bytes(os.urandom(MiB))  # after the create, which truncates it
    os.chmod(secret, 0o600)
    leaky = arena.base / "leaky-header"  # the header naming the secret
    leaky.write_bytes(image.read_bytes()[:CLUSTER])
    plain = arena.base / "plain.qcow2"  # same layout, no external data file
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True,
                   timeout=60)
    clean = arena.base / "clean-header"
    clean.write_bytes(plain.read_bytes()[:CLUSTER])
    for path in (leaky, clean):
        os.chmod(path, 0o644)
    sources = [image, root / "image-1.qcow2"]
    sources[1].write_bytes(image.read_bytes())
    for source in sources:  # plain when the flipper starts
        with open(source, "r+b") as stream:
            stream.write(clean.read_bytes())
    arena.own(*sources)
    outcomes: collections.Counter[str] = collections.Counter()
    details: list[str] = []
    # The secret's header for 3 ms, the plain one for 30: most checks see a plain
    # image, and some copies start while the header names the secret.
    flippers = [Racer(arena.user, root, [], pause="0.003,0.03", script=FLIPPER,
                      args=(str(source), str(leaky), str(clean))) for source in sources]
    try:
        for attempt in range(60):
            for lane, source in enumerate(sources):
                destination = root / f"copy-{attempt}-{lane}.img"
                answer = submit(agent, "copy", source=str(source),
                                destination=str(destination))
                if "error" in answer:
                    error = answer["error"]
                    assert error["code"] != -32603, error
                    outcomes[f"refused:{error['data'].get('rule')}"] += 1
                    continue
                task = wait(agent, answer["result"]["taskID"])
                if task["state"] == "done":
                    outcomes["done"] += 1
                    assert sha256(destination) != sha256(secret)
                    assert secret.read_bytes()[:4096] not in destination.read_bytes()
                else:
                    assert task["error"]["name"] in ("InvalidParams", "ToolFailed"), task
                    outcomes[f"failed:{task['error']['name']}"] += 1
                    details.append(task["error"]["detail"])
                    assert not destination.exists()
    finally:
        for flipper in flippers:
            flipper.stop()
    print("header flips:", dict(outcomes), *sorted(set(details)), sep="\n")
    assert outcomes["done"] >= 3, outcomes
    assert sum(count for what, count in outcomes.items() if what != "done") >= 3, outcomes


def test_a_path_vanishing_while_it_is_resolved_is_a_named_error(
        arena: Arena, agent_factory: Any) -> None:
    """Item 10: the directory of a checksum's file swapped with a regular file."""
    agent = agent_factory("--max-running-tasks", "2", "--max-queued-tasks", "1000")
    root = arena.root
    (root / "dir").mkdir()
    # One file per submit: a task locks its file.
    images = [random_file(root / "dir" / f"disk-{number}.img", 4096) for number in range(300)]
    random_file(root / "plain", 16)
    arena.own(root / "dir", root / "plain", *images)
    answers = []
    with Racer(arena.user, root, [("dir", "plain")], pause=0.0002):
        for image in images:
            answers.append(submit(agent, "checksum", path=str(image)))
        tasks = [wait(agent, answer["result"]["taskID"])
                 for answer in answers if "result" in answer]
    errors: collections.Counter[str] = collections.Counter()
    for answer in answers:
        if "error" in answer:
            error = answer["error"]
            assert error["code"] != -32603, error
            assert error["data"]["name"] in ("InvalidParams", "PathNotAllowed"), error
            errors[error["data"].get("rule")] += 1
    for task in tasks:
        if task["state"] != "done":
            assert task["error"]["name"] in ("InvalidParams", "PathNotAllowed"), task
    assert tasks, "no submit got through: the race proves nothing"
    assert errors, "no submit was refused: the race proves nothing"


def test_confinement_sees_the_race_arena_as_the_agent_does(arena: Arena) -> None:
    # Guard: the user really owns the root and cannot write outside.
    assert os.stat(arena.root).st_uid == arena.user.uid
    assert os.stat(arena.outside).st_uid == 0
    assert os.stat(arena.outside).st_mode & 0o022 == 0
    assert Path(arena.base).stat().st_mode & 0o005 == 0o005
