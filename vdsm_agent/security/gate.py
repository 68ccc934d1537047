"""The HTTP gate: every request is identified; routes other than JSON-RPC need ``read``.

An aiohttp middleware (one per application), fail-closed for any route added
later:

* every request: find the connection's ``Caller`` (cached) and put it in
  ``identity.CURRENT_CALLER``;
* ``POST /jsonrpc``: passed on; the dispatcher checks each verb's role and
  takes the in-flight slots (it knows the batch size);
* ``GET /health``: public (load balancers, systemd checks; it tells the
  version and uptime only), and ``GET /``, a constant page saying how to call
  the agent (``GET /jsonrpc``, its 405 hint, is on the dispatched path);
* anything else (``GET /tasks/{id}/output``, an events stream, ...): the caller
  needs at least ``read`` (HTTP 403 otherwise, logged in the audit log) and a
  long-poll slot of the in-flight limits for as long as the response streams
  (HTTP 429 with a ``LimitExceeded`` body otherwise; security/limits.py). Both bodies are JSON:
  ``{"error": {"code", "message", "name", ...}}``. ``GET /metrics`` is one of
  these, but an anonymous loopback TCP caller may read it with
  ``loopback_metrics`` on (the default: a Prometheus on the host).

The agent and the engine build theirs alike (``access_control``: one role
policy, authenticator, limiter and middleware from the same settings). A
handler asks who calls with ``caller_of(request)``: identity, transport and
role, as the gate found them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from vdsm_agent import errors
from vdsm_agent.security import audit
from vdsm_agent.security.identity import CURRENT_CALLER, Authenticator, Caller
from vdsm_agent.security.limits import LONG_POLL_VERBS, LONG_POLLS_SAID, Limiter
from vdsm_agent.security.roles import Role, RolePolicy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DISPATCHED = frozenset({"/jsonrpc"})
PUBLIC = frozenset({"/health", "/"})  # "/": a constant page saying how to call (home.py)
CALLER = web.RequestKey("vdsm_caller", Caller)


def caller_of(request: web.Request) -> Caller:
    """Who sent ``request``, as the gate identified its connection:

    * ``caller.identity``: a verified certificate's first name (subject CN, then
      subjectAltNames), ``uid:N`` for a Unix socket peer (``SO_PEERCRED``), or
      ``anonymous`` for a loopback TCP caller (nothing attests who that is);
    * ``caller.transport``: ``tls``, ``unix`` or ``tcp``;
    * ``caller.role``: a ``roles.Role`` (none < read < operate < admin), compare
      with ``caller.role >= Role.OPERATE``.

    Every request that reached a handler passed the gate, which set it; a
    request made without the gate (an application built without it) is
    ``unknown`` with role none."""
    caller = request.get(CALLER)
    return caller if caller is not None else Caller("unknown", "unknown", Role.NONE)


def error_response(status: int, error: errors.RpcError) -> web.Response:
    return web.Response(body=orjson.dumps(error.to_body()), status=status,
                        content_type="application/json")


def middleware(authenticator: Authenticator, limiter: Limiter,
               loopback: Collection[str] = ()) -> Middleware:
    """``loopback``: routes that an anonymous loopback TCP caller may read whatever
    its role (``GET /metrics`` with ``loopback_metrics``, docs/security.md)."""
    cached = authenticator.cached
    anonymous_routes = frozenset(loopback)

    @web.middleware
    async def security_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        caller = cached(transport) if transport is not None else None
        if caller is None:
            caller = await authenticator.caller(transport)
        CURRENT_CALLER.set(caller)
        request[CALLER] = caller
        path = request.path
        if path in DISPATCHED or path in PUBLIC:
            return await handler(request)
        what = f"{request.method} {path}"
        if caller.role < Role.READ and not (path in anonymous_routes
                                            and caller.transport == "tcp"):
            forbidden = errors.Forbidden(
                f"{caller} has role {caller.role}; {what} needs read",
                identity=caller.identity, role=str(caller.role), required=str(Role.READ))
            audit.record(caller, what, dict(request.query), event="forbidden",
                         required=str(Role.READ), error=forbidden.to_error())
            return error_response(403, forbidden)
        if not limiter.admit_long_poll(caller):
            return error_response(429, limiter.refusal(caller, long_poll=True))
        try:
            return await handler(request)
        finally:
            limiter.release_long_poll(caller)

    return security_gate


class AccessSettings(Protocol):
    """What ``access_control`` reads of a program's config (the agent's and the
    engine's tables have these rows)."""

    @property
    def roles(self) -> list[tuple[str, str]]: ...
    @property
    def default_role(self) -> str: ...
    @property
    def loopback_role(self) -> str: ...
    @property
    def max_concurrent_requests(self) -> int: ...
    @property
    def max_requests_per_connection(self) -> int: ...
    @property
    def max_long_polls(self) -> int: ...
    @property
    def reserved_requests(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class AccessControl:
    """One program's gate: who is who (``authenticator``), its in-flight slots
    (``limiter``, also the dispatcher's) and the middleware to install."""

    authenticator: Authenticator
    limiter: Limiter
    middleware: Middleware


def access_control(config: AccessSettings, *, loopback: Collection[str] = (),
                   program: str = "agent", long_poll_verbs: frozenset[str] = LONG_POLL_VERBS,
                   long_polls_said: str = LONG_POLLS_SAID) -> AccessControl:
    """The gate for a program's application (``loopback``: as for ``middleware``)."""
    policy = RolePolicy.build(config.roles, config.default_role, config.loopback_role)
    authenticator = Authenticator(policy)
    limiter = Limiter(config.max_concurrent_requests, config.max_requests_per_connection,
                      max_long_polls=config.max_long_polls, reserved=config.reserved_requests,
                      program=program, long_poll_verbs=long_poll_verbs,
                      long_polls_said=long_polls_said)
    return AccessControl(authenticator, limiter, middleware(authenticator, limiter, loopback))
