"""The console's HTML, rendered on the server: whole pages and the rows live updates swap.

Every row has a stable element ID (``dom_id``) so a live update replaces that
row and nothing else. Everything shown is escaped here, in one place.
Accessibility: a skip link, landmarks, captions and ``scope`` on tables,
a label for every input, a name for every button (``aria-label`` where the
text alone is ambiguous), states written as words beside their colours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from vdsm_agent import __version__
from vdsm_agent.client.units import BYTE_KINDS, human_duration, human_rate, human_timestamp
from vdsm_agent.engine.console.data import Matrix, Paged, TaskFilter
from vdsm_agent.engine.states import TASK_FINAL, TaskState

NAV = (("hosts", "/console/", "Hosts"), ("tasks", "/console/tasks", "Tasks"),
       ("jobs", "/console/jobs", "Jobs"), ("connections", "/console/connections",
                                            "Connections"))
TASK_STATES = (*(str(state) for state in TaskState), "unknown")
HOST_STATES = ("up", "connecting", "non-responsive", "maintenance")


@dataclasses.dataclass(frozen=True)
class View:
    """Who is looking: their identity and role, their form token, what they may do."""

    who: str
    role: str
    token: str
    may: frozenset[str]  # action names (routes.ACTIONS) the role allows


def dom_id(*parts: str) -> str:
    """A stable element ID for any names (host names and IDs may hold any character)."""
    return "r" + hashlib.blake2s("\0".join(parts).encode(), digest_size=8).hexdigest()


def _attrs(**values: str) -> str:
    return "".join(f' {name.replace("_", "-")}="{escape(value)}"'
                   for name, value in values.items())


def link(path: str, query: Mapping[str, Any] | None = None) -> str:
    shown = {key: str(value) for key, value in (query or {}).items() if value not in ("", None)}
    return path + ("?" + urllib.parse.urlencode(shown) if shown else "")


def _many(number: int, thing: str) -> str:
    return f"{number} {thing}" + ("" if number == 1 else "s")


def age(stamp: str | None) -> str:
    return escape(human_timestamp(stamp)) if stamp else "never"


# -- the page ------------------------------------------------------------------------------


def layout(title: str, active: str, view: View, body: str,
           live: Mapping[str, str] | None = None) -> str:
    nav = "".join(
        f'<li><a href="{path}"{" aria-current=page" if name == active else ""}>{label}</a></li>'
        for name, path, label in NAV)
    live_attr = (f' data-live="{escape(link("/console/events", live))}"'
                 if live is not None else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · vdsm-engine</title>
<link rel="stylesheet" href="/console/static/console.css">
<script src="/console/static/console.js" defer></script>
</head><body{live_attr}>
<a class="skip" href="#main">Skip to content</a>
<header><h1>vdsm-engine {escape(__version__)}</h1>
<nav aria-label="Console"><ul>{nav}</ul></nav>
<p class="who">Signed in as <strong>{escape(view.who)}</strong>, role
<strong id="role">{escape(view.role)}</strong>
<span id="live" role="status" aria-live="polite"></span></p></header>
<main id="main"><h2>{escape(title)}</h2>
{body}
</main></body></html>
"""


def message(title: str, text: str, back: str = "/console/") -> str:
    return (f"<p>{escape(text)}</p>"
            f'<p><a href="{escape(back)}">Back</a></p>')


def pager(path: str, query: Mapping[str, Any], paged_page: int, pages: int,
          key: str = "page", label: str = "Pages") -> str:
    if pages <= 1:
        return ""
    items = []
    if paged_page > 1:
        items.append(f'<a href="{escape(link(path, {**query, key: paged_page - 1}))}" '
                     f'rel="prev">Previous</a>')
    items.append(f"<span>page {paged_page} of {pages}</span>")
    if paged_page < pages:
        items.append(f'<a href="{escape(link(path, {**query, key: paged_page + 1}))}" '
                     f'rel="next">Next</a>')
    return f'<nav class="pager" aria-label="{escape(label)}">{" ".join(items)}</nav>'


def action_form(view: View, action: str, label: str, name: str, back: str,
                **fields: str) -> str:
    """One button that posts ``action`` (only shown to a role that may)."""
    if action not in view.may:
        return ""
    hidden = "".join(f'<input type="hidden" name="{escape(key)}" value="{escape(value)}">'
                     for key, value in {"action": action, "token": view.token, "next": back,
                                        **fields}.items())
    return (f'<form method="post" action="/console/action" class="inline">{hidden}'
            f'<button type="submit" class="action {escape(action)}" '
            f'aria-label="{escape(name)}">{escape(label)}</button></form>')


# -- hosts ---------------------------------------------------------------------------------


