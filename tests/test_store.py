"""The store: sqlite in WAL mode on one DB thread, forward migrations."""

from __future__ import annotations

import threading

from vdsm_agent.store import Store
from vdsm_agent.store.migrations import latest_version
from vdsm_agent.store.models import Meta, SchemaVersion


async def test_open_migrates_to_latest(tmp_path):
    store = await Store.open(tmp_path / "a.db")
    try:
        versions = await store.run(lambda: [row.version for row in SchemaVersion.select()])
        assert versions == list(range(1, latest_version() + 1))
        mode = await store.run(lambda: Meta._meta.database.execute_sql(
            "PRAGMA journal_mode").fetchone()[0])
        assert mode == "wal"
    finally:
        await store.close()


async def test_reopen_keeps_data_and_applies_nothing_twice(tmp_path):
    store = await Store.open(tmp_path / "a.db")
    instance = await store.run(lambda: Meta.get_by_id("instance_id").value)
    await store.close()
    store = await Store.open(tmp_path / "a.db")
    try:
        assert await store.run(lambda: Meta.get_by_id("instance_id").value) == instance
        count = await store.run(SchemaVersion.select().count)
        assert count == latest_version()
    finally:
        await store.close()


async def test_all_access_runs_on_one_db_thread(tmp_path):
    store = await Store.open(tmp_path / "a.db")
    try:
        names = {await store.run(lambda: threading.current_thread().name) for _ in range(5)}
        assert len(names) == 1
        assert names.pop().startswith("vdsm-db")
        assert threading.current_thread().name != "vdsm-db"
    finally:
        await store.close()


async def test_transaction_rolls_back_on_error(tmp_path):
    store = await Store.open(tmp_path / "a.db")

    def failing_write() -> None:
        with store.atomic():
            Meta.create(key="half", value="done")
            raise ValueError("abort")

    try:
        try:
            await store.run(failing_write)
        except ValueError:
            pass
        assert await store.run(lambda: Meta.get_or_none(Meta.key == "half")) is None
    finally:
        await store.close()
