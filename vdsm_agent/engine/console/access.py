"""Who is looking at the console, what they may do, and forged-form protection.

* The caller is the one the engine's HTTP layer identified for the request
  (``security.identity.current()``: a TLS client certificate's identity, with
  its role from the engine's ``[roles]``), exactly as its JSON-RPC API sees it.
  Until the engine identifies callers itself, a request has no caller there
  and ``caller_of`` makes the one the agent makes for a loopback TCP client:
  anonymous, with ``loopback_role`` when set, else ``default_role``
  (``interim_role``; the one place to change when the engine has its own gate).
* What a role may do is what the engine's API says: each action is a verb,
  and the verb's ``"role"`` in ``rpc_schema/engine.json`` is what it needs.
  The page hides what the role may not do; the server checks again on every
  POST, and the engine's dispatcher checks a third time.
* Forms post a token (an HMAC of the caller's identity under a key made at
  start-up), and a POST whose ``Origin`` is another site's, or that a browser
  marks cross-site (``Sec-Fetch-Site``), is refused before anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any

from aiohttp import web

from rpc_schema import ApiSchema
from vdsm_agent.security import identity
from vdsm_agent.security.identity import ANONYMOUS, Caller
from vdsm_agent.security.roles import Role, RolePolicy, parse_role

# Until the engine has roles of its own settings, any loopback caller may call
# every verb of its API; this variable lets an operator (and the tests) give the
# console's anonymous caller less. Ignored once the engine's config has roles.
INTERIM_ROLE_VARIABLE = "VDSM_ENGINE_CONSOLE_ROLE"


def interim_role(config: Any) -> Role:
    """The role of an anonymous loopback caller, as the agent finds it."""
    loopback = getattr(config, "loopback_role", None)
    default = getattr(config, "default_role", None)
    if loopback is None and default is None:
        # An engine without role settings answers every verb to a loopback caller.
        return parse_role(os.environ.get(INTERIM_ROLE_VARIABLE, "admin"))
    policy = RolePolicy.build((), str(default or "none"), str(loopback or ""))
    return policy.loopback if policy.loopback is not None else policy.default


def caller_of(request: web.Request, config: Any) -> Caller:
    """The request's caller: the engine's, or the interim anonymous one."""
    caller = identity.current()
    if caller is not None:
        return caller
    return Caller(ANONYMOUS, "tcp", interim_role(config))


def required_role(schema: ApiSchema, verb: str) -> Role:
    return parse_role(str(schema.verbs[verb].role))


class Tokens:
    """Form tokens: unguessable by another site, bound to the caller's identity."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def token(self, caller: Caller) -> str:
        message = f"{caller.transport}:{caller.identity}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def valid(self, caller: Caller, token: str) -> bool:
        return hmac.compare_digest(self.token(caller), token)


def cross_site(request: web.Request) -> str | None:
    """Why this POST looks like it came from another site (None: same origin)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return f"the form came from {origin}, not from this console"
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"the browser says the form is {site}"
    return None