def _counts(counts: Mapping[str, int], final: Iterable[str] = ()) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    busy = sum(number for state, number in counts.items() if state not in final)
    detail = ", ".join(f"{number} {state}" for state, number in sorted(counts.items()))
    return f'<span title="{escape(detail)}">{total}' + (
        f" ({busy} active)" if final and busy else "") + "</span>"


def host_row(host: Mapping[str, Any], view: View, back: str) -> str:
    name = host["name"]
    status = host["status"]
    error = host.get("lastError") or ""
    if host["maintenance"]:
        toggle = action_form(view, "maintenance-off", "Stop maintenance",
                             f"Stop maintenance of host {name}", back, host=name)
    else:
        toggle = action_form(view, "maintenance-on", "Start maintenance",
                             f"Start maintenance of host {name}", back, host=name)
    tasks_link = link("/console/tasks", {"host": name})
    return (f'<tr id="{dom_id("host", name)}" data-status="{escape(status)}">'
            f'<th scope="row"><a href="{escape(tasks_link)}">{escape(name)}</a></th>'
            f'<td><span class="status s-{escape(status)}"'
            f'{_attrs(title=error) if error else ""}>{escape(status)}</span></td>'
            f"<td>{age(host['lastSeen'])}</td>"
            f"<td>{escape(host['agentVersion'] or '-')}</td>"
            f"<td>{_counts(host['tasks'], TASK_FINAL)}</td>"
            f"<td>{_counts(host['connections'])}</td>"
            f"<td>{'yes' if host['maintenance'] else 'no'}</td>"
            f"<td>{toggle}</td></tr>")


def hosts_body(paged: Paged, status: str, view: View) -> str:
    back = link("/console/", {"status": status, "page": paged.page})
    options = "".join(f'<option{" selected" if state == status else ""}>{state}</option>'
                      for state in HOST_STATES)
    rows = "".join(host_row(host, view, back) for host in paged.items)
    return f"""<form method="get" action="/console/" class="filters">
<label for="f-status">Status</label>
<select id="f-status" name="status"><option value="">any</option>{options}</select>
<button type="submit">Filter</button></form>
<p>{_many(paged.total, 'host')}.</p>
<table><caption>Hosts (page {paged.page} of {paged.pages})</caption>
<thead><tr><th scope="col">Host</th><th scope="col">Status</th><th scope="col">Last seen</th>
<th scope="col">Agent version</th><th scope="col">Tasks</th><th scope="col">Connections</th>
<th scope="col">Maintenance</th><th scope="col">Actions</th></tr></thead>
<tbody id="rows">{rows}</tbody></table>
{pager("/console/", {"status": status}, paged.page, paged.pages)}"""


# -- tasks ---------------------------------------------------------------------------------


def progress(item: Mapping[str, Any]) -> str:
    doc = item.get("progress") or {}
    percent = doc.get("percent")
    words = []
    if percent is not None:
        words.append(f"{percent:.1f}%")
    if doc.get("rate") is not None:
        words.append(human_rate(float(doc["rate"]), in_bytes=item.get("kind") in BYTE_KINDS))
    if doc.get("eta") is not None and item["state"] not in TASK_FINAL:
        words.append(f"ETA {human_duration(float(doc['eta']))}")
    text = " · ".join(words) or "-"
    label = f"Progress of task {item['id']}"
    bar = (f'<progress max="100" value="{percent:.1f}" aria-label="{escape(label)}">'
           f"{percent:.1f}%</progress>" if percent is not None else "")
    return f'{bar}<span class="pct">{escape(text)}</span>'


def task_count(total: int) -> str:
    return f'<p id="count">{_many(total, "task")}, newest first.</p>'


def task_row(item: Mapping[str, Any], view: View, back: str) -> str:
    host, task_id, state = item["host"], item["id"], item["state"]
    detail = link(f"/console/tasks/{urllib.parse.quote(host, safe='')}/{task_id}")
    cancel = ("" if state in TASK_FINAL else action_form(
        view, "cancel", "Cancel", f"Cancel task {task_id} on host {host}", back,
        host=host, task=task_id))
    return (f'<tr id="{dom_id("task", host, task_id)}" data-state="{escape(state)}">'
            f'<td><a href="{escape(detail)}"><code>{escape(task_id[:8])}</code></a></td>'
            f"<td>{escape(host)}</td><td>{escape(item['kind'])}</td>"
            f'<td><span class="state t-{escape(state)}">{escape(state)}</span></td>'
            f"<td>{'yes' if item['external'] else 'no'}</td>"
            f'<td class="progress">{progress(item)}</td>'
            f"<td>{age(item['createdAt'])}</td><td>{cancel}</td></tr>")


