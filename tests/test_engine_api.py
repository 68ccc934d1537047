"""The engine's API without agents: schema, OpenRPC, docs, validation, errors,
hosts that never answer, maintenance, job retention, restart persistence."""

from __future__ import annotations

import copy
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from rpc_schema import docs, openrpc
from tests.conftest import free_port
from tests.engine_support import (  # noqa: F401
    ENGINE_SCHEMA,
    EngineClient,
    async_until,
    database_url,
    engine_config,
    postgres_server,
)
from tests.test_engine_store import T0, task_doc
from tests.test_schema import openrpc_validator
from vdsm_agent.common import paging
from vdsm_agent.engine import main as engine_main
from vdsm_agent.engine import settings as engine_settings
from vdsm_agent.engine.app import make_app
from vdsm_agent.engine.store import repository

ROOT = Path(__file__).resolve().parent.parent


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/jsonrpc"  # nothing listens there


# -- the schema and its documents --------------------------------------------------------------


def test_openrpc_document_is_valid():
    problems = [error.message for error in
                openrpc_validator().iter_errors(openrpc.document(ENGINE_SCHEMA))]
    assert problems == []


@pytest.mark.parametrize("verb", [v for v in ENGINE_SCHEMA.verbs.values() if v.examples],
                         ids=lambda verb: verb.name)
def test_examples_match_their_schemas(verb):
    for example in verb.examples:
        verb.validate_params(copy.deepcopy(example["params"]))
        jsonschema.validate(example["result"],
                            {**verb.result, "components": ENGINE_SCHEMA.components})


def test_every_public_verb_has_an_example():
    assert [name for name, verb in ENGINE_SCHEMA.verbs.items()
            if not verb.examples and not name.startswith("rpc.")] == []


def test_engine_api_docs_are_up_to_date():
    committed = (ROOT / "docs" / "engine-api.md").read_text()
    assert committed == docs.render(ENGINE_SCHEMA), (
        "run: python -m rpc_schema.docs engine > docs/engine-api.md")


def test_engine_settings_table_in_docs_is_up_to_date():
    assert engine_settings.render_docs_table() in (ROOT / "docs" / "engine.md").read_text(), (
        "paste the output of python -m vdsm_agent.engine.settings into docs/engine.md")


async def test_rpc_discover_ping_and_health(make_engine):
    engine = await make_engine()
    document = await engine.call("rpc.discover")
    assert document == json.loads(json.dumps(openrpc.document(ENGINE_SCHEMA)))
    assert all(method["paramStructure"] == "by-name" for method in document["methods"])
    ping = await engine.call("ping")
    assert ping["database"] == "sqlite"
    assert ping["hosts"] == 0
    response = await engine.client.get("/health")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


# -- validation and errors -----------------------------------------------------------------------


@pytest.mark.parametrize(("params", "field"), [
    ({"name": "", "url": "http://127.0.0.1:1"}, "params.name"),
    ({"name": "x" * 65, "url": "http://127.0.0.1:1"}, "params.name"),
    ({"name": "a/b", "url": "http://127.0.0.1:1"}, "params.name"),
    ({"name": "a b", "url": "http://127.0.0.1:1"}, "params.name"),
    ({"name": "h", "url": "http://127.0.0.1"}, "params.url"),
    ({"name": "h", "url": "ftp://127.0.0.1:21"}, "params.url"),
    ({"name": "h", "url": "http://127.0.0.1:54321/other"}, "params.url"),
    ({"name": "h", "url": "http://127.0.0.1:54321", "caFile": "/etc/hostname"}, "params.url"),
    ({"name": "h", "url": "https://127.0.0.1:54321", "caFile": "/nonexistent.pem"},
     "params.caFile"),
    ({"name": "h", "url": "https://127.0.0.1:54321", "keyFile": "/etc/hostname"},
     "params.keyFile"),
])
async def test_add_host_rejects_bad_params(make_engine, params, field):
    engine = await make_engine()
    failure = await engine.error("addHost", **params)
    assert failure.code == -32602
    assert failure.data["field"] == field


