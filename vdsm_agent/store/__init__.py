"""Durable state: peewee models on sqlite (WAL), owned by one DB thread."""

from vdsm_agent.store.db import Store

__all__ = ["Store"]
