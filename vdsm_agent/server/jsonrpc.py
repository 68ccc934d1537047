"""JSON-RPC 2.0 dispatch: the one translation point from exceptions to errors.

jsonrpcserver does method lookup, argument binding, the call and the response
objects. In front of it we do what the library does not do to spec or fast
enough (see docs/design.md, "JSON-RPC dispatch"):

* batches are answered member by member (the library rejects a whole batch
  for one bad member);
* the request envelope is checked by a small hand-written validator (the
  library's jsonschema validator costs ~50 µs a request);
* params are validated against ``rpc_schema`` with compiled validators before
  any handler runs;
* every handler is wrapped so that ``RpcError`` becomes its JSON-RPC error and
  anything unexpected becomes -32603 with a correlation ID that is logged,
  never the exception text;
* access control and limits (``vdsm_agent.security``, docs/security.md): the
  HTTP layer puts the connection's ``Caller`` in ``CURRENT_CALLER``; each call
  takes an in-flight slot (a batch one per member, at once; a long-poll also
  one of the long-poll pool; some slots are kept for admin callers) or
  answers ``LimitExceeded``; a verb beyond the caller's role (``"role"`` in the
  schema, stronger for some params with ``"roleWhen"``) answers ``Forbidden``;
  calls of mutating verbs (declared role operate or admin) and every refusal
  are written to the audit log. Without a caller (in-process use: tests,
  benchmarks; the engine's own API) none of this applies.

The hot path is kept cheap (docs/benchmarks.md): the library's per-request
``inspect.signature(...).bind`` (about half the cost of a ``ping``) is replaced
by a check against each handler's parameter names, computed once (``routes``); only
when that check fails does the library's own binding run, so a params/handler
mismatch still gets the library's -32602 answer. The call itself goes through
``jsonrpcserver.async_dispatcher.call``; success answers are built as a dict
directly and error answers by the library's response functions. Each call is
counted by method and outcome and timed (``metrics.counters.RpcStats``, for
``GET /metrics``): two ``perf_counter`` calls and a few additions, no lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Mapping
from time import perf_counter
from typing import Any, cast

import orjson
from jsonrpcserver import Error, Success
from jsonrpcserver.async_dispatcher import call
from jsonrpcserver.dispatcher import to_response, validate_args
from jsonrpcserver.request import Request
from jsonrpcserver.response import to_serializable_one
from jsonrpcserver.sentinels import NOID
from oslash.either import Left

from rpc_schema import ApiSchema, ParamsInvalid
from vdsm_agent import errors
from vdsm_agent.metrics.counters import RpcStats
from vdsm_agent.security import audit, redact
from vdsm_agent.security.identity import CURRENT_CALLER, Caller
from vdsm_agent.security.limits import LONG_POLL_VERBS, Limiter
from vdsm_agent.security.roles import Role
from vdsm_agent.server.routes import Handler, Route

log = logging.getLogger(__name__)

_ADMIN = Role.ADMIN
_ENVELOPE_KEYS = frozenset(("jsonrpc", "method", "params", "id"))


def error_response(code: int, message: str, data: Any = None, id: Any = None) -> dict[str, Any]:
    """A protocol error answer (parse error, invalid request, method not found)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return error_answer(error, id)


def error_answer(error: dict[str, Any], id: Any = None) -> dict[str, Any]:
    """The answer carrying ``error`` (``RpcError.to_error``, ``errors.refused_request``)."""
    return {"jsonrpc": "2.0", "error": error, "id": id}


def _envelope_problem(member: Any) -> str | None:
    """Why ``member`` is not a JSON-RPC 2.0 request object, or None if it is."""
    if type(member) is not dict:
        return "a request must be a JSON object"
    if member.get("jsonrpc") != "2.0":
        return 'member "jsonrpc" must be exactly "2.0"'
    if type(member.get("method")) is not str:
        return 'member "method" must be a string'
    if "params" in member and type(member["params"]) not in (dict, list):
        return 'member "params" must be an object or an array'
    if "id" in member:
        ident = member["id"]
        if ident is not None and type(ident) not in (str, int, float):
            return 'member "id" must be a string, a number or null'
    if not _ENVELOPE_KEYS.issuperset(member):
        extra = sorted(set(member) - _ENVELOPE_KEYS)
        return f"unexpected members: {', '.join(extra)}"
    return None


