"""The store across versions: it migrates forward, and a newer one is refused.

The upgrade of the real packages with a copy running, and the downgrade
refused in a booted systemd, are in the packaging test (packaging/test,
docs/packaging.md "Upgrades and downgrades"). Here: the same rules on the
store itself and a real agent process.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import peewee

from vdsm_agent.store import migrations
from vdsm_agent.store.models import Meta, SchemaVersion

MODELS = [Meta, SchemaVersion]


def open_db(path: Path) -> peewee.SqliteDatabase:
    db = peewee.SqliteDatabase(str(path))
    db.connect()
    return db


def test_a_store_of_the_previous_schema_migrates_forward(tmp_path):
    db = open_db(tmp_path / "agent.db")
    with db.bind_ctx(MODELS):
        migrate_from_3(db)
    db.close()


def migrate_from_3(db: peewee.SqliteDatabase) -> None:
    assert migrations.apply(db, migrations.MIGRATIONS[:3], SchemaVersion) == [1, 2, 3]
    db.execute_sql("INSERT INTO task (id, kind, params, request_hash, state, created_at) "
                   "VALUES ('t1', 'copy', '{}', 'h', 'running', 1.0)")
    assert migrations.migrate(db) == [4, 5]
    assert migrations.current_version(db) == migrations.latest_version() == 5
    assert db.execute_sql("SELECT id, launched_by, external FROM task").fetchall() == [
        ("t1", None, None)]


def test_an_agent_refuses_a_newer_store_and_leaves_it_alone(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = open_db(state / "agent.db")
    with db.bind_ctx(MODELS):
        migrations.migrate(db)
    db.execute_sql("INSERT INTO schema_version (version, description, applied_at) "
                   "VALUES (99, 'from the future', 0)")
    db.close()
    before = dump(state / "agent.db")
    done = subprocess.run([sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(state),
                           "--listen", "127.0.0.1:0", "--unix-socket", "none"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"vdsm-agent: cannot start: the store {state / 'agent.db'}: "
                              "its schema version is 99 ('from the future'), newer than this "
                              f"program knows ({migrations.latest_version()})"), message
    assert "downgrading is not supported" in message
    assert "Traceback" not in done.stderr
    assert dump(state / "agent.db") == before  # (opening it switched it to WAL: no data)


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return list(db.iterdump())
