"""The hollow process: N simulated agents behind real sockets, and their control API.

Two ways to address the hosts (``FleetOptions.path_per_host``):

* **a port per host** (default): ``http://127.0.0.1:PORT/jsonrpc``, one
  listening socket each, exactly like N agents. A dead host's port refuses
  connections (its listening socket is closed and its connections are
  aborted, as the kernel does for a killed process).
* **a path per host**: one port, ``http://127.0.0.1:PORT/h/INDEX/jsonrpc``.
  The engine's client and poller use such a URL as is, but ``addHost``'s
  schema (rpc_schema/engine.json) takes no path other than ``/jsonrpc``: the
  hosts must be written into the engine's database (``bench --path-per-host``
  does). No listening socket per host, but a dead host cannot refuse a
  connection on a shared port: its requests are aborted instead (the engine
  sees an unreachable host either way).

A **frozen** host (like SIGSTOP) still accepts connections (the kernel's
backlog would) but answers nothing: a request waits, before and after it is
handled, until the host is thawed; a long-poll in flight stays parked. A
**killed** host is dead until ``start``, which, like ``restart``, brings it
back as a new process: a new epoch and an empty feed, its tasks and
connections kept (or forgotten with ``reset``).

Requests are answered from the verbs in ``verbs`` through aiohttp's
low-level server (no router, no middlewares, no access log); the answer's
JSON-RPC envelope is glued around the verb's encoded result. Handlers are
cancelled when their client goes away, so a frozen host's parked calls cost
nothing once the engine has given up on them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import random
import resource
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest

from benchmarks.hollow import generator
from benchmarks.hollow.state import HollowHost, HostOptions
from benchmarks.hollow.verbs import VERBS
from vdsm_agent import errors

LIST_VERBS = frozenset({"listTasks", "getStorageConnectionList"})
log = logging.getLogger(__name__)

JSON = "application/json"
PATH_PREFIX = "/h/"
AGENT_PATH = "/jsonrpc"
CONTROL_PATH = "/control"


@dataclasses.dataclass(frozen=True)
class FleetOptions:
    hosts: int
    listen: str = "127.0.0.1"
    base_port: int = 0  # 0: the kernel picks each port (path per host: the one port)
    path_per_host: bool = False
    control_port: int = 0
    tasks: int = 10  # finished tasks per host at start
    connections: int = 1  # managed connections per host at start
    rates: dict[str, float] = dataclasses.field(default_factory=dict)
    host: HostOptions = dataclasses.field(default_factory=HostOptions)
    seed: int = 0
    prefix: str = "hollow"


def host_names(count: int, prefix: str = "hollow") -> list[str]:
    width = max(4, len(str(count - 1)))
    return [f"{prefix}{index:0{width}d}" for index in range(count)]


def raise_open_files(needed: int) -> int:
    """Raise RLIMIT_NOFILE to at least ``needed`` if allowed (root may raise the hard
    limit too); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def descriptors_needed(options: FleetOptions) -> int:
    """Listening sockets, plus ~3 connections per host (the engine's long-poll and its
    resync pair), plus room."""
    per_host = 3 if options.path_per_host else 4
    return options.hosts * per_host + 1024


def _envelope(ident: Any, result: bytes) -> bytes:
    return b"".join((b'{"jsonrpc":"2.0","id":', orjson.dumps(ident), b',"result":', result,
                     b"}"))


def _error_envelope(ident: Any, error: dict[str, Any]) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": ident, "error": error})


