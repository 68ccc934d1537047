"""Driving a hollow process from outside: its control API, its hosts file, and the
registration of its hosts with an engine.

``call(control_url, command, **params)`` is one control command (``status``,
``hosts``, ``freeze``, ``thaw``, ``kill``, ``start``, ``restart``, ``rates``,
``tick``, ``resetCounters``; see ``server.HollowFleet``); ``register`` adds
every host of a hosts file to an engine with ``addHost`` (JSON-RPC batches).
"""

from __future__ import annotations

import http.client
import itertools
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson


class ControlError(Exception):
    """The control API (or the engine) answered an error, or could not be reached."""


def _post(url: str, body: bytes, timeout: float) -> Any:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                            timeout=timeout)
    try:
        connection.request("POST", parts.path or "/", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    except OSError as exc:
        raise ControlError(f"{url}: {exc}") from None
    finally:
        connection.close()
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ControlError(f"{url}: HTTP {response.status}, not JSON: {payload[:200]!r}") from None


def call(control_url: str, command: str, timeout: float = 60.0, **params: Any) -> Any:
    """One control command; its result, or ControlError."""
    answer = _post(control_url, orjson.dumps(
        {"jsonrpc": "2.0", "method": command, "params": params, "id": 1}), timeout)
    if "error" in answer:
        raise ControlError(f"{command}: {answer['error'].get('message')}: "
                           f"{answer['error'].get('data')}")
    return answer["result"]


def read_hosts_file(path: str | Path) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(Path(path).read_bytes())
    return document


def register(engine_url: str, hosts: Iterable[dict[str, Any]], batch: int = 100,
             timeout: float = 120.0) -> int:
    """``addHost`` every host (a ``{name, url}`` each) with the engine at ``engine_url``,
    ``batch`` per JSON-RPC batch; hosts it already has (HostExists) are skipped. The
    number added."""
    added = 0
    iterator = iter(hosts)
    while chunk := list(itertools.islice(iterator, batch)):
        body = orjson.dumps([{"jsonrpc": "2.0", "method": "addHost", "id": index,
                              "params": {"name": host["name"], "url": host["url"]}}
                             for index, host in enumerate(chunk)])
        answers = _post(engine_url, body, timeout)
        if not isinstance(answers, list):
            raise ControlError(f"addHost batch: {answers}")
        for answer in answers:
            error = answer.get("error")
            if error is None:
                added += 1
            elif (error.get("data") or {}).get("name") != "HostExists":
                raise ControlError(f"addHost: {error}")
    return added


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true, lists), else the text."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def command_params(words: Sequence[str]) -> dict[str, Any]:
    """``name=value`` words into params; bare words are host selectors (``hosts``)."""
    params: dict[str, Any] = {}
    hosts: list[Any] = []
    for word in words:
        name, equals, value = word.partition("=")
        if equals and name.isidentifier():
            params[name] = parse_value(value)
        else:
            hosts.append(parse_value(word))
    if hosts:
        params["hosts"] = hosts
    return params
