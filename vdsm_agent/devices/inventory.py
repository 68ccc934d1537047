"""Device inventory (placeholder; the full implementation follows)."""

from __future__ import annotations

from typing import Any

from vdsm_agent.settings import Config


class Inventory:
    def __init__(self, config: Config) -> None:
        self.config = config

    async def list(self, paths: list[str] | None = None) -> list[dict[str, Any]]:
        return []
