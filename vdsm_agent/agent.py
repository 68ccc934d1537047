"""The agent's runtime context: what every verb handler receives first."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from rpc_schema import ApiSchema
from vdsm_agent.devices.inventory import Inventory
from vdsm_agent.events.feed import EventFeed
from vdsm_agent.settings import Config
from vdsm_agent.store import Store

if TYPE_CHECKING:
    from vdsm_agent.connections.manager import ConnectionManager
    from vdsm_agent.tasks.manager import TaskManager


@dataclasses.dataclass
class Agent:
    config: Config
    schema: ApiSchema
    store: Store
    inventory: Inventory
    started: float = dataclasses.field(default_factory=time.monotonic)
    # Set by the tasks cleanup context (vdsm_agent.tasks.web.install) once it runs.
    tasks: TaskManager | None = None
    # Set by the connections cleanup context (server/app.py) once it runs.
    connections: ConnectionManager | None = None
    # The events feed (getEvents, GET /events); server/app.py makes it from the
    # config and subscribes it to the task and connection managers.
    events: EventFeed = dataclasses.field(default_factory=EventFeed)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started