def tasks_body(paged: Paged, where: TaskFilter, view: View) -> str:
    query = where.query_string()
    back = link("/console/tasks", {**query, "page": paged.page})
    states = "".join(f'<option{" selected" if state == where.state else ""}>{state}</option>'
                     for state in TASK_STATES)
    externals = "".join(
        f'<option value="{value}"{" selected" if value == where.external else ""}>{text}</option>'
        for value, text in (("", "any"), ("yes", "external only"), ("no", "engine's only")))
    rows = "".join(task_row(item, view, back) for item in paged.items)
    return f"""<form method="get" action="/console/tasks" class="filters">
<label for="f-host">Host</label>
<input id="f-host" name="host" value="{escape(where.host)}" size="16">
<label for="f-state">State</label>
<select id="f-state" name="state"><option value="">any</option>{states}</select>
<label for="f-kind">Kind</label>
<input id="f-kind" name="kind" value="{escape(where.kind)}" size="14">
<label for="f-external">Started</label>
<select id="f-external" name="external">{externals}</select>
<button type="submit">Filter</button></form>
{task_count(paged.total)}
<table><caption>Tasks (page {paged.page} of {paged.pages})</caption>
<thead><tr><th scope="col">Task</th><th scope="col">Host</th><th scope="col">Kind</th>
<th scope="col">State</th><th scope="col">External</th><th scope="col">Progress</th>
<th scope="col">Created</th><th scope="col">Actions</th></tr></thead>
<tbody id="rows">{rows}</tbody></table>
{pager("/console/tasks", query, paged.page, paged.pages)}"""


def task_summary(item: Mapping[str, Any], view: View, back: str) -> str:
    detail = item.get("detail") or {}
    error = (detail.get("error") or {}).get("message") if isinstance(detail, dict) else None
    cancel = ("" if item["state"] in TASK_FINAL else action_form(
        view, "cancel", "Cancel this task", f"Cancel task {item['id']} on host {item['host']}",
        back, host=item["host"], task=item["id"]))
    rows = [("Host", escape(item["host"])), ("Kind", escape(item["kind"])),
            ("State", f'<span class="state t-{escape(item["state"])}">'
                      f'{escape(item["state"])}</span>'),
            ("Progress", progress(item)), ("External", "yes" if item["external"] else "no"),
            ("Created", age(item["createdAt"])), ("Started", age(item["startedAt"])),
            ("Ended", age(item["endedAt"]) if item["endedAt"] else "-"),
            ("Job", escape(item.get("jobID") or "-"))]
    if error:
        rows.append(("Error", escape(str(error))))
    body = "".join(f'<tr><th scope="row">{name}</th><td>{value}</td></tr>'
                   for name, value in rows)
    return (f'<div id="{dom_id("task", item["host"], item["id"])}" data-state='
            f'"{escape(item["state"])}"><table class="facts"><caption>Task '
            f'<code>{escape(item["id"])}</code></caption><tbody>{body}</tbody></table>'
            f"{cancel}</div>")


def task_page(item: Mapping[str, Any], view: View) -> str:
    host_part = urllib.parse.quote(item["host"], safe="")
    output = f"/hosts/{host_part}/tasks/{item['id']}/output"
    back = f"/console/tasks/{host_part}/{item['id']}"
    return f"""{task_summary(item, view, back)}
<h3 id="output-title">Output</h3>
<p><a href="{escape(output)}">The whole output as text</a>
(followed live below while the task runs).</p>
<pre id="output" tabindex="0" aria-labelledby="output-title" aria-live="off"
 data-src="{escape(output)}?follow=1"></pre>"""


# -- jobs ------------------------------------------------------------------------------------


def job_block(job: Mapping[str, Any]) -> str:
    steps = []
    for step in job["steps"]:
        error = step.get("lastError") or {}
        said = error.get("message", "") if isinstance(error, dict) else str(error)
        target = ""
        if step.get("taskID"):
            path = f"/console/tasks/{urllib.parse.quote(step['host'], safe='')}/{step['taskID']}"
            target = (f'<a href="{escape(path)}">'
                      f'task <code>{escape(step["taskID"][:8])}</code></a>')
        elif step.get("connectionID"):
            target = f"connection {escape(step['connectionID'])}"
        steps.append(
            f"<tr><td></td><td>{escape(step['host'])}</td><td>{escape(step['action'])}</td>"
            f'<td><span class="state j-{escape(step["state"])}">{escape(step["state"])}</span>'
            f"</td><td>{target}</td><td>{step['attempts']}</td><td>{escape(said)}</td></tr>")
    return (f'<tbody id="{dom_id("job", job["jobID"])}" class="job">'
            f'<tr><th scope="rowgroup"><code>{escape(job["jobID"][:8])}</code></th>'
            f'<td colspan="2">{escape(job["action"])}</td>'
            f'<td><span class="state j-{escape(job["state"])}">{escape(job["state"])}</span></td>'
            f'<td colspan="3">created {age(job["createdAt"])}</td></tr>{"".join(steps)}</tbody>')


