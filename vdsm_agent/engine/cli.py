"""``vdsm-engine call``: call one verb of the engine's API from a shell.

The agent client's machinery, pointed at ``rpc_schema/engine.json``: verbs,
params and their types come from the schema (``name=value`` and
``name:=JSON`` words, ``VERB --help``), output is JSON or a table, and the
exit codes are the client's (docs/cli.md): 0 ok, 1 application error, 2 usage,
3 protocol error, 4 unreachable. Standard library, ``rpc_schema`` and
``vdsm_agent.client`` only, so that a call starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

import rpc_schema
from rpc_schema import ApiSchema, Verb
from vdsm_agent.client import main as client_main
from vdsm_agent.client.output import error_line, to_json
from vdsm_agent.client.params import ParamParser, UsageError, close_matches
from vdsm_agent.client.schema import SchemaView
from vdsm_agent.client.transport import Answer, Target, TlsFiles, TransportError, parse_url, post
from vdsm_agent.engine.settings import DEFAULT_PORT

PROG = "vdsm-engine call"
URL_ENV = "VDSM_ENGINE_URL"
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}/jsonrpc"

EXIT_OK = client_main.EXIT_OK
EXIT_APPLICATION_ERROR = client_main.EXIT_APPLICATION_ERROR
EXIT_USAGE = client_main.EXIT_USAGE
EXIT_PROTOCOL_ERROR = client_main.EXIT_PROTOCOL_ERROR
EXIT_UNREACHABLE = client_main.EXIT_UNREACHABLE


def add_arguments(parser: argparse.ArgumentParser, schema: ApiSchema) -> None:
    parser.description = ("Call a verb of the engine's JSON-RPC API and print its result as "
                          "JSON.\n\n" + client_main._verbs_help(schema))
    parser.epilog = (client_main.PARAMS_HELP.split("target:")[0]
                     + f"target:\n  --url, else ${URL_ENV}, else {DEFAULT_URL}\n\n"
                     + client_main.EXIT_CODES_HELP.replace("the agent", "the engine"))
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help, or a verb's params with VERB --help")
    parser.add_argument("--url", metavar="URL",
                        help=f"http(s)://host[:port][/jsonrpc] (port {DEFAULT_PORT}, path "
                             "/jsonrpc by default)")
    parser.add_argument("--timeout", metavar="SECONDS", type=client_main._positive_seconds,
                        default=60.0, help="give up after this long (default 60)")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--compact", action="store_true", help="print the result on one line")
    style.add_argument("--table", action="store_true",
                       help="print a list result (or an object's one list of objects) as a "
                            "table")
    parser.add_argument("--columns", metavar="A,B,C", type=client_main._columns,
                        help="the table's columns, in order (implies --table)")
    parser.add_argument("--max-width", metavar="N", type=client_main._width, default=40,
                        help="cut table cells to N characters (default 40, 0: never)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the request and HTTP status on stderr")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the JSON-RPC request instead of sending it")
    tls = parser.add_argument_group("TLS (https URLs)")
    tls.add_argument("--cacert", metavar="FILE", help="CA bundle to verify the engine with")
    tls.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    tls.add_argument("--key", metavar="FILE", help="client key (PEM), if not in --cert")
    parser.add_argument("words", nargs="*", metavar="VERB [name=value ...]",
                        help=argparse.SUPPRESS)


def engine_target(url: str | None, environ: dict[str, str]) -> Target:
    """--url, else $VDSM_ENGINE_URL, else the loopback default; the port defaults to 54322."""
    text = url or environ.get(URL_ENV) or DEFAULT_URL
    if "://" not in text:
        text = "http://" + text
    try:
        has_port = urllib.parse.urlsplit(text).port is not None
    except ValueError as exc:
        raise UsageError(f"--url {text!r}: {exc}") from None
    target = parse_url(text)
    if not has_port:
        target = Target(target.scheme, target.host, DEFAULT_PORT, target.path)
    return target


def find_verb(schema: ApiSchema, name: str) -> Verb:
    verb = schema.verb(name)
    if verb is not None:
        return verb
    hint = close_matches(name, sorted(schema.verbs))
    raise UsageError(f"unknown verb {name!r}"
                     + (f" (did you mean: {', '.join(hint)}?)" if hint else "")
                     + "; 'vdsm-engine call --help' lists the verbs")


def _usage(verb: Verb, view: SchemaView) -> str:
    return client_main.verb_usage(verb, view).replace(client_main.PROG, PROG, 1)


def _fail(message: str, usage: str) -> int:
    print(usage, file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _unreachable(target: Target, reason: str) -> int:
    print(f"{PROG}: cannot reach the engine at {target}: {reason}", file=sys.stderr)
    return EXIT_UNREACHABLE


def handle_answer(answer: Answer, target: Target, schema: ApiSchema, verb: Verb,
                  view: SchemaView, options: argparse.Namespace) -> int:
    if options.verbose:
        print(f"< HTTP {answer.status} {answer.reason}", file=sys.stderr)
    try:
        reply: Any = json.loads(answer.body)
    except ValueError:
        return _unreachable(target, f"HTTP {answer.status}: the answer is not JSON")
    if not client_main._is_reply(reply):
        return _unreachable(target, f"HTTP {answer.status}: not a JSON-RPC 2.0 response")
    if "error" in reply:
        error = reply["error"]
        names = {spec["code"]: name for name, spec in schema.errors.items()}
        print(error_line(error, names), file=sys.stderr)
        if options.verbose and "data" in error:
            print(to_json(error["data"]), file=sys.stderr)
        return EXIT_APPLICATION_ERROR if error["code"] > 0 else EXIT_PROTOCOL_ERROR
    client_main.print_result(reply["result"], verb, view, options)
    return EXIT_OK


def run(parser: argparse.ArgumentParser, options: argparse.Namespace) -> int:
    schema = rpc_schema.load("engine")
    view = SchemaView(schema.document)
    words: list[str] = list(options.words)
    if words[:1] == ["help"]:
        options.help, words = True, words[1:]
    if options.help:
        if not words:
            parser.print_help()
            return EXIT_OK
        try:
            verb = find_verb(schema, words[0])
        except UsageError as exc:
            return _fail(str(exc), parser.format_usage().rstrip())
        text = client_main.verb_help(schema, verb, view)
        sys.stdout.write(text.replace(client_main.PROG, PROG))
        return EXIT_OK
    if not words:
        return _fail("a verb is required; 'vdsm-engine call --help' lists them",
                     parser.format_usage().rstrip())
    try:
        verb = find_verb(schema, words[0])
        params = ParamParser(verb, view).parse(words[1:])
        target = engine_target(options.url, dict(os.environ))
    except UsageError as exc:
        verb_found = schema.verb(words[0])
        usage = _usage(verb_found, view) if verb_found else parser.format_usage().rstrip()
        return _fail(str(exc), usage)
    request = {"jsonrpc": "2.0", "method": verb.name, "params": params, "id": 1}
    body = json.dumps(request, separators=(",", ":")).encode()
    if options.dry_run:
        print(to_json(request, compact=options.compact))
        return EXIT_OK
    if options.verbose:
        print(f"> POST {target}\n> {body.decode()}", file=sys.stderr)
    try:
        answer = post(target, body, options.timeout,
                      TlsFiles(options.cacert, options.cert, options.key))
    except TransportError as exc:
        return _unreachable(target, str(exc))
    except UsageError as exc:
        return _fail(str(exc), parser.format_usage().rstrip())
    return handle_answer(answer, target, schema, verb, view, options)


def call_main(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    options = parser.parse_intermixed_args(argv)
    return run(parser, options)
