"""Helpers for the device-operation tests: an in-process agent and data checks.

The agent is the real app (pytest-aiohttp) with real task processes, like
tests/test_tasks_api.py; every task process is killed at teardown. Loop
devices, mounts and swap come from tests/devices_fixtures.py (``lab``) and
are undone whatever the test did.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import RpcFailure
from tests.tasks_support import TaskAgent, in_process_agents

MiB = 1024 * 1024


class Agent(TaskAgent):
    """With the device-operation tests' helpers."""

    async def refused(self, kind: str, **params: Any) -> RpcFailure:
        """startTask that must be refused at submit."""
        return await self.fails("startTask", kind=kind, params=params)

    async def run(self, kind: str, **params: Any) -> dict[str, Any]:
        return await self.finish(await self.start(kind, **params))

    async def task(self, task_id: str) -> dict[str, Any]:
        return dict(await self.call("getTask", taskID=task_id))

    async def output(self, task_id: str) -> str:
        text = ""
        offset = 0
        while True:
            chunk = await self.call("getTaskOutput", taskID=task_id, offset=offset)
            text += chunk["data"]
            offset = chunk["nextOffset"]
            if not chunk["data"]:
                return text

    async def device(self, path: str) -> dict[str, Any]:
        devices = (await self.call("getDeviceList"))["devices"]
        name = os.path.basename(os.path.realpath(path))
        return dict(next(device for device in devices if device["name"] == name))


@pytest.fixture
async def agents(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """Factory of in-process agents with task settings; kills task processes after."""
    async with in_process_agents(aiohttp_client, tmp_path, Agent) as make:
        yield make


@pytest.fixture
async def agent(agents: Any) -> Agent:
    made: Agent = await agents()
    return made


def digest(path: str | Path, offset: int = 0, length: int | None = None) -> str:
    """sha256 of a byte range of a file or block device (read without O_DIRECT)."""
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as stream:
        stream.seek(offset)
        left = length
        while left is None or left > 0:
            data = stream.read(MiB if left is None else min(MiB, left))
            if not data:
                break
            sha.update(data)
            if left is not None:
                left -= len(data)
    return sha.hexdigest()


def size_of(path: str | Path) -> int:
    with open(path, "rb") as stream:
        return stream.seek(0, os.SEEK_END)


def is_zero(path: str | Path, offset: int, length: int) -> bool:
    zeros = bytes(MiB)
    with open(path, "rb", buffering=0) as stream:
        stream.seek(offset)
        while length > 0:
            data = stream.read(min(MiB, length))
            if not data:
                return False
            if data != zeros[:len(data)]:
                return False
            length -= len(data)
    return True


def fill(path: str | Path, size: int, seed: int = 1) -> None:
    """Pseudo-random bytes over ``size`` bytes of a file or device (no zero block)."""
    block = hashlib.sha512(str(seed).encode()).digest() * 2048  # 128 KiB
    with open(path, "r+b" if os.path.exists(path) else "wb", buffering=0) as stream:
        counter = 0
        left = size
        while left > 0:
            chunk = (hashlib.sha256(counter.to_bytes(8, "little")).digest() + block)
            chunk = chunk[:min(left, len(chunk))]
            stream.write(chunk)
            left -= len(chunk)
            counter += 1
        os.fsync(stream.fileno())


def blkid(device: str) -> dict[str, str]:
    result = subprocess.run(["blkid", "-p", "-o", "export", "--", device],
                            capture_output=True, text=True, check=False, timeout=30)
    values = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False,
                          timeout=120)


def drop_caches(device: str) -> None:
    """Forget cached pages of a block device (so a read sees what is on it)."""
    subprocess.run(["blockdev", "--flushbufs", device], check=True, timeout=30)