def translate_errors(handler: Handler) -> Handler:
    """Wrap a handler: its return value becomes Success, its exceptions errors."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return Success(await handler(*args, **kwargs))
        except errors.RpcError as exc:
            error = exc.to_error()
            # Errors echo what the caller sent (a URI, a path): never a secret.
            return Error(error["code"], error["message"], redact.value(error["data"]))
        except Exception:
            correlation_id = uuid.uuid4().hex[:16]
            log.exception("unexpected error in %s [correlation_id=%s]",
                          handler.__name__, correlation_id)
            error = errors.InternalError(correlationId=correlation_id).to_error()
            return Error(error["code"], error["message"], error["data"])

    return wrapper


class Dispatcher:
    """Dispatches JSON-RPC bodies to one application's methods table."""

    def __init__(self, schema: ApiSchema, handlers: Mapping[str, Handler], context: Any,
                 max_batch: int, *, limiter: Limiter | None = None) -> None:
        missing = set(schema.verbs) - set(handlers)
        undocumented = set(handlers) - set(schema.verbs)
        if missing or undocumented:
            raise RuntimeError(
                f"handlers and schema differ: missing {sorted(missing)}, "
                f"undocumented {sorted(undocumented)}")
        self.schema = schema
        self.methods = {name: translate_errors(fn) for name, fn in handlers.items()}
        self.context = context
        self.max_batch = max_batch
        self.limiter = limiter
        # The verbs that hold a long-poll slot (the limiter's: the agent's waitTask
        # and getEvents, the engine's waitJob).
        self._long_polls = limiter.long_poll_verbs if limiter is not None else LONG_POLL_VERBS
        self._routes = {name: Route.of(schema.verbs[name], method)
                        for name, method in self.methods.items()}
        # Calls by method and outcome, durations (GET /metrics; docs/metrics.md).
        self.stats = RpcStats(frozenset(self.methods))

    async def dispatch(self, body: bytes) -> bytes | None:
        """Answer a request body; None when nothing is to be sent back."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self.stats.refused(None, "ParseError")
            return orjson.dumps(error_response(errors.PARSE_ERROR, "Parse error", str(exc)))
        caller = CURRENT_CALLER.get()
        if type(payload) is list:
            return await self._dispatch_batch(payload, caller)
        limiter = self.limiter
        if caller is None or limiter is None:
            started = perf_counter()
            answer = await self.dispatch_one(payload)
            self.stats.record(payload, answer, perf_counter() - started)
        elif _is_long_poll(payload, self._long_polls):
            answer = await self._long_poll(payload, caller, limiter)
        elif (limiter.in_flight < (limiter.max_total if caller.role is _ADMIN
                                   else limiter.max_ordinary)
              and caller.in_flight < limiter.max_per_connection):
            # Limiter.admit(caller, 1) and release inlined: this is the hot path
            # (and _timed_one, as above).
            limiter.in_flight += 1
            caller.in_flight += 1
            started = perf_counter()
            try:
                answer = await self.dispatch_one(payload, caller)
            finally:
                limiter.in_flight -= 1
                caller.in_flight -= 1
            self.stats.record(payload, answer, perf_counter() - started)
        else:
            answer = self._over_limit(payload, caller, limiter)
        return None if answer is None else orjson.dumps(answer)

    async def _long_poll(self, member: Any, caller: Caller, limiter: Limiter) -> Any:
        """waitTask, getEvents: a slot of the long-poll pool too, or LimitExceeded."""
        if not limiter.admit_long_poll(caller):
            return self._over_limit(member, caller, limiter, long_poll=True)
        return await self._run_admitted(member, caller, limiter, True)

    async def _run_admitted(self, member: Any, caller: Caller, limiter: Limiter,
                            long_poll: bool) -> Any:
        try:
            return await self._timed_one(member, caller)
        finally:
            if long_poll:
                limiter.release_long_poll(caller)
            else:
                limiter.release(caller, 1)

    async def _dispatch_batch(self, batch: list[Any], caller: Caller | None) -> bytes | None:
        if not batch:
            self.stats.refused(None, "InvalidRequest")
            return orjson.dumps(error_response(
                errors.INVALID_REQUEST, "Invalid request", "an empty batch is not a request"))
        if len(batch) > self.max_batch:
            self.stats.refused(None, errors.LimitExceeded.name)
            return orjson.dumps(error_answer(errors.refused_request(errors.LimitExceeded(
                f"a batch may hold at most {self.max_batch} members", limit="max_batch",
                max=self.max_batch))))
        limiter = self.limiter
        if caller is None or limiter is None:
            answers = await asyncio.gather(*(self._timed_one(member) for member in batch))
        else:
            # Slots for the whole batch at once, in member order: the members
            # beyond the free slots are refused, predictably (security/limits.py).
            admitted: list[Awaitable[Any]] = []
            refused: list[dict[str, Any] | None] = []
            for member in batch:
                long_poll = _is_long_poll(member, self._long_polls)
                if limiter.admit_long_poll(caller) if long_poll else limiter.admit(caller, 1):
                    admitted.append(self._run_admitted(member, caller, limiter, long_poll))
                else:
                    refused.append(self._over_limit(member, caller, limiter, long_poll))
            answers = [*await asyncio.gather(*admitted), *refused]
        replies = [answer for answer in answers if answer is not None]
        return orjson.dumps(replies) if replies else None

    async def _timed_one(self, member: Any, caller: Caller | None = None
                         ) -> dict[str, Any] | None:
        started = perf_counter()
        answer = await self.dispatch_one(member, caller)
        self.stats.record(member, answer, perf_counter() - started)
        return answer

    def _over_limit(self, member: Any, caller: Caller, limiter: Limiter,
                    long_poll: bool = False) -> dict[str, Any] | None:
        """The answer to a member that got no in-flight slot (it is not run)."""
        problem = _envelope_problem(member)
        if problem is not None:
            self.stats.refused(member, "InvalidRequest")
            return error_response(errors.INVALID_REQUEST, "Invalid request", problem)
        self.stats.refused(member, errors.LimitExceeded.name)
        error = limiter.refusal(caller, long_poll).to_error()
        route = self._routes.get(member["method"])
        if route is not None and route.audited:  # a caller exists here
            audit.record(caller, route.verb.name, member.get("params"), event="limit",
                         error=error)
        ident = member.get("id", NOID)
        return None if ident is NOID else error_answer(error, ident)

    def _refuse(self, route: Route, caller: Caller | None, params: Any, ident: Any,
                exc: errors.RpcError) -> dict[str, Any] | None:
        """An error answer before the handler runs (audited for mutating verbs)."""
        error = exc.to_error()
        if route.audited and caller is not None:
            audit.record(caller, route.verb.name, params, error=error)
        return None if ident is NOID else error_answer(error, ident)

    def _forbidden(self, route: Route, caller: Caller, params: Any, ident: Any,
                   required: Role) -> dict[str, Any] | None:
        name = route.verb.name
        error = errors.Forbidden(
            f"{caller} has role {caller.role}; {name} needs {required}"
            + ("" if required == route.role else " with these params"),
            method=name, identity=caller.identity, role=str(caller.role),
            required=str(required)).to_error()
        audit.record(caller, name, params, event="forbidden", error=error,
                     required=str(required))
        return None if ident is NOID else error_answer(error, ident)

    async def dispatch_one(self, member: Any, caller: Caller | None = None
                           ) -> dict[str, Any] | None:
        """Answer one request object (None for a notification). Its callers count
        and time it (``stats``): ``dispatch`` inline, the others by ``_timed_one``."""
        problem = _envelope_problem(member)
        if problem is not None:
            return error_response(errors.INVALID_REQUEST, "Invalid request", problem)
        ident = member.get("id", NOID)
        name = member["method"]
        route = self._routes.get(name)
        if route is None:
            if ident is NOID:
                return None
            return error_response(errors.METHOD_NOT_FOUND, "Method not found", name, ident)
        if caller is not None and route.role > caller.role:
            return self._forbidden(route, caller, member.get("params"), ident, route.role)
        # A fresh dict when params are absent or []: the compiled validator fills
        # in schema defaults in place, and the handler gets what was validated.
        params = member.get("params")
        if params is None:
            params = {}
        elif type(params) is list:
            if params:
                return self._refuse(route, caller, params, ident, errors.InvalidParams(
                    "params must be given by name (a JSON object)", field="params",
                    rule="paramStructure"))
            params = {}
        try:
            route.verb.validate_params(params)
        except ParamsInvalid as exc:
            return self._refuse(route, caller, params, ident, errors.InvalidParams(
                exc.message, field=exc.field, rule=exc.rule))
        if caller is not None and route.elevations:
            required = route.required(params)
            if required > caller.role:
                return self._forbidden(route, caller, params, ident, required)
        request = Request(name, params, ident)
        binding = route.binding
        if binding is not None and binding.binds(params):
            result = await call(request, self.context, route.method)
        else:
            # The handler's signature and the schema disagree (or the signature
            # has a shape we do not pre-check): the library binds, and answers
            # -32602 when it cannot.
            bound = validate_args(request, self.context, route.method)
            result = bound if isinstance(bound, Left) else await call(
                request, self.context, route.method)
        if route.audited and caller is not None:
            _audit_outcome(route, caller, params, result)
        if ident is NOID:
            return None
        if isinstance(result, Left):
            return cast(dict[str, Any], to_serializable_one(to_response(request, result)))
        return {"jsonrpc": "2.0", "result": result._value.result, "id": ident}


def _is_long_poll(member: Any, verbs: frozenset[str]) -> bool:
    """Whether ``member`` calls one of the long-poll ``verbs`` (security/limits.py), on
    the hot path: a subscript and a set lookup; anything malformed is not one."""
    try:
        return member["method"] in verbs
    except (KeyError, TypeError, IndexError):
        return False


def _audit_outcome(route: Route, caller: Caller | None, params: Any, result: Any) -> None:
    if isinstance(result, Left):
        failure = result._error
        audit.record(caller, route.verb.name, params,
                     error={"code": failure.code, "message": failure.message,
                            "data": failure.data})
    else:
        audit.record(caller, route.verb.name, params, result=result._value.result)
