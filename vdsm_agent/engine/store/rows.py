"""What every query of the engine's store shares: JSON columns, timestamps, transactions.

Every function of the store modules (``hosts``, ``steps``, ``host_tasks``,
``host_connections``, and ``repository`` which gathers them) runs on the DB
thread, one call of ``EngineStore.run`` each, holding its whole transaction.
"""

from __future__ import annotations

from typing import Any

import orjson

from vdsm_agent.common.clock import parse_rfc3339
from vdsm_agent.engine.store.models import engine_proxy

# Rows per multi-row insert and IDs per IN (...): well under sqlite's limit on
# bound values (999 on older builds) whatever the row's width (peewee.chunked).
BATCH = 100


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def timestamp(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return parse_rfc3339(value)
        except ValueError:
            return None
    return None


def atomic() -> Any:
    return engine_proxy.atomic()
