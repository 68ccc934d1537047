"""The console's pages and its one action endpoint.

GET pages need the ``read`` role; ``POST /console/action`` takes a form
(``action``, ``token`` and the action's fields), refuses a cross-site or
tokenless post (403), checks the caller's role against the verb's (403),
asks for a confirmation of a destructive action (a page with a second
button: no JavaScript needed) and then calls the verb through the engine's
own JSON-RPC dispatcher, which validates its params, checks the role once
more and writes the audit log. Success redirects back (303); a refusal by
the engine is shown in words.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

from aiohttp import web

from vdsm_agent import errors
from vdsm_agent.engine.console import access, data, render
from vdsm_agent.engine.engine import Engine
from vdsm_agent.security import audit
from vdsm_agent.security.identity import Caller
from vdsm_agent.security.roles import Role
from vdsm_agent.server.jsonrpc import Dispatcher

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Action:
    verb: str
    destructive: bool
    question: str  # the confirmation's question, formatted with the form's fields
    yes: str


ACTIONS: dict[str, Action] = {
    "cancel": Action("cancelTask", True, "Cancel task {task} on host {host}? Its process "
                     "is stopped and the task ends canceled.", "Yes, cancel the task"),
    "maintenance-on": Action("setHostMaintenance", True, "Put host {host} in maintenance? "
                             "The engine stops polling it and runs no steps there.",
                             "Yes, start maintenance"),
    "maintenance-off": Action("setHostMaintenance", False, "", ""),
    "manage": Action("manageStorageConnection", False, "", ""),
    "unmanage": Action("unmanageStorageConnection", True, "Unmanage connection {connection} "
                       "on {hosts}? A target no other ID uses is disconnected.",
                       "Yes, unmanage it"),
}


def _params(action: str, form: Any) -> dict[str, Any]:
    hosts = [host.strip() for host in str(form.get("hosts", "")).split(",") if host.strip()]
    if action == "cancel":
        return {"host": form.get("host", ""), "taskID": form.get("task", "")}
    if action in ("maintenance-on", "maintenance-off"):
        return {"name": form.get("host", ""), "maintenance": action == "maintenance-on"}
    if action == "manage":
        return {"hosts": hosts, "uri": form.get("uri", ""),
                "connectionID": form.get("connection", "")}
    return {"hosts": hosts, "connectionID": form.get("connection", "")}


def page_number(request: web.Request, key: str = "page") -> int:
    text = request.query.get(key, "1")
    return int(text) if text.isdigit() and 0 < len(text) < 7 else 1


def _safe_next(text: str) -> str:
    """Only back into the console (never an open redirect)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme or parts.netloc or not parts.path.startswith("/console"):
        return "/console/"
    return text


