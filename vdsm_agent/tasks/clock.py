"""Moved to ``vdsm_agent.common.clock`` (the one home of timestamps).

Kept importable for code written against the old place (``benchmarks/hollow``
imports it); new code imports ``vdsm_agent.common.clock``.
"""

from __future__ import annotations

from vdsm_agent.common.clock import now, parse_rfc3339, rfc3339

__all__ = ["now", "parse_rfc3339", "rfc3339"]
