"""The aiohttp application: routes, and the agent's life cycle as cleanup contexts."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

import rpc_schema
from vdsm_agent import __version__
from vdsm_agent.agent import Agent
from vdsm_agent.api import methods_table
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.devices.inventory import Inventory
from vdsm_agent.events import web as events_web
from vdsm_agent.events.feed import EventFeed
from vdsm_agent.metrics import agent as agent_metrics
from vdsm_agent.metrics import web as metrics_web
from vdsm_agent.security import audit, gate
from vdsm_agent.security.identity import Authenticator
from vdsm_agent.security.limits import Limiter
from vdsm_agent.server import home
from vdsm_agent.server.http import json_response, jsonrpc_response
from vdsm_agent.server.jsonrpc import Dispatcher
from vdsm_agent.settings import Config
from vdsm_agent.store import Store
from vdsm_agent.system import space
from vdsm_agent.tasks import web as tasks_web

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
AGENT = web.AppKey("agent", Agent)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
LIMITER = web.AppKey("limiter", Limiter)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)


async def handle_jsonrpc(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return await jsonrpc_response(request, request.app[DISPATCHER], config.max_body_size,
                                  config.header_timeout)


async def handle_health(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    return json_response({"status": "ok", "version": __version__, "uptime": round(agent.uptime, 3)})


async def _agent_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    state = config.state_path
    # Not readable by other users: the store holds task params and connections.
    state.mkdir(mode=0o750, parents=True, exist_ok=True)
    if state.stat().st_mode & 0o007:
        log.warning("state directory %s is open to other users (mode %o): it holds task "
                    "params and connections; chmod o-rwx it", state,
                    state.stat().st_mode & 0o777)
    started = time.monotonic()
    # A reserve of room in the state directory, given back when it fills up so
    # that the ends of tasks can still be recorded (vdsm_agent/system/space.py).
    store = await Store.open(state / "agent.db", space_reserve=space.DEFAULT_RESERVE)
    schema = rpc_schema.load("agent").compile()
    agent = Agent(config=config, schema=schema, store=store, inventory=Inventory(config),
                  started=started, events=EventFeed.from_config(config))
    app[AGENT] = agent
    app[DISPATCHER] = Dispatcher(schema, methods_table(), agent, max_batch=config.max_batch,
                                 limiter=app[LIMITER])
    audit_file = audit.install(config.audit_log)
    try:
        yield
    finally:
        audit.remove(audit_file)
        await store.close()


async def _connections_context(app: web.Application) -> AsyncIterator[None]:
    """Storage connections: manage the persisted ones again; stop monitoring at exit
    (targets stay attached so that the next start adopts them)."""
    agent = app[AGENT]
    # The tasks context (tasks_web.install) runs before this one, so the task
    # manager exists: unmanage asks it who holds "connection:<id>", and it asks
    # us which connections a task's paths are on (it then holds those too).
    tasks = agent.tasks
    if tasks is None:
        raise RuntimeError("the tasks context must be set up before the connections context")
    manager = ConnectionManager(agent.config, agent.store, resource_holder=tasks.holder_of)
    agent.connections = manager
    manager.listeners.append(agent.events.on_connection)  # before start: miss no change
    await manager.start()
    tasks.resource_resolver = manager.resources_for_paths
    try:
        yield
    finally:
        tasks.resource_resolver = None
        await manager.close()


async def _events_context(app: web.Application) -> AsyncIterator[None]:
    """The events feed follows the task manager (transitions and progress); the
    connection manager is followed from _connections_context. Closed at exit."""
    agent = app[AGENT]
    if agent.tasks is not None:
        agent.tasks.add_listener(agent.events.on_task_transition)
        agent.tasks.add_progress_listener(agent.events.on_task_progress)
    try:
        yield
    finally:
        agent.events.close()


def make_app(config: Config) -> web.Application:
    # Who may do what (docs/security.md): every request passes the gate, which
    # identifies the connection's caller; the dispatcher checks each verb's role.
    access = gate.access_control(
        config, loopback=metrics_web.LOOPBACK if config.loopback_metrics else ())
    # peewee's debug lines carry SQL parameters, i.e. task params as stored (secrets
    # included, security/redact.py): never log them, even at log level debug.
    logging.getLogger("peewee").setLevel(logging.INFO)
    app = web.Application(client_max_size=config.max_body_size,
                          middlewares=[access.middleware])
    app[CONFIG] = config
    app[AUTHENTICATOR] = access.authenticator
    app[LIMITER] = access.limiter
    app.cleanup_ctx.append(_agent_context)
    tasks_web.install(app, AGENT)  # after _agent_context: needs the agent and its store
    app.cleanup_ctx.append(_events_context)  # after the tasks context: subscribes to it
    events_web.install(app, AGENT)  # GET /events; ends long-polls and streams at shutdown
    # After _agent_context (the store) and the tasks context (resource wiring).
    app.cleanup_ctx.append(_connections_context)
    # GET /metrics (docs/metrics.md); last: it follows the task manager.
    metrics_web.install(app, lambda app: agent_metrics.setup(app[AGENT], app[DISPATCHER],
                                                             app[LIMITER]))
    app.router.add_post("/jsonrpc", handle_jsonrpc)
    app.router.add_get("/health", handle_health)
    home.install_agent(app, config)  # GET / and GET /jsonrpc (405): what to do instead
    return app
