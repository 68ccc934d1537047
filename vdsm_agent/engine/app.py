"""The engine's aiohttp application: POST /jsonrpc, GET /health, GET / and its life cycle.

Secured as the agent is, by the agent's code (docs/security.md, docs/engine.md
"Security"): every request passes the gate (``security.gate``: the caller's
identity from a verified certificate or ``SO_PEERCRED``, else anonymous with
``loopback_role``/``default_role``); the dispatcher checks each verb's role
(``"role"`` in ``rpc_schema/engine.json``), takes in-flight slots (``waitJob``
a long-poll slot) and writes the audit log of every mutating call; ``GET
/hosts/H/tasks/T/output`` and ``GET /metrics`` need read (``GET /metrics``
not from a loopback caller with ``loopback_metrics``). A handler learns who
calls with ``security.gate.caller_of(request)``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

import rpc_schema
from vdsm_agent import __version__
from vdsm_agent.engine import console, output
from vdsm_agent.engine.api import methods_table
from vdsm_agent.engine.engine import Engine
from vdsm_agent.engine.settings import EngineConfig, redact_url
from vdsm_agent.engine.store import EngineStore
from vdsm_agent.metrics import engine as engine_metrics
from vdsm_agent.metrics import web as metrics_web
from vdsm_agent.security import audit, gate
from vdsm_agent.security.identity import Authenticator
from vdsm_agent.security.limits import Limiter
from vdsm_agent.server import home
from vdsm_agent.server.http import json_response, jsonrpc_response
from vdsm_agent.server.jsonrpc import Dispatcher

log = logging.getLogger(__name__)

CONFIG = web.AppKey("engine_config", EngineConfig)
ENGINE = web.AppKey("engine", Engine)
DISPATCHER = web.AppKey("engine_dispatcher", Dispatcher)
LIMITER = web.AppKey("engine_limiter", Limiter)
AUTHENTICATOR = web.AppKey("engine_authenticator", Authenticator)

# The engine's long-polls (each holds a slot of max_long_polls) and, for the
# refusal's message, its streams too.
LONG_POLL_VERBS = frozenset({"waitJob"})
LONG_POLLS_SAID = "waitJob, GET /hosts/{host}/tasks/{id}/output"


async def handle_jsonrpc(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return await jsonrpc_response(request, request.app[DISPATCHER], config.max_body_size,
                                  config.header_timeout)


async def handle_health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    statuses: dict[str, int] = {}
    for host in engine.hosts():
        statuses[str(host.status)] = statuses.get(str(host.status), 0) + 1
    return json_response({"status": "ok", "version": __version__, "uptime": round(engine.uptime, 3),
                  "database": engine.store.kind, "hosts": statuses})


async def _engine_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.state_path.mkdir(parents=True, exist_ok=True)
    url = config.database_url
    log.info("engine store: %s", redact_url(url))
    store = await EngineStore.open(url)
    schema = rpc_schema.load("engine").compile()
    engine = Engine(config=config, schema=schema, store=store)
    app[ENGINE] = engine
    app[DISPATCHER] = Dispatcher(schema, methods_table(), engine, max_batch=config.max_batch,
                                 limiter=app[LIMITER])
    audit_file = audit.install(config.audit_log)
    try:
        await engine.start()
        yield
    finally:
        try:
            await engine.close()
            await store.close()
        finally:
            audit.remove(audit_file)


def make_app(config: EngineConfig) -> web.Application:
    # Who may do what: the agent's gate, roles and limits (security/gate.py).
    access = gate.access_control(
        config, loopback=metrics_web.LOOPBACK if config.loopback_metrics else (),
        program="engine", long_poll_verbs=LONG_POLL_VERBS, long_polls_said=LONG_POLLS_SAID)
    app = web.Application(client_max_size=config.max_body_size,
                          middlewares=[access.middleware])
    app[CONFIG] = config
    app[AUTHENTICATOR] = access.authenticator
    app[LIMITER] = access.limiter
    app.cleanup_ctx.append(_engine_context)
    app.router.add_post("/jsonrpc", handle_jsonrpc)
    app.router.add_get("/health", handle_health)
    # GET /metrics (docs/metrics.md): read, or any loopback caller with loopback_metrics.
    metrics_web.install(app, lambda app: engine_metrics.setup(app[ENGINE], app[DISPATCHER]))
    output.install(app, lambda request: request.app[ENGINE])  # GET /hosts/H/tasks/T/output
    home.install(app, *home.engine_page(home.jsonrpc_url(config.listen)))  # GET /, GET /jsonrpc
    console.install(app, ENGINE, DISPATCHER)  # the web console: /console/, docs/console.md
    return app
