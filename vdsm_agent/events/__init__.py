"""The events feed: a bounded, sequence-numbered record of task transitions,
task progress and storage connection state changes (``feed``), served by the
``getEvents`` long-poll verb and the ``GET /events`` stream (``web``).

See docs/events.md for the contract.
"""

from vdsm_agent.events.feed import EventFeed, Page

__all__ = ["EventFeed", "Page"]