class Console:
    def __init__(self, engine_of: Callable[[web.Application], Engine],
                 dispatcher_of: Callable[[web.Application], Dispatcher]) -> None:
        self.engine_of = engine_of
        self.dispatcher_of = dispatcher_of
        self.tokens = access.Tokens()

    # -- who is asking -------------------------------------------------------------------

    def caller(self, request: web.Request) -> Caller:
        return access.caller_of(request)

    def view(self, request: web.Request) -> render.View:
        caller = self.caller(request)
        schema = self.engine_of(request.app).schema
        may = frozenset(name for name, action in ACTIONS.items()
                        if caller.role >= access.required_role(schema, action.verb))
        return render.View(str(caller.identity), str(caller.role), self.tokens.token(caller),
                           may)

    def page(self, request: web.Request, title: str, active: str, body: str,
             live: dict[str, str] | None = None, status: int = 200) -> web.Response:
        text = render.layout(title, active, self.view(request), body, live)
        return web.Response(text=text, status=status, content_type="text/html",
                            headers={"Cache-Control": "no-store",
                                     "X-Content-Type-Options": "nosniff",
                                     "X-Frame-Options": "DENY",
                                     "Content-Security-Policy":
                                         "default-src 'self'; frame-ancestors 'none'"})

    def refuse(self, request: web.Request, status: int, text: str) -> web.Response:
        return self.page(request, "Refused", "", render.message("Refused", text), status=status)

    def readable(self, request: web.Request) -> bool:
        return self.caller(request).role >= Role.READ

    # -- pages -----------------------------------------------------------------------------

    async def hosts(self, request: web.Request) -> web.Response:
        if not self.readable(request):
            return self.refuse(request, 403, "Reading the console needs the read role.")
        status = request.query.get("status", "")
        paged = await data.hosts_page(self.engine_of(request.app), page_number(request),
                                      status or None)
        body = render.hosts_body(paged, status, self.view(request))
        return self.page(request, "Hosts", "hosts", body,
                         {"view": "hosts", "status": status, "page": str(paged.page)})

    async def tasks(self, request: web.Request) -> web.Response:
        if not self.readable(request):
            return self.refuse(request, 403, "Reading the console needs the read role.")
        where = data.TaskFilter.from_query(request.query)
        paged = await data.tasks_page(self.engine_of(request.app), where,
                                      page_number(request))
        body = render.tasks_body(paged, where, self.view(request))
        return self.page(request, "Tasks", "tasks", body,
                         {"view": "tasks", "page": str(paged.page), **where.query_string()})

    async def task(self, request: web.Request) -> web.Response:
        if not self.readable(request):
            return self.refuse(request, 403, "Reading the console needs the read role.")
        host, task_id = request.match_info["host"], request.match_info["task_id"].lower()
        item = await data.task_detail(self.engine_of(request.app), host, task_id)
        if item is None:
            return self.refuse(request, 404, f"The engine knows no task {task_id} on {host}.")
        return self.page(request, f"Task {task_id[:8]} on {host}", "tasks",
                         render.task_page(item, self.view(request)),
                         {"view": "task", "host": host, "task": task_id})

    async def jobs(self, request: web.Request) -> web.Response:
        if not self.readable(request):
            return self.refuse(request, 403, "Reading the console needs the read role.")
        paged = await data.jobs_page(self.engine_of(request.app), page_number(request))
        return self.page(request, "Jobs", "jobs", render.jobs_body(paged),
                         {"view": "jobs", "page": str(paged.page)})

    async def connections(self, request: web.Request) -> web.Response:
        if not self.readable(request):
            return self.refuse(request, 403, "Reading the console needs the read role.")
        matrix = await data.matrix(self.engine_of(request.app), page_number(request),
                                   page_number(request, "hpage"))
        return self.page(request, "Connections", "connections",
                         render.matrix_body(matrix, self.view(request)),
                         {"view": "connections", "page": str(matrix.page),
                          "hpage": str(matrix.host_page), "sig": matrix.signature()})

    # -- actions ---------------------------------------------------------------------------

    async def action(self, request: web.Request) -> web.Response:
        why = access.cross_site(request)
        if why is not None:
            return self.refuse(request, 403, f"Refused: {why}.")
        form = await request.post()
        caller = self.caller(request)
        name = str(form.get("action", ""))
        action = ACTIONS.get(name)
        if action is None:
            return self.refuse(request, 400, f"Unknown action {name!r}.")
        engine = self.engine_of(request.app)
        required = access.required_role(engine.schema, action.verb)
        back = _safe_next(str(form.get("next", "/console/")))
        if caller.role < required:
            forbidden = errors.Forbidden(
                f"{caller} has role {caller.role}; {action.verb} needs {required}",
                identity=caller.identity, role=str(caller.role), required=str(required))
            # Audited as the dispatcher audits a refusal (the verb, as the console's).
            audit.record(caller, action.verb, _params(name, form), event="forbidden",
                         required=str(required), error=forbidden.to_error())
            return self.refuse(request, 403, f"Refused: your role is {caller.role}; "
                                             f"{action.verb} needs {required}.")
        if not self.tokens.valid(caller, str(form.get("token", ""))):
            return self.refuse(request, 403, "Refused: the form has no valid token "
                                             "(reload the page and try again).")
        fields = {key: str(form.get(key, "")) for key in
                  ("action", "host", "task", "connection", "hosts", "uri", "next")}
        if action.destructive and form.get("confirm") != "yes":
            question = action.question.format(**fields)
            body = render.confirm(self.view(request), question, fields, action.yes, back)
            return self.page(request, "Please confirm", "", body)
        member = {"jsonrpc": "2.0", "method": action.verb, "params": _params(name, form),
                  "id": 1}
        answer = await self.dispatcher_of(request.app).dispatch_one(member, caller) or {}
        if "error" in answer:
            error = answer["error"]
            data = error.get("data") if isinstance(error.get("data"), dict) else {}
            said = data.get("detail") or error.get("message")
            return self.refuse(request, 409 if error.get("code", 0) > 0 else 400,
                               f"The engine refused {action.verb} ({data.get('name', '')}): "
                               f"{said}")
        log.info("console: %s called %s %s", caller, action.verb, member["params"])
        raise web.HTTPSeeOther(back)
