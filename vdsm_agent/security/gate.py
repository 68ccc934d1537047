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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from vdsm_agent import errors
from vdsm_agent.security import audit
from vdsm_agent.security.identity import CURRENT_CALLER, Authenticator
from vdsm_agent.security.limits import Limiter
from vdsm_agent.security.roles import Role

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DISPATCHED = frozenset({"/jsonrpc"})
PUBLIC = frozenset({"/health", "/"})  # "/": a constant page saying how to call (home.py)


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