def _protocol_error(code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return error


class HollowFleet:
    """The hosts, their sockets, their event generator and the control API."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        rng = random.Random(options.seed)
        self.hosts = [HollowHost(index, name, options.host, rng)
                      for index, name in enumerate(host_names(options.hosts, options.prefix))]
        self.by_name = {host.name: host for host in self.hosts}
        for host in self.hosts:
            host.seed_finished(options.tasks)
            for number in range(options.connections):
                host.add_connection(f"sd-{number + 1}",
                                    f"nfs://nfs{number + 1}.hollow.example/exports/{host.name}")
        self.requests: collections.Counter[str] = collections.Counter()
        self.unknown: collections.Counter[str] = collections.Counter()
        # Connections accepted, by host index (-1: the shared port of --path-per-host):
        # what a client that keeps its connections alive does not cost.
        self.accepted: collections.Counter[int] = collections.Counter()
        # getEvents in flight by host index, and the lists read while one was: an
        # engine that resyncs between two long-polls reads none beside one.
        self._polling: collections.Counter[int] = collections.Counter()
        self.beside_poll = 0
        self.generator = generator.EventGenerator(self.hosts, options.rates, options.seed)
        self.control_url = ""
        self._ports: dict[int, int] = {}  # host index -> port
        self._listeners: dict[int, asyncio.Server] = {}  # host index -> its listener
        self._http: dict[int, web.Server] = {}  # host index -> its connections' manager
        self._inflight: dict[int, set[asyncio.Transport]] = collections.defaultdict(set)
        self._shared: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._revivals: set[asyncio.Task[None]] = set()

    # -- sockets ------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.options.path_per_host:
            shared = web.Server(self._handle_path, handler_cancellation=True, access_log=None)
            self._shared = await loop.create_server(self._counted(-1, shared),
                                                    self.options.listen,
                                                    self.options.base_port, backlog=1024)
            port = self._shared.sockets[0].getsockname()[1]
            for host in self.hosts:
                self._ports[host.index] = port
                host.url = f"http://{self.options.listen}:{port}{PATH_PREFIX}{host.index}" \
                           f"{AGENT_PATH}"
        else:
            for host in self.hosts:
                port = self.options.base_port + host.index if self.options.base_port else 0
                await self._listen(host, port)
        control = web.Server(self._handle_control, access_log=None)
        self._control = await loop.create_server(control, self.options.listen,
                                                 self.options.control_port)
        control_port = self._control.sockets[0].getsockname()[1]
        self.control_url = f"http://{self.options.listen}:{control_port}{CONTROL_PATH}"
        self.generator.start()

    def _counted(self, index: int, http: web.Server) -> Callable[[], asyncio.Protocol]:
        """``http``'s protocol factory, counting the connections it accepts."""
        def accept() -> asyncio.Protocol:
            self.accepted[index] += 1
            return http()
        return accept

    async def _listen(self, host: HollowHost, port: int) -> None:
        http = self._http.get(host.index)
        if http is None:
            http = web.Server(functools.partial(self._handle_port, host),
                              handler_cancellation=True, access_log=None)
            self._http[host.index] = http
        try:
            listener = await asyncio.get_running_loop().create_server(
                self._counted(host.index, http), self.options.listen, port, backlog=128)
        except OSError as exc:
            raise OSError(exc.errno, f"host {host.name}: cannot listen on "
                                     f"{self.options.listen}:{port}: {exc.strerror}") from None
        self._listeners[host.index] = listener
        port = listener.sockets[0].getsockname()[1]
        self._ports[host.index] = port
        host.url = f"http://{self.options.listen}:{port}{AGENT_PATH}"

    async def close(self) -> None:
        await self.generator.close()
        for task in self._revivals:
            task.cancel()
        for host in self.hosts:
            host.close()
        servers = [*self._listeners.values(), self._shared, self._control]
        for server in servers:
            if server is not None:
                server.close()
        for http in self._http.values():
            for handler in http.connections:
                handler.force_close()

    # -- requests -----------------------------------------------------------------------------

    async def _handle_port(self, host: HollowHost, request: BaseRequest) -> web.StreamResponse:
        return await self._answer(host, request)

    async def _handle_path(self, request: BaseRequest) -> web.StreamResponse:
        path = request.path
        host = None
        if path.startswith(PATH_PREFIX) and path.endswith(AGENT_PATH):
            index = path[len(PATH_PREFIX):-len(AGENT_PATH)]
            if index.isdigit() and int(index) < len(self.hosts):
                host = self.hosts[int(index)]
        if host is None:
            return web.Response(status=404, text="no such hollow host\n")
        transport = request.transport
        if transport is None:
            return web.Response(status=503)
        if not host.alive:
            transport.abort()  # as close to "refused" as a shared port gets
            raise asyncio.CancelledError
        inflight = self._inflight[host.index]
        inflight.add(transport)
        try:
            return await self._answer(host, request, check_path=False)
        finally:
            inflight.discard(transport)

    async def _answer(self, host: HollowHost, request: BaseRequest,
                      check_path: bool = True) -> web.StreamResponse:
        await host.while_frozen()
        if check_path and request.path != AGENT_PATH:
            if request.path == "/health" and request.method == "GET":
                return web.Response(body=b'{"status":"ok"}', content_type=JSON)
            return web.Response(status=404, text="not found\n")
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        payload = await self.dispatch(host, await request.read())
        await host.while_frozen()  # stopped while it worked: the answer waits too
        if payload is None:
            return web.Response(status=204)
        return web.Response(body=payload, content_type=JSON)

    async def dispatch(self, host: HollowHost, body: bytes) -> bytes | None:
        """One JSON-RPC request (not a batch: the engine sends none) -> the answer."""
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _error_envelope(None, _protocol_error(errors.PARSE_ERROR, "Parse error",
                                                         str(exc)))
        if type(message) is not dict or message.get("jsonrpc") != "2.0" \
                or not isinstance(message.get("method"), str):
            return _error_envelope(None, _protocol_error(
                errors.INVALID_REQUEST, "Invalid request",
                "a single JSON-RPC 2.0 request object (hollow agents take no batches)"))
        ident = message.get("id")
        method: str = message["method"]
        verb = VERBS.get(method)
        if verb is None:
            self.unknown[method] += 1
            return _error_envelope(ident, _protocol_error(errors.METHOD_NOT_FOUND,
                                                          "Method not found", method))
        self.requests[method] += 1
        polls = method == "getEvents"
        if polls:
            self._polling[host.index] += 1
        elif method in LIST_VERBS and self._polling[host.index]:
            self.beside_poll += 1
        params = message.get("params")
        try:
            if params is None:
                params = {}
            elif type(params) is not dict:
                raise errors.InvalidParams("params must be an object", field="params",
                                           rule="type")
            answer = _envelope(ident, await verb(host, params))
        except errors.RpcError as exc:
            answer = _error_envelope(ident, exc.to_error())
        finally:
            if polls:
                self._polling[host.index] -= 1
        return answer if "id" in message else None

    # -- life cycle -----------------------------------------------------------------------------

    def _abort_connections(self, host: HollowHost) -> None:
        """What the kernel does to a killed process's connections."""
        if self.options.path_per_host:
            for transport in list(self._inflight.pop(host.index, ())):
                transport.abort()
            return
        http = self._http.get(host.index)
        if http is not None:
            for handler in http.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    def kill(self, host: HollowHost) -> None:
        """Dead: refuses connections (a port per host), aborts its connections."""
        if not host.alive:
            return
        host.die()
        host.thaw()  # a killed stopped process is gone, not stopped
        listener = self._listeners.pop(host.index, None)
        if listener is not None:
            listener.close()
        self._abort_connections(host)

    async def revive(self, host: HollowHost, reset: bool = False) -> None:
        """A new process: a new epoch, state kept unless ``reset``; listening again."""
        if host.alive:
            self.kill(host)
        host.restart(reset)
        if not self.options.path_per_host:
            await self._listen(host, self._ports[host.index])

    async def restart(self, host: HollowHost, reset: bool = False,
                      downtime: float = 0.0) -> None:
        self.kill(host)
        if downtime <= 0:
            await self.revive(host, reset)
            return
        task = asyncio.get_running_loop().create_task(self._revive_later(host, reset, downtime))
        self._revivals.add(task)
        task.add_done_callback(self._revivals.discard)

    async def _revive_later(self, host: HollowHost, reset: bool, downtime: float) -> None:
        await asyncio.sleep(downtime)
        if not host.alive:
            await self.revive(host, reset)

    # -- control API ------------------------------------------------------------------------------

    def select(self, selectors: Iterable[Any] | None) -> list[HollowHost]:
        """Hosts by index, name, ``"A-B"`` index range (inclusive) or ``"all"``."""
        if selectors is None:
            return list(self.hosts)
        if isinstance(selectors, str | int):
            selectors = [selectors]
        chosen: dict[int, HollowHost] = {}
        for item in selectors:
            for host in self._select_one(item):
                chosen[host.index] = host
        return [chosen[index] for index in sorted(chosen)]

    def _select_one(self, item: Any) -> list[HollowHost]:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(self.hosts):
            return [self.hosts[item]]
        if isinstance(item, str):
            if item == "all":
                return list(self.hosts)
            if item in self.by_name:
                return [self.by_name[item]]
            first, dash, last = item.partition("-")
            if item.isdigit():
                return self._select_one(int(item))
            if dash and first.isdigit() and last.isdigit() and int(first) <= int(last) \
                    < len(self.hosts):
                return self.hosts[int(first):int(last) + 1]
        raise ValueError(f"no hollow host {item!r} (an index 0..{len(self.hosts) - 1}, a name, "
                         "A-B or all)")

    def host_info(self, host: HollowHost) -> dict[str, Any]:
        return {"name": host.name, "index": host.index, "url": host.url, "status": host.status,
                "epoch": host.feed.epoch, "lastSeq": host.feed.last_seq,
                "tasks": len(host.tasks), "connections": len(host.connection_ids),
                "restarts": host.restarts, "version": host.version,
                "accepted": self.accepted[host.index],
                "open": len(self._http[host.index].connections) if host.index in self._http
                else None}

    def status(self) -> dict[str, Any]:
        statuses = collections.Counter(host.status for host in self.hosts)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "hosts": len(self.hosts), "up": statuses["up"], "frozen": statuses["frozen"],
            "dead": statuses["dead"],
            "mode": "path" if self.options.path_per_host else "port",
            "rates": dict(self.generator.rates), "ticks": self.generator.ticks,
            "events": sum(host.feed.last_seq for host in self.hosts),
            "requests": dict(self.requests), "unknownVerbs": dict(self.unknown),
            "accepted": sum(self.accepted.values()), "listedBesidePoll": self.beside_poll,
            "cpuSeconds": round(usage.ru_utime + usage.ru_stime, 3),
            "rssBytes": _rss_bytes(), "openFiles": len(os.listdir("/proc/self/fd")),
            "pid": os.getpid(),
        }

    def _commands(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        return {"status": self._c_status, "hosts": self._c_hosts, "freeze": self._c_freeze,
                "thaw": self._c_thaw, "kill": self._c_kill, "start": self._c_start,
                "restart": self._c_restart, "rates": self._c_rates, "tick": self._c_tick,
                "resetCounters": self._c_reset_counters}

    async def _c_status(self) -> dict[str, Any]:
        return self.status()

    async def _c_hosts(self, hosts: Any = None) -> list[dict[str, Any]]:
        return [self.host_info(host) for host in self.select(hosts)]

    async def _c_freeze(self, hosts: Any) -> list[str]:
        chosen = self.select(hosts)
        for host in chosen:
            if host.alive:
                host.freeze()
        return [host.name for host in chosen]

    async def _c_thaw(self, hosts: Any) -> list[str]:
        chosen = self.select(hosts)
        for host in chosen:
            host.thaw()
        return [host.name for host in chosen]

    async def _c_kill(self, hosts: Any) -> list[str]:
        chosen = self.select(hosts)
        for host in chosen:
            self.kill(host)
        return [host.name for host in chosen]

    async def _c_start(self, hosts: Any, reset: bool = False) -> list[str]:
        chosen = [host for host in self.select(hosts) if not host.alive]
        for host in chosen:
            await self.revive(host, bool(reset))
        return [host.name for host in chosen]

    async def _c_restart(self, hosts: Any, reset: bool = False,
                         downtime: float = 0.0) -> list[str]:
        chosen = self.select(hosts)
        for host in chosen:
            await self.restart(host, bool(reset), float(downtime))
        return [host.name for host in chosen]

    async def _c_rates(self, **rates: float) -> dict[str, float]:
        return self.generator.set_rates(rates)

    async def _c_tick(self, hosts: Any, kind: str = "task") -> dict[str, Any]:
        if kind not in generator.KINDS:
            raise ValueError(f"unknown tick kind {kind!r} (one of {', '.join(generator.KINDS)})")
        return {host.name: generator.tick(host, kind) if host.alive else None
                for host in self.select(hosts)}

    async def _c_reset_counters(self) -> dict[str, Any]:
        counts = {"requests": dict(self.requests), "unknownVerbs": dict(self.unknown),
                  "accepted": sum(self.accepted.values()), "listedBesidePoll": self.beside_poll}
        self.requests.clear()
        self.unknown.clear()
        self.accepted.clear()
        self.beside_poll = 0
        return counts

    async def _handle_control(self, request: BaseRequest) -> web.StreamResponse:
        if request.method != "POST" or request.path != CONTROL_PATH:
            return web.Response(status=404, text=f"POST {CONTROL_PATH}\n")
        ident: Any = None
        try:
            message = orjson.loads(await request.read())
            ident = message.get("id")
            command = self._commands().get(message["method"])
            if command is None:
                answer = _error_envelope(ident, _protocol_error(
                    errors.METHOD_NOT_FOUND, "Method not found", sorted(self._commands())))
            else:
                result = await command(**(message.get("params") or {}))
                answer = _envelope(ident, orjson.dumps(result))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            answer = _error_envelope(ident, _protocol_error(errors.INVALID_PARAMS,
                                                            "Invalid params", str(exc)))
        return web.Response(body=answer, content_type=JSON)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def serve(options: FleetOptions, ready: Callable[[HollowFleet], None],
                stop: asyncio.Event) -> None:
    """Run the fleet until ``stop`` is set; ``ready`` is called once it listens."""
    fleet = HollowFleet(options)
    try:
        await fleet.start()
        ready(fleet)
        await stop.wait()
    finally:
        await fleet.close()


def hosts_document(fleet: HollowFleet) -> dict[str, Any]:
    """What the hosts file holds: the control URL and every host's name and URL."""
    return {"control": fleet.control_url, "pid": os.getpid(), "created": time.time(),
            "mode": "path" if fleet.options.path_per_host else "port",
            "hosts": [{"name": host.name, "url": host.url} for host in fleet.hosts]}


def write_hosts_file(path: str, fleet: HollowFleet) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as out:
        out.write(orjson.dumps(hosts_document(fleet)))
    os.replace(temporary, path)


__all__: Sequence[str] = ("FleetOptions", "HollowFleet", "host_names", "raise_open_files",
                          "serve", "write_hosts_file")
