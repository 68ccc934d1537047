"""The engine's durable state: its own peewee models and proxy, one DB thread,
forward migrations; sqlite by default, PostgreSQL by URL."""

from vdsm_agent.engine.store.db import EngineStore

__all__ = ["EngineStore"]
