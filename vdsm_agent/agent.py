"""The agent's runtime context: what every verb handler receives first."""

from __future__ import annotations

import dataclasses
import time

from rpc_schema import ApiSchema
from vdsm_agent.devices.inventory import Inventory
from vdsm_agent.settings import Config
from vdsm_agent.store import Store


@dataclasses.dataclass
class Agent:
    config: Config
    schema: ApiSchema
    store: Store
    inventory: Inventory
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started
