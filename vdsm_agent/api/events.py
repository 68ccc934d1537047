"""The events verb: a long-poll over ``vdsm_agent.events.feed.EventFeed``."""

from __future__ import annotations

from typing import Any

from vdsm_agent import errors
from vdsm_agent.agent import Agent


async def get_events(agent: Agent, since: int = 0, timeout: float = 0,
                     epoch: str | None = None, maxEvents: int = 1000) -> dict[str, Any]:
    limit = agent.config.events_max_wait
    if timeout > limit:
        # The schema cannot know the setting: its maximum is checked here.
        raise errors.InvalidParams(
            f"params.timeout must be at most {limit:g} seconds (setting events_max_wait)",
            field="params.timeout", rule="maximum", maximum=limit)
    page = await agent.events.wait(since, float(timeout), epoch, maxEvents)
    return page.to_api()


HANDLERS = {
    "getEvents": get_events,
}
