"""The API schema: errors in step with errors.py, OpenRPC valid, docs not stale."""

from __future__ import annotations

import argparse
import copy
import json
import re
import types
import typing
from pathlib import Path

import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT7

import rpc_schema
from rpc_schema import docs, openrpc
from vdsm_agent import errors, settings
from vdsm_agent.engine import settings as engine_settings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SCHEMA = rpc_schema.load("agent")


def openrpc_validator() -> jsonschema.Draft7Validator:
    """The OpenRPC meta-schema from the npm package @open-rpc/meta-schema 1.14.9,
    with the JSON Schema meta-schema it references (@json-schema-tools/meta-schema)."""
    meta = json.loads((DATA / "openrpc-meta-schema-1.14.9.json").read_text())
    tools = DRAFT7.create_resource(
        json.loads((DATA / "json-schema-tools-meta-schema-1.8.0.json").read_text()))
    registry = Registry().with_resources(
        [("https://meta.json-schema.tools", tools), ("https://meta.json-schema.tools/", tools)])
    return jsonschema.Draft7Validator(meta, registry=registry)


def test_error_codes_are_unique():
    codes = [cls.code for cls in errors.all_errors()]
    names = [cls.name for cls in errors.all_errors()]
    assert len(codes) == len(set(codes))
    assert len(names) == len(set(names))


def test_every_error_class_is_in_the_schema_with_its_code():
    """Every class is listed in agent.json or engine.json (the engine's own errors
    only there), and every listed error has its class's code."""
    in_code = {cls.name: cls.code for cls in errors.all_errors()}
    listed: dict[str, int] = {}
    for schema in (SCHEMA, rpc_schema.load("engine")):
        for name, spec in schema.errors.items():
            assert in_code.get(name) == spec["code"], (schema.info["title"], name)
            listed[name] = spec["code"]
    assert listed == in_code


def test_every_failure_name_is_in_the_schema():
    """Every task failure name (errors.Failure) is listed under "failures" in
    agent.json or engine.json (the engine's own, a job step's lastError, only
    there), once; none is also an error name; nothing else is listed."""
    agent, engine = SCHEMA.failures, rpc_schema.load("engine").failures
    assert set(agent).isdisjoint(engine)
    assert set(agent) | set(engine) == {failure.value for failure in errors.Failure}
    assert {"HostRemoved", "TaskGone"} <= set(engine)
    error_names = {cls.name for cls in errors.all_errors()}
    assert error_names.isdisjoint(failure.value for failure in errors.Failure)
    assert all(spec["description"] for spec in (*agent.values(), *engine.values()))


def test_failure_names_are_never_written_as_literals():
    """A task's (or a job step's) error names a catalogue entry (errors.Failure)
    or an error class, never a free string: no error dict with a literal name,
    no TaskFailure with a string, anywhere in the agent or the engine."""
    literal = re.compile(r'"name":\s*"[A-Z]|TaskFailure\(\s*"')
    found = [f"{path.relative_to(ROOT)}:{number}"
             for path in sorted((ROOT / "vdsm_agent").rglob("*.py"))
             if "client" not in path.parts
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if literal.search(line)]
    assert found == []


def test_application_errors_are_positive():
    for cls in errors.all_errors():
        if issubclass(cls, errors.AgentError):
            assert cls.code > 0, cls


def test_openrpc_document_is_valid():
    validator = openrpc_validator()
    problems = [error.message for error in validator.iter_errors(openrpc.document(SCHEMA))]
    assert problems == []


def test_openrpc_validator_rejects_a_broken_document():
    document = openrpc.document(SCHEMA)
    document["methods"][0]["paramStructure"] = "sideways"
    assert list(openrpc_validator().iter_errors(document))


async def test_rpc_discover_serves_the_document(rpc):
    document = await rpc.call("rpc.discover")
    assert document == json.loads(json.dumps(openrpc.document(SCHEMA)))
    names = {method["name"] for method in document["methods"]}
    assert {"ping", "getCapabilities", "getDeviceList"} <= names
    assert all(method["paramStructure"] == "by-name" for method in document["methods"])


@pytest.mark.parametrize("verb", [v for v in SCHEMA.verbs.values() if v.examples],
                         ids=lambda verb: verb.name)
def test_examples_match_their_schemas(verb):
    for example in verb.examples:
        verb.validate_params(copy.deepcopy(example["params"]))  # it fills defaults in
        jsonschema.validate(example["result"], {**verb.result, "components": SCHEMA.components})


def test_every_public_verb_has_an_example():
    missing = [name for name, verb in SCHEMA.verbs.items()
               if not verb.examples and not name.startswith("rpc.")]
    assert missing == []


def test_api_docs_are_up_to_date():
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == docs.render(SCHEMA), "run: python -m rpc_schema.docs > docs/api.md"


@pytest.mark.parametrize(("table", "module", "class_name"), [
    (settings.AGENT, "vdsm_agent.settings", "AgentFields"),
    (engine_settings.ENGINE, "vdsm_agent.engine.settings", "EngineFields"),
])
def test_typed_settings_are_up_to_date(table, module, class_name):
    """The config's attributes are generated from the table: one per setting."""
    path = ROOT / (module.replace(".", "/") + "_fields.py")
    assert path.read_text() == table.fields_module(class_name, module), (
        f"run: python -m {module} --fields")


def _conforms(value, hint) -> bool:
    """Whether ``value`` is of the type ``hint`` (the few shapes settings use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_conforms(value, arg) for arg in args)
    if origin is list:
        return type(value) is list and all(_conforms(item, args[0]) for item in value)
    if origin is tuple:
        return (type(value) is tuple and len(value) == len(args)
                and all(map(_conforms, value, args)))
    return type(value) is hint  # exact: a bool is no int here


@pytest.mark.parametrize("config", [settings.defaults(), engine_settings.defaults()],
                         ids=["agent", "engine"])
def test_typed_settings_match_what_the_parsers_give(config):
    """Every default (parsed by its setting's parser, as file and flag values
    are) has its attribute's type: the types strict mypy checks are the real ones."""
    hints = typing.get_type_hints(type(config))
    for name in type(config).table.by_name:
        assert _conforms(getattr(config, name), hints[name]), (name, getattr(config, name))


def test_typed_settings_from_a_file_and_flags(tmp_path):
    path = tmp_path / "agent.conf"
    path.write_text("[agent]\nlisten = 127.0.0.1:1\ntls_listen = [::1]:2\n"
                    "allowed_roots =\n    /a\n    /b\n[roles]\nuid:7 = read\n")
    flags = argparse.ArgumentParser()
    settings.add_flags(flags)
    config = settings.resolve(str(path), flags.parse_args(["--max-batch", "7"]))
    hints = typing.get_type_hints(settings.Config)
    for name in ("listen", "tls_listen", "allowed_roots", "roles", "max_batch"):
        assert _conforms(getattr(config, name), hints[name]), name
    assert (config.tls_listen, config.roles, config.max_batch) == (
        ("::1", 2), [("uid:7", "read")], 7)


def test_a_setting_missing_from_the_typed_config_says_what_to_run(monkeypatch):
    extra = settings.Setting("new_knob", "integer", 1, "A new setting.",
                             settings.parse_positive_int)
    monkeypatch.setattr(settings.Config, "table",
                        settings.SettingsTable((*settings.SETTINGS, extra), settings.SECTION))
    with pytest.raises(settings.SettingsError, match=r"python -m vdsm_agent\.settings --fields"):
        settings.defaults()


def test_configuration_docs_are_up_to_date():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == settings.render_docs(), (
        "run: python -m vdsm_agent.settings > docs/configuration.md")
