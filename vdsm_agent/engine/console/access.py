"""Who is looking at the console, what they may do, and forged-form protection.

* The caller is the one the engine's gate identified for the request
  (``security.gate.caller_of``): a TLS client certificate's identity with its
  role from the engine's ``[roles]``, ``uid:N`` on its Unix socket, or
  anonymous over loopback TCP with ``loopback_role`` (else ``default_role``),
  exactly as its JSON-RPC API sees it.
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
import secrets

from aiohttp import web

from rpc_schema import ApiSchema
from vdsm_agent.security import gate
from vdsm_agent.security.identity import Caller
from vdsm_agent.security.roles import Role, parse_role


def caller_of(request: web.Request) -> Caller:
    """The request's caller, as the engine's gate identified it."""
    return gate.caller_of(request)


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
