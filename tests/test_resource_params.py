"""Every task kind's declaration of its resources gives exactly what the kind locks.

The engine locks a task's resources from its host's kind table (getTaskKinds'
``resourceParams``, ``tasks/resource_names``) before the host is called; the
agent locks what the kind's ``resources()`` returns. Here, for every kind and
representative params (real image files beneath a real root, a real loop
device), both must be the same names, so that they can never drift apart.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vdsm_agent.engine.jobs import kind_table
from vdsm_agent.tasks import resource_names
from vdsm_agent.tasks.kinds import KINDS, KindEnv

MiB = 1024 * 1024


@pytest.fixture
def device(tmp_path: Path) -> Iterator[str]:
    """A real block device (a read-only loop device of a 4 MiB image), detached after."""
    image = tmp_path / "backing.img"
    image.write_bytes(b"\0" * 4 * MiB)
    path = subprocess.run(["losetup", "-f", "--show", "--read-only", str(image)], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", path], check=False, timeout=30)


def examples(root: Path, device: str) -> dict[str, list[dict[str, Any]]]:
    """Representative params of every kind (files beneath ``root``)."""
    image, other = root / "disk.img", root / "other.img"
    for path in (image, other):
        path.write_bytes(b"\1" * MiB)
    new = root / "new.qcow2"  # a copy's destination that does not exist yet
    return {
        "checksum": [{"path": str(image)}, {"path": device}],
        "copy": [{"source": str(image), "destination": str(other)},
                 {"source": str(image), "destination": str(new)},
                 {"source": device, "destination": str(new)},
                 {"source": str(image), "destination": device}],
        "format": [{"device": device, "fstype": "ext4"}],
        "fsck": [{"device": device}],
        "wipe": [{"device": device}],
        "test.sleep": [{}, {"resources": ["b", "a"]}],
        "gluster.rebalance": [{"volume": "data"}],
        "gluster.removeBrick": [{"volume": "data", "bricks": ["h1:/bricks/b1"]}],
        "gluster.removeBrickCommit": [{"volume": "vol-2", "bricks": ["h1:/bricks/b1"]}],
    }


@pytest.mark.root
@pytest.mark.tool("losetup")
def test_every_kind_declares_exactly_what_it_locks(tmp_path: Path, device: str) -> None:
    root = (tmp_path / "images").resolve()
    root.mkdir()
    cases = examples(root, device)
    assert sorted(cases) == sorted(KINDS), "give every kind representative params here"
    env = KindEnv(allowed_roots=(str(root),))
    for name, kind in KINDS.items():
        for params in cases[name]:
            checked = kind.check_params(params)  # valid params, as the agent has them
            locked = kind.resources(checked, env)
            # Every example locks something, but a test.sleep without resources.
            assert locked or (name == "test.sleep" and "resources" not in params), name
            declared = resource_names.declared(kind.resource_params, checked)
            assert declared == sorted(locked), (name, params, declared, locked)
            # The engine reads the same declaration from the published table.
            table = kind_table({"kinds": [kind.describe()]})
            assert table == {name: dict(kind.resource_params)}


def test_every_kind_publishes_its_declaration() -> None:
    for kind in KINDS.values():
        published = kind.describe()["resourceParams"]
        assert published == dict(kind.resource_params)
        assert published, f"{kind.name} locks something: declare it"
        assert all(isinstance(value, str) for value in published.values())


def test_names_by_class() -> None:
    declare: Callable[..., list[str]] = resource_names.declared
    assert declare({"device": "device"}, {"device": "/dev/sdb"}) == ["device:/dev/sdb"]
    assert declare({"source": "path", "destination": "path"},
                   {"source": "/srv/a.img", "destination": "/dev/sdc"}) == [
        "device:/dev/sdc", "file:/srv/a.img"]
    assert declare({"resources": "test"}, {"resources": ["b", "a", "a"]}) == [
        "test:a", "test:b"]
    assert declare({"volume": "gluster-volume"}, {"volume": "data"}) == [
        "gluster-volume:data"]
    # What the agent would refuse names nothing: a relative path, a wrong type, "".
    assert declare({"path": "path"}, {"path": "relative"}) == []
    assert declare({"path": "path", "volume": "gluster-volume"},
                   {"path": 5, "volume": ""}) == []
    assert declare({}, {"path": "/srv/a.img"}) == []


def test_an_older_agents_table_declares_nothing() -> None:
    """A kind without resourceParams (an agent before it) is None: no early lock."""
    answer = {"kinds": [{"name": "checksum", "description": "", "destructive": False,
                         "paramsSchema": {}, "resultSchema": {}},
                        {"name": "wipe", "resourceParams": {"device": "device", "x": 1}},
                        {"description": "no name"}, "garbage"]}
    assert kind_table(answer) == {"checksum": None, "wipe": {"device": "device"}}
    assert kind_table({"kinds": "nope"}) == {}
    assert kind_table(None) == {}
    name = str(uuid.uuid4())
    assert kind_table({"kinds": [{"name": name, "resourceParams": []}]}) == {name: None}
