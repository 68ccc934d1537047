"""Calling a server: one JSON-RPC call over the client's transport, its answer decoded.

``Caller`` is what the command and a watch use to call verbs; a long-poll (a
verb with a ``timeout`` param) gets an HTTP timeout of its own wait plus a
margin, so that ``waitTask timeout=10 --timeout 5`` is not cut off by the client.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from rpc_schema import ApiSchema
from vdsm_agent.client.program import Program
from vdsm_agent.client.transport import Answer, Target, TlsFiles, post

# A long-poll (a verb with a "timeout" param) gets its own timeout plus this
# much before the client gives up on the HTTP answer.
LONG_POLL_MARGIN = 10.0
class RpcError(Exception):
    """The server answered a JSON-RPC error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message")))
        self.error = error

    @property
    def name(self) -> str:
        data = self.error.get("data")
        return str(data.get("name")) if isinstance(data, dict) else ""


class NotJsonRpc(Exception):
    """An HTTP answer that is not a JSON-RPC 2.0 response to our request."""


def _is_reply(reply: Any) -> bool:
    """A JSON-RPC 2.0 response to our request (id 1), or an error without an id."""
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
        return False
    if ("result" in reply) == ("error" in reply):
        return False
    if "error" in reply:
        error = reply["error"]
        if not isinstance(error, dict) or type(error.get("code")) is not int:
            return False
        return reply.get("id") in (1, None)
    return bool(reply.get("id") == 1)


def decode(answer: Answer) -> Any:
    """The result of an HTTP answer; RpcError for an error answer, NotJsonRpc."""
    http_problem = f"HTTP {answer.status} {answer.reason}".rstrip()
    try:
        reply = json.loads(answer.body)
    except ValueError:
        snippet = answer.body[:200].decode("utf-8", "replace").strip()
        if answer.status != 200:
            raise NotJsonRpc(f"{http_problem}: {snippet}" if snippet else http_problem) \
                from None
        raise NotJsonRpc(f"the answer is not JSON: {snippet!r}") from None
    if not _is_reply(reply):
        problem = "the answer is not a JSON-RPC 2.0 response"
        raise NotJsonRpc(f"{http_problem}: {problem}" if answer.status != 200 else problem)
    if "error" in reply:
        raise RpcError(reply["error"])
    return reply["result"]


class Caller:
    """Calls verbs of one server, for the command and for a watch."""

    def __init__(self, program: Program, schema: ApiSchema, target: Target, tls: TlsFiles,
                 timeout: float, verbose: bool = False) -> None:
        self.program = program
        self.schema = schema
        self.target = target
        self.tls = tls
        self.timeout = timeout
        self.verbose = verbose

    def has(self, method: str, *params: str) -> bool:
        """Whether the schema has this verb, with these params."""
        verb = self.schema.verb(method)
        return verb is not None and set(params) <= set(verb.params.get("properties", {}))

    def http_timeout(self, method: str, params: Mapping[str, Any]) -> float:
        """--timeout, or more for a long-poll: its own timeout plus a margin."""
        verb = self.schema.verb(method)
        declared = (verb.params.get("properties", {}) if verb else {}).get("timeout")
        if not isinstance(declared, dict):
            return self.timeout
        wait = params.get("timeout", declared.get("default", 0))
        if isinstance(wait, int | float) and not isinstance(wait, bool):
            return max(self.timeout, float(wait) + LONG_POLL_MARGIN)
        return self.timeout

    def call(self, method: str, params: Mapping[str, Any]) -> Any:
        """The result; RpcError, NotJsonRpc or TransportError."""
        request = {"jsonrpc": "2.0", "method": method, "params": dict(params), "id": 1}
        body = json.dumps(request, separators=(",", ":")).encode()
        if self.verbose:
            print(f"> POST {self.target}", file=sys.stderr)
            print(f"> {body.decode()}", file=sys.stderr)
        answer = post(self.target, body, self.http_timeout(method, params), self.tls,
                      self.program.server)
        if self.verbose:
            print(f"< HTTP {answer.status} {answer.reason}", file=sys.stderr)
        return decode(answer)