def jobs_body(paged: Paged) -> str:
    blocks = "".join(job_block(job) for job in paged.items)
    return f"""<p>{_many(paged.total, 'job')}, newest first; each with its steps, one per host.</p>
<table id="jobs"><caption>Jobs (page {paged.page} of {paged.pages})</caption>
<thead id="jobs-head"><tr><th scope="col">Job</th><th scope="col">Host</th>
<th scope="col">Action</th><th scope="col">State</th><th scope="col">Target</th>
<th scope="col">Attempts</th><th scope="col">Last error</th></tr></thead>
{blocks}</table>
{pager("/console/jobs", {}, paged.page, paged.pages)}"""


# -- connections -------------------------------------------------------------------------------


def matrix_cell(connection_id: str, host: str, cell: Mapping[str, Any]) -> str:
    title = f"{connection_id} on {host}: {cell['state']}"
    if cell.get("lastKnownState") and cell["lastKnownState"] != cell["state"]:
        title += f" (last known: {cell['lastKnownState']})"
    if cell.get("lastError"):
        title += f"; last error: {cell['lastError']}"
    health = escape(cell["health"])
    return (f'<td id="{dom_id("cell", connection_id, host)}" class="cell h-{health}"'
            f'{_attrs(title=title)}>{escape(cell["state"])}</td>')


def matrix_body(matrix: Matrix, view: View) -> str:
    back = link("/console/connections", {"page": matrix.page, "hpage": matrix.host_page})
    head = "".join(f'<th scope="col">{escape(host)}</th>' for host in matrix.hosts)
    rows = []
    for cid in matrix.ids:
        cells = "".join(matrix_cell(cid, host, matrix.cells[(cid, host)])
                        for host in matrix.hosts)
        hosts = ",".join(host for host in matrix.hosts
                         if matrix.cells[(cid, host)]["health"] != "none")
        unmanage = action_form(view, "unmanage", "Unmanage",
                               f"Unmanage connection {cid} on its hosts", back,
                               connection=cid, hosts=hosts)
        uris = ", ".join(matrix.uris.get(cid, []))
        rows.append(f'<tr><th scope="row" title="{escape(uris)}">{escape(cid)}</th>{cells}'
                    f"<td>{unmanage}</td></tr>")
    manage = ""
    if "manage" in view.may:
        manage = f"""<form method="post" action="/console/action" class="manage">
<fieldset><legend>Manage a storage connection</legend>
<input type="hidden" name="action" value="manage">
<input type="hidden" name="token" value="{escape(view.token)}">
<input type="hidden" name="next" value="{escape(back)}">
<label for="m-id">Connection ID</label> <input id="m-id" name="connection" required>
<label for="m-uri">URI</label> <input id="m-uri" name="uri" required size="40">
<label for="m-hosts">Hosts (comma-separated)</label> <input id="m-hosts" name="hosts" required>
<button type="submit">Manage</button></fieldset></form>"""
    legend = "".join(f'<li><span class="cell h-{state}">{state}</span></li>'
                     for state in ("connected", "degraded", "disconnected", "unknown", "none"))
    return f"""<p>Each cell is one host's state of one connection; hover (or focus) a cell
for its last error. Legend:</p><ul class="legend">{legend}</ul>
<div class="scroll"><table id="matrix"><caption>Connections by host
(page {matrix.page} of {matrix.pages}, hosts {matrix.host_page} of {matrix.host_pages})</caption>
<thead><tr><th scope="col">Connection ID</th>{head}<th scope="col">Actions</th></tr></thead>
<tbody id="rows">{"".join(rows)}</tbody></table></div>
{pager("/console/connections", {"hpage": matrix.host_page}, matrix.page, matrix.pages)}
{pager("/console/connections", {"page": matrix.page}, matrix.host_page, matrix.host_pages,
       "hpage", "Host columns")}
{manage}"""


# -- actions -------------------------------------------------------------------------------------


def confirm(view: View, question: str, fields: Mapping[str, str], yes: str, back: str) -> str:
    hidden = "".join(f'<input type="hidden" name="{escape(key)}" value="{escape(value)}">'
                     for key, value in {**fields, "token": view.token, "confirm": "yes"}.items())
    return (f'<form method="post" action="/console/action" class="confirm">'
            f"<p>{escape(question)}</p>{hidden}"
            f'<button type="submit" class="danger">{escape(yes)}</button> '
            f'<a href="{escape(back)}">No, go back</a></form>')


def stamp() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())