async def test_host_names_urls_and_errors(make_engine):
    engine = await make_engine()
    host = await engine.call("addHost", name="Host_1.a-b", url="http://127.0.0.1:1",
                             maintenance=True)
    assert host["url"] == "http://127.0.0.1:1/jsonrpc"
    assert host["status"] == "maintenance"
    assert (await engine.error("addHost", name="Host_1.a-b", url="http://127.0.0.1:2")
            ).name == "HostExists"
    for verb, params in [("getHost", {}), ("removeHost", {}),
                         ("setHostMaintenance", {"maintenance": True}),
                         ("startTask", {"kind": "test.sleep", "params": {}}),
                         ("cancelTask", {"taskID": str(uuid.uuid4())}),
                         ("getTask", {"taskID": str(uuid.uuid4())})]:
        failure = await engine.error(verb, host="nope", **params) if "name" not in str(
            ENGINE_SCHEMA.verbs[verb].params.get("required")) else await engine.error(
            verb, name="nope", **params)
        assert failure.name == "HostNotFound", verb
        assert failure.code == 500
    failure = await engine.error("manageStorageConnection", hosts=["Host_1.a-b", "nope"],
                                 uri="file:///tmp", connectionID="c")
    assert failure.name == "HostNotFound"
    assert (await engine.call("listJobs"))["jobs"] == []  # nothing was written
    assert (await engine.error("getJob", jobID=str(uuid.uuid4()))).name == "JobNotFound"
    # The engine does not know the task and cannot ask the host (maintenance).
    assert (await engine.error("cancelTask", host="Host_1.a-b", taskID=str(uuid.uuid4()))
            ).name == "HostUnreachable"
    assert (await engine.error("getTask", host="Host_1.a-b", taskID=str(uuid.uuid4()))
            ).name == "HostUnreachable"
    assert (await engine.error("listTasks", pageToken="garbage")).code == -32602
    assert (await engine.error("listTasks", filter={"state": "sideways"})).code == -32602


# -- hosts that do not answer -------------------------------------------------------------------


async def test_dead_host_is_non_responsive_and_listed_as_unreachable(make_engine):
    engine = await make_engine()
    await engine.call("addHost", name="dead", url=dead_url())
    await engine.wait_status("dead", "non-responsive", timeout=10)
    host = await engine.host("dead")
    assert host["failures"] >= 2
    assert "Cannot connect" in host["lastError"] or "refused" in host["lastError"]
    listing = await engine.call("listTasks")
    assert listing == {"tasks": [], "nextPageToken": None, "unreachableHosts": ["dead"]}
    health = await engine.call("getConnectionHealth")
    assert health["unreachableHosts"] == ["dead"]
    # A job for it stays pending; its attempts grow (each retry is one attempt).
    job = await engine.call("startTask", host="dead", kind="test.sleep",
                            params={"seconds": 1})
    (step,) = job["steps"]
    assert step["state"] == "pending"
    assert uuid.UUID(step["taskID"])

    async def retried() -> bool:
        current = await engine.call("getJob", jobID=job["jobID"])
        return bool(current["steps"][0]["attempts"] >= 2)
    await async_until(retried, timeout=10)
    current = await engine.call("getJob", jobID=job["jobID"])
    assert current["state"] == "pending"
    assert current["steps"][0]["lastError"]["name"] == "HostUnreachable"
    assert current["steps"][0]["taskID"] == step["taskID"]  # the same ID on every retry
    # Health of the pending connection on a dead host: unknown.
    await engine.call("manageStorageConnection", hosts=["dead"], uri="file:///srv",
                      connectionID="c1")
    health = await engine.call("getConnectionHealth", connectionID="c1")
    assert health["connections"][0]["unknown"] == ["dead"]


async def test_maintenance_host_is_not_polled(make_engine):
    engine = await make_engine()
    await engine.call("addHost", name="m", url=dead_url(), maintenance=True)
    job = await engine.call("startTask", host="m", kind="test.sleep", params={})
    engine_object = engine.engine
    assert engine_object.workers["m"].client is None  # no client: nothing is sent
    await engine.call("listHosts")
    host = await engine.host("m")
    assert host["status"] == "maintenance"
    assert host["failures"] == 0
    assert (await engine.call("getJob", jobID=job["jobID"]))["steps"][0]["attempts"] == 0
    assert (await engine.call("listTasks"))["unreachableHosts"] == []
    host = await engine.call("setHostMaintenance", name="m", maintenance=False)
    assert host["status"] in ("connecting", "non-responsive")  # polled again
    await engine.wait_status("m", "non-responsive", timeout=10)
    host = await engine.call("setHostMaintenance", name="m", maintenance=True)
    assert host["status"] == "maintenance"


async def test_removed_host_fails_its_steps_and_finished_jobs_expire(make_engine):
    engine = await make_engine(job_retention=0.5)
    await engine.call("addHost", name="gone", url=dead_url())
    job = await engine.call("manageStorageConnection", hosts=["gone"], uri="file:///srv",
                            connectionID="c1")
    assert await engine.call("removeHost", name="gone") == {"name": "gone", "removed": True}
    finished = await engine.call("getJob", jobID=job["jobID"])
    assert finished["state"] == "failed"
    assert finished["steps"][0]["lastError"]["name"] == "HostRemoved"
    assert (await engine.call("listJobs", filter={"state": "failed"}))["jobs"][0][
        "jobID"] == job["jobID"]

    async def expired() -> bool:
        return (await engine.call("listJobs"))["jobs"] == []
    await async_until(expired, timeout=10)
    assert (await engine.error("getJob", jobID=job["jobID"])).name == "JobNotFound"


