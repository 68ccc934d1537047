"""The engine's verb handlers, thin: ``async def verb(engine, **params) -> result``.

Params were validated against ``rpc_schema/engine.json`` before the handler
runs; errors are ``vdsm_agent.errors`` exceptions, translated in
``vdsm_agent.server.jsonrpc`` (the agent's dispatcher, used as is).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import urllib.parse
from typing import Any

from rpc_schema import openrpc
from vdsm_agent import __version__, errors
from vdsm_agent.engine import gluster, output, views
from vdsm_agent.engine.agentclient import ssl_context
from vdsm_agent.engine.engine import Engine
from vdsm_agent.engine.store import repository
from vdsm_agent.server.routes import Handler

log = logging.getLogger(__name__)
DEFAULT_AGENT_PATH = "/jsonrpc"


async def ping(engine: Engine) -> dict[str, Any]:
    return {"version": __version__, "uptime": round(engine.uptime, 3),
            "database": engine.store.kind, "hosts": len(engine.hosts())}


async def discover(engine: Engine) -> dict[str, Any]:
    return openrpc.document(engine.schema)


# -- hosts -------------------------------------------------------------------------------


def _normalise_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise errors.InvalidParams("url must be http(s)://host:port[/prefix]/jsonrpc",
                                   field="params.url", rule="url")
    path = parts.path or DEFAULT_AGENT_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _check_tls_files(url: str, ca_file: str | None, cert_file: str | None,
                     key_file: str | None) -> None:
    given = {"caFile": ca_file, "certFile": cert_file, "keyFile": key_file}
    if any(given.values()) and not url.startswith("https:"):
        raise errors.InvalidParams("TLS files need an https:// URL", field="params.url",
                                   rule="https")
    if key_file and not cert_file:
        raise errors.InvalidParams("keyFile needs certFile", field="params.keyFile",
                                   rule="certFile")
    for field, path in given.items():
        if path and not os.path.isfile(path):
            raise errors.InvalidParams(f"{path} is not a readable file",
                                       field=f"params.{field}", rule="file")
    if any(given.values()):
        try:
            ssl_context(ca_file, cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise errors.InvalidParams(f"unusable TLS files: {exc}", field="params",
                                       rule="tls") from None


async def add_host(engine: Engine, name: str, url: str, caFile: str | None = None,
                   certFile: str | None = None, keyFile: str | None = None,
                   maintenance: bool = False) -> dict[str, Any]:
    url = _normalise_url(url)
    await asyncio.to_thread(_check_tls_files, url, caFile, certFile, keyFile)
    row = await engine.store.run(repository.add_host, name, url, caFile, certFile, keyFile,
                                 maintenance, engine.now())
    log.info("host %s added: %s%s", name, url, " (maintenance)" if maintenance else "")
    await engine.host_added(row)
    return await views.get_host(engine, name)


async def remove_host(engine: Engine, name: str) -> dict[str, Any]:
    await engine.store.run(repository.get_host, name)
    await engine.remove_worker(name)
    jobs = await engine.store.run(repository.remove_host, name, engine.now())
    engine.jobs_changed(jobs)
    log.info("host %s removed", name)
    return {"name": name, "removed": True}


async def get_host(engine: Engine, name: str) -> dict[str, Any]:
    return await views.get_host(engine, name)


async def list_hosts(engine: Engine, pageSize: int = 100,
                     pageToken: str | None = None) -> dict[str, Any]:
    return await views.list_hosts(engine, pageSize, pageToken)


async def list_engines(engine: Engine) -> dict[str, Any]:
    return await views.list_engines(engine, engine.config.lease_time)


async def set_host_maintenance(engine: Engine, name: str,
                               maintenance: bool) -> dict[str, Any]:
    await engine.store.run(repository.set_maintenance, name, maintenance)
    worker = engine.host(name)
    if worker is not None:
        await worker.set_maintenance(maintenance)
    log.info("host %s: maintenance %s", name, "on" if maintenance else "off")
    return await views.get_host(engine, name)


# -- views -------------------------------------------------------------------------------


async def list_tasks(engine: Engine, filter: dict[str, Any] | None = None,
                     pageSize: int = 100, pageToken: str | None = None) -> dict[str, Any]:
    return await views.list_tasks(engine, filter, pageSize, pageToken)


async def get_task(engine: Engine, host: str, taskID: str,
                   refresh: bool = False) -> dict[str, Any]:
    return await views.get_task(engine, host, taskID.lower(), refresh)


async def get_task_output(engine: Engine, host: str, taskID: str, offset: int = 0,
                          maxBytes: int = 65536, encoding: str = "utf-8") -> dict[str, Any]:
    return await output.read(engine, host, taskID.lower(), offset, maxBytes, encoding)


async def get_connection_health(engine: Engine,
                                connectionID: str | None = None) -> dict[str, Any]:
    return await views.connection_health(engine, connectionID)


# -- jobs --------------------------------------------------------------------------------


async def start_task(engine: Engine, host: str, kind: str, params: dict[str, Any],
                     deadline: str | None = None) -> dict[str, Any]:
    return await engine.jobs.start_task(host, kind, params, deadline)


async def manage_storage_connection(engine: Engine, hosts: list[str], uri: str,
                                    connectionID: str,
                                    options: dict[str, Any] | None = None) -> dict[str, Any]:
    return await engine.jobs.manage(hosts, uri, connectionID, options)


async def unmanage_storage_connection(engine: Engine, hosts: list[str],
                                      connectionID: str) -> dict[str, Any]:
    return await engine.jobs.unmanage(hosts, connectionID)


async def cancel_task(engine: Engine, host: str, taskID: str) -> dict[str, Any]:
    return await engine.jobs.cancel_task(host, taskID.lower())


async def get_job(engine: Engine, jobID: str) -> dict[str, Any]:
    return await views.get_job(engine.store, jobID.lower())


async def list_jobs(engine: Engine, filter: dict[str, Any] | None = None,
                    pageSize: int = 100, pageToken: str | None = None) -> dict[str, Any]:
    return await views.list_jobs(engine, filter, pageSize, pageToken)


async def wait_job(engine: Engine, jobID: str, timeout: float = 30.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        changed = engine.jobs_event()
        job = await views.get_job(engine.store, jobID.lower())
        remaining = deadline - loop.time()
        if job["state"] in ("done", "failed", "partial") or remaining <= 0:
            return job
        try:
            async with asyncio.timeout(remaining):
                await changed.wait()
        except TimeoutError:
            pass


def methods_table() -> dict[str, Handler]:
    """A fresh methods table for one engine application."""
    return {
        "ping": ping,
        "rpc.discover": discover,
        "addHost": add_host,
        "removeHost": remove_host,
        "getHost": get_host,
        "listHosts": list_hosts,
        "listEngines": list_engines,
        "setHostMaintenance": set_host_maintenance,
        "listTasks": list_tasks,
        "getTask": get_task,
        "getTaskOutput": get_task_output,
        "getConnectionHealth": get_connection_health,
        "startTask": start_task,
        "manageStorageConnection": manage_storage_connection,
        "unmanageStorageConnection": unmanage_storage_connection,
        "cancelTask": cancel_task,
        "getJob": get_job,
        "listJobs": list_jobs,
        "waitJob": wait_job,
        "startRebalance": gluster.start_rebalance,
        "stopRebalance": gluster.stop_rebalance,
        "removeBricks": gluster.remove_bricks,
        "stopRemoveBricks": gluster.stop_remove_bricks,
        "commitRemoveBricks": gluster.commit_remove_bricks,
    }
