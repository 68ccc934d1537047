"""``GET /metrics``: the Prometheus text exposition of a program's registry.

The families are built from the programs' counts and state when the route is
read (``families.registry``), on the event loop: reading the counts while
the loop changes them would need locks on the hot path. A scrape of the
agent costs about 1 ms (docs/benchmarks.md, "Metrics"). Who may read it is
the gate's business (agent: ``security/gate.py``, ``loopback_metrics``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from vdsm_agent.metrics import families

PATH = "/metrics"
# The agent's routes a loopback TCP caller may read with loopback_metrics on.
LOOPBACK = frozenset({PATH})
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)

# Given the application once it is set up: the function that yields the
# program's families at each scrape.
Setup = Callable[[web.Application], Callable[[], Iterable[Metric]]]


async def handle_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application, setup: Setup) -> None:
    """Serve ``GET /metrics``. ``setup(app)`` runs once the cleanup contexts added
    before this call are set up (it may subscribe to what they made)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        app[REGISTRY] = families.registry(setup(app))
        yield

    app.cleanup_ctx.append(context)
    app.router.add_get(PATH, handle_metrics)