async def test_jobs_pages(make_engine):
    engine = await make_engine()
    await engine.call("addHost", name="m", url=dead_url(), maintenance=True)
    ids = [(await engine.call("manageStorageConnection", hosts=["m"], uri="file:///srv",
                              connectionID=f"c{index}"))["jobID"] for index in range(5)]
    seen: list[str] = []
    token = None
    while True:
        page = await engine.call("listJobs", pageSize=2,
                                 **({"pageToken": token} if token else {}))
        seen += [job["jobID"] for job in page["jobs"]]
        token = page["nextPageToken"]
        if token is None:
            break
    assert sorted(seen) == sorted(ids)
    only = await engine.call("listJobs", filter={"host": "m", "action": "startTask"})
    assert only["jobs"] == []
    waited = await engine.call("waitJob", jobID=ids[0], timeout=0.2)
    assert waited["state"] == "pending"


async def test_hosts_pages_each_host_once_with_its_counts(aiohttp_client, tmp_path,
                                                         database_url):  # noqa: F811
    engine = EngineClient(await aiohttp_client(make_app(engine_config(
        tmp_path, database=database_url))))
    names = [f"h{index:03d}" for index in range(103)]
    for name in reversed(names):
        await engine.call("addHost", name=name, url=dead_url(), maintenance=True)
    store = engine.engine.store
    for k, name in enumerate(names[:7]):  # what the engine learnt of a few hosts
        docs = [task_doc(f"{name}-{n}", "running" if n % 2 else "done") for n in range(k)]
        await store.run(repository.apply_task_snapshot, name, docs, T0, T0)
    expected = {name: {"tasks": {state: number for state, number in
                                 (("done", (k + 1) // 2), ("running", k // 2)) if number},
                       "connections": {}} for k, name in enumerate(names[:7])}
    seen: list[str] = []
    token = None
    while True:
        page = await engine.call("listHosts", pageSize=10,
                                 **({"pageToken": token} if token else {}))
        assert len(page["hosts"]) <= 10
        seen += [host["name"] for host in page["hosts"]]
        for host in page["hosts"]:
            assert host["counts"] == expected.get(host["name"],
                                                  {"tasks": {}, "connections": {}})
        token = page["nextPageToken"]
        if token is None:
            break
    assert seen == names
    # Without pageSize: the first 100 hosts and a token for the rest (docs/engine.md).
    first = await engine.call("listHosts")
    assert [host["name"] for host in first["hosts"]] == names[:100]
    rest = await engine.call("listHosts", pageToken=first["nextPageToken"])
    assert ([host["name"] for host in rest["hosts"]], rest["nextPageToken"]) == (names[100:],
                                                                                 None)
    assert (await engine.call("getHost", name="h006"))["counts"] == expected["h006"]
    jobs_token = paging.encode_token([1.0, "x"], paging.fingerprint({}))
    for bad in ("garbage", jobs_token):
        failure = await engine.error("listHosts", pageToken=bad)
        assert (failure.name, failure.data["field"]) == ("InvalidParams", "params.pageToken")
    assert (await engine.error("listHosts", pageSize=0)).name == "InvalidParams"


async def test_final_state_pages_do_not_send_the_unseen_hosts(make_engine, caplog):
    engine = await make_engine()
    await engine.call("addHost", name="unseen-host", url=dead_url(), maintenance=True)
    docs = [task_doc("t-done", "done"), task_doc("t-run", "running", created=T0 + 1)]
    await engine.engine.store.run(repository.apply_task_snapshot, "unseen-host", docs, T0, T0)

    async def states(state: Any) -> list[tuple[str, str]]:
        page = await engine.call("listTasks", filter={"state": state})
        return [(task["id"], task["state"]) for task in page["tasks"]]

    with caplog.at_level(logging.DEBUG, logger="peewee"):
        assert await states("done") == [("t-done", "done")]
    queries = [record.msg for record in caplog.records if record.name == "peewee"
               and isinstance(record.msg, tuple) and "host_task" in record.msg[0]]
    assert queries, "the page's query was not seen"
    # A final state stays what it is: which hosts are not seen cannot change the rows.
    assert not [query for query in queries if "unseen-host" in query[1]]
    assert await states("running") == []  # unfinished on a host not seen: unknown
    assert await states("unknown") == [("t-run", "unknown")]
    assert await states(["done", "running"]) == [("t-done", "done")]


async def test_restarted_engine_keeps_hosts_and_jobs(aiohttp_client, tmp_path):
    config = engine_config(tmp_path)
    client = await aiohttp_client(make_app(config))
    engine = EngineClient(client)
    await engine.call("addHost", name="m", url=dead_url(), maintenance=True)
    job = await engine.call("startTask", host="m", kind="test.sleep", params={})
    await client.close()
    engine = EngineClient(await aiohttp_client(make_app(config)))
    assert [host["name"] for host in (await engine.call("listHosts"))["hosts"]] == ["m"]
    again = await engine.call("getJob", jobID=job["jobID"])
    assert again["steps"][0]["taskID"] == job["steps"][0]["taskID"]


# -- the command line -----------------------------------------------------------------------------


def test_serve_refuses_plain_http_off_loopback(tmp_path, capsys):
    code = engine_main.main(["serve", "--state-dir", str(tmp_path), "--listen", "10.1.2.3:80"])
    assert code == 2
    assert "refusing to serve plain HTTP" in capsys.readouterr().err


def test_bad_settings_and_usage(tmp_path, capsys):
    assert engine_main.main(["serve", "--database", "mysql://x/y"]) == 2
    assert "database" in capsys.readouterr().err
    assert engine_main.main([]) == 2
    assert engine_main.main(["call", "nosuchverb"]) == 2
    assert "unknown verb" in capsys.readouterr().err
    assert engine_main.main(["call", "addHost", "name=x"]) == 2  # url missing
    assert engine_main.main(["call", "--url", f"127.0.0.1:{free_port()}", "ping"]) == 4
    assert "cannot reach the engine" in capsys.readouterr().err
    assert engine_main.main(["call", "--dry-run", "startTask", "host=h", "kind=test.sleep",
                             "params:={}"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == {"host": "h", "kind": "test.sleep",
                                                            "params": {}}
    assert engine_main.main(["call", "getJob", "--help"]) == 0
    assert "vdsm-engine call" in capsys.readouterr().out


def test_config_file_section_and_flags_win(tmp_path):
    path = tmp_path / "engine.ini"
    path.write_text("[engine]\nresync_interval = 7\nunresponsive_after = 5\n")
    parser, _, _ = engine_main.build_parser()
    options = parser.parse_args(["serve", "--config", str(path), "--unresponsive-after", "4"])
    config = engine_settings.EngineConfig.resolve(options.config, options)
    assert config.resync_interval == 7.0
    assert config.unresponsive_after == 4
    assert config.database_url == f"sqlite:///{Path('./vdsm-engine-state').resolve()}/engine.db"


# -- TLS to agents ---------------------------------------------------------------------------


async def test_agent_client_uses_the_hosts_tls_files(make_engine, tmp_path):
    import ssl

    from aiohttp import web

    from vdsm_agent.engine.agentclient import AgentClient, AgentUnreachable, ssl_context

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_side)
    ca.configure_trust(server_side)
    server_side.verify_mode = ssl.CERT_REQUIRED
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "engine.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("engine.example").private_key_and_cert_chain_pem.write_to_path(str(cert_file))

    async def whoami(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(item[0] for item in peer["subject"]) if peer and peer["subject"] else {}
        alt = [value for _, value in (peer or {}).get("subjectAltName", ())]
        return web.json_response({"jsonrpc": "2.0", "id": 1,
                                  "result": subject.get("commonName") or alt[0]})

    app = web.Application()
    app.router.add_post("/jsonrpc", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_side)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/jsonrpc"
    try:
        client = AgentClient(url, connect_timeout=2, request_timeout=5,
                             ssl_context=ssl_context(str(ca_file), str(cert_file), None))
        try:
            assert await client.call("whoami") == "engine.example"
        finally:
            await client.close()
        anonymous = AgentClient(url, connect_timeout=2, request_timeout=5,
                                ssl_context=ssl_context(str(ca_file), None, None))
        try:
            with pytest.raises(AgentUnreachable):
                await anonymous.call("whoami")
        finally:
            await anonymous.close()
        # The engine accepts the same files for a host (checked and loaded at addHost).
        engine = await make_engine()
        host = await engine.call("addHost", name="tls", url=url, caFile=str(ca_file),
                                 certFile=str(cert_file), maintenance=True)
        assert host["tls"] == {"caFile": str(ca_file), "certFile": str(cert_file),
                               "keyFile": None}
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate")
        failure = await engine.error("addHost", name="junk", url=url, caFile=str(junk))
        assert failure.data["rule"] == "tls"
    finally:
        await runner.cleanup()
