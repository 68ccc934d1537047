"""The command-line client, for any ``Program``: parse, call, print, exit.

    PROG [--url URL | --unix-socket PATH] [options] VERB [name=value ...]

Verbs, their params and the params' types come from the program's schema in
``rpc_schema`` (the same schema the server validates against); see
docs/cli.md for the whole story and the exit codes. ``vdsm-agent-client``
(``vdsm_agent.client.main``) and ``vdsm-engine call``
(``vdsm_agent.engine.cli``) are this module with their own ``Program``.

Only the standard library and ``rpc_schema`` are imported at start; rich
(tables, the progress bar) only when something is drawn.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import rpc_schema
from rpc_schema import ApiSchema, Verb
from vdsm_agent.client.calling import Caller, NotJsonRpc, RpcError
from vdsm_agent.client.output import (
    MISSING,
    Style,
    Table,
    error_line,
    has_column,
    lookup,
    render_table,
    tabulate,
    task_kind,
    to_json,
)
from vdsm_agent.client.params import ParamParser, UsageError
from vdsm_agent.client.program import Program
from vdsm_agent.client.schema import JsonSchema, SchemaView
from vdsm_agent.client.transport import (
    Target,
    TlsFiles,
    TransportError,
    choose_target,
)
from vdsm_agent.client.usage import build_parser, find_verb, verb_help, verb_usage

EXIT_OK = 0
EXIT_APPLICATION_ERROR = 1  # a positive (application) error code; a watched task failed
EXIT_USAGE = 2  # bad arguments; nothing was sent
EXIT_PROTOCOL_ERROR = 3  # a negative (JSON-RPC protocol) error code
EXIT_UNREACHABLE = 4  # no answer, or an answer that is not JSON-RPC
EXIT_INTERRUPTED = 130  # Ctrl-C

_WIDTH = 79


# -- messages ------------------------------------------------------------------------


def _say(stream: TextIO, text: str) -> None:
    print(text, file=stream)


def colors_on(stream: TextIO) -> bool:
    """Colours only on a terminal, and not with NO_COLOR (any value) or TERM=dumb."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _red(text: str, stream: TextIO) -> str:
    return f"\x1b[1;31m{text}\x1b[0m" if colors_on(stream) else text


def _usage_error(program: Program, message: str, usage: str) -> int:
    _say(sys.stderr, usage)
    _say(sys.stderr, f"{program.prog}: error: {message}")
    return EXIT_USAGE


def _unreachable(program: Program, target: Target, reason: str) -> int:
    _say(sys.stderr, f"{program.prog}: cannot reach the {program.server} at {target}: {reason}")
    return EXIT_UNREACHABLE


def report_error(program: Program, schema: ApiSchema, exc: RpcError, target: Target,
                 verbose: bool) -> int:
    """The error line (and a hint where one helps); the exit code."""
    error = exc.error
    names_by_code = {spec["code"]: name for name, spec in schema.errors.items()
                     if isinstance(spec.get("code"), int)}
    line = error_line(error, names_by_code)
    head, _, tail = line.partition(":")
    _say(sys.stderr, _red(head, sys.stderr) + ":" + tail if tail else line)
    if verbose and "data" in error:
        _say(sys.stderr, to_json(error["data"]))
    data = error.get("data")
    if (program.anonymous_hint and exc.name == "Forbidden" and isinstance(data, dict)
            and data.get("identity") == "anonymous" and target.scheme != "unix"):
        _say(sys.stderr, f"{program.prog}: {program.anonymous_hint}")
    code = error.get("code")
    return EXIT_APPLICATION_ERROR if isinstance(code, int) and code > 0 else EXIT_PROTOCOL_ERROR


def failure(program: Program, schema: ApiSchema, exc: Exception, target: Target,
            verbose: bool = False) -> int:
    """Say what went wrong with a call; the exit code."""
    if isinstance(exc, RpcError):
        return report_error(program, schema, exc, target, verbose)
    if isinstance(exc, TransportError | NotJsonRpc):
        return _unreachable(program, target, str(exc))
    raise exc


# -- output --------------------------------------------------------------------------


def output_style(options: argparse.Namespace, stream: TextIO | None = None) -> Style:
    stream = stream or sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    width = shutil.get_terminal_size().columns if tty else None
    # On a terminal the table is fitted to its width: cells are cut only there,
    # unless --max-width says otherwise.
    max_width = options.max_width if options.max_width is not None else (0 if tty else 40)
    return Style(width=width, color=colors_on(stream), raw=options.raw, max_width=max_width)


def wants_table(options: argparse.Namespace) -> bool:
    return bool(options.table or options.columns or options.all_columns)


def print_result(program: Program, result: Any, verb: Verb, view: SchemaView,
                 options: argparse.Namespace) -> None:
    if not wants_table(options):
        _say(sys.stdout, to_json(result, compact=options.compact))
        return
    table = tabulate(result, verb.result, view)
    if table is None:  # a scalar: nothing to tabulate
        _say(sys.stdout, to_json(result, compact=True))
        return
    columns = _chosen_columns(program, table, verb, options)
    if table.key_value and columns:
        table = _select_fields(result, columns)
        columns = None
    text = render_table(table, columns, output_style(options))
    if text:
        _say(sys.stdout, text)
    if not table.rows:
        _say(sys.stderr, "(no rows)")
    for name, value in table.rest.items():
        if _worth_saying(name, value):  # a next page token, unreachable hosts
            _say(sys.stderr, f"{name}: {to_json(value, compact=True)}")


def _worth_saying(name: str, value: Any) -> bool:
    """Whether a member beside a table tells a person something.

    A list's changeToken is for a program's next conditional read, and
    notModified matters only when true (the table is then empty for that reason).
    """
    if name == "changeToken" or (name == "notModified" and value is False):
        return False
    return value is not None and value != []


def _chosen_columns(program: Program, table: Table, verb: Verb,
                    options: argparse.Namespace) -> list[str] | None:
    if options.columns:
        rows: list[Any] = table.rows
        if table.key_value:
            rows = [{str(row["field"]): row["value"] for row in table.rows}]
        unknown = [name for name in options.columns if rows and not has_column(rows, name)]
        if unknown:
            known = table.columns if not table.key_value else list(rows[0])
            _say(sys.stderr, f"{program.prog}: no such column: {', '.join(unknown)} "
                             f"(columns: {', '.join(known)})")
        return list(options.columns)
    if options.all_columns or table.key_value:
        return None
    defaults = program.columns.get(verb.name)
    if defaults and (not table.rows or any(has_column(table.rows, name) for name in defaults)):
        return list(defaults)
    return None


def _select_fields(result: Any, columns: list[str]) -> Table:
    """A key/value table of just these (dotted) fields; a missing one shows '-'."""
    rows = []
    for name in columns:
        value = lookup(result, name) if isinstance(result, dict) else MISSING
        rows.append({"field": name, "value": None if value is MISSING else value})
    kind = task_kind(result) if isinstance(result, dict) else None
    return Table(["field", "value"], rows, {}, key_value=True, kind=kind)


# -- nested schemas (startTask params by kind) ----------------------------------------


def nested_schemas(program: Program, caller: Caller, verb: Verb, words: Sequence[str]
                   ) -> dict[str, tuple[str, JsonSchema]]:
    """{param: (label, schema)} for an open object param whose schema the server
    lists (startTask's params: getTaskKinds), when the words name it; {} when
    the server cannot say (the server checks the params anyway)."""
    spec = program.nested.get(verb.name)
    if spec is None:
        return {}
    key = next((word.split("=", 1)[1] for word in words
                if word.startswith(spec.key + "=") and not word.startswith(spec.key + ":=")),
               None)
    if not key or not any(word.split("=", 1)[0].split(".")[0].rstrip(":") == spec.param
                          for word in words if "=" in word):
        return {}
    try:
        listing = caller.call(spec.verb, {})
    except (RpcError, NotJsonRpc, TransportError):
        return {}
    items = listing.get(spec.member) if isinstance(listing, dict) else None
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get(spec.name_field) == key:
            schema = item.get(spec.schema_field)
            if isinstance(schema, dict):
                return {spec.param: (f"{key} {spec.param}", schema)}
    return {}


# -- the command ----------------------------------------------------------------------


def run(program: Program, argv: Sequence[str]) -> int:
    schema = rpc_schema.load(program.schema_name)
    view = SchemaView(schema.document)
    parser = build_parser(program, schema)
    options = parser.parse_intermixed_args(argv)
    words: list[str] = list(options.words)
    if options.completion:
        from vdsm_agent.client.completion import script

        sys.stdout.write(script(program, schema, options.completion))
        return EXIT_OK
    if words[:1] == ["help"]:
        options.help, words = True, words[1:]
    usage = parser.format_usage().rstrip()
    if options.help:
        if not words:
            parser.print_help()
            return EXIT_OK
        try:
            verb = find_verb(program, schema, words[0])
        except UsageError as exc:
            return _usage_error(program, str(exc), usage)
        sys.stdout.write(verb_help(program, schema, verb, view))
        return EXIT_OK
    if not words:
        return _usage_error(program, f"a verb is required; '{program.prog} --help' lists them",
                            usage)
    try:
        verb = find_verb(program, schema, words[0])
    except UsageError as exc:
        return _usage_error(program, str(exc), usage)
    if options.watch and verb.name not in program.watchers:
        return _usage_error(program, f"--watch follows a task: use it with "
                                     f"{', '.join(sorted(program.watchers))}", usage)
    try:
        target = choose_target(options.url, getattr(options, "unix_socket", None),
                               dict(os.environ), defaults=program.defaults)
    except UsageError as exc:
        return _usage_error(program, str(exc), usage)
    caller = Caller(program, schema, target, TlsFiles(options.cacert, options.cert, options.key),
                    options.timeout, options.verbose)
    try:
        nested = {} if options.dry_run else nested_schemas(program, caller, verb, words[1:])
        params = ParamParser(verb, view, nested).parse(words[1:])
    except UsageError as exc:
        return _usage_error(program, f"{exc}; see '{program.prog} {verb.name} --help'",
                            verb_usage(program, verb, view))
    if options.dry_run:
        request = {"jsonrpc": "2.0", "method": verb.name, "params": params, "id": 1}
        _say(sys.stdout, to_json(request, compact=options.compact))
        return EXIT_OK
    try:
        if options.watch:
            from vdsm_agent.client.watch import watch

            return watch(program, caller, program.watchers[verb.name](caller, params),
                         options)
        result = caller.call(verb.name, params)
    except (RpcError, NotJsonRpc, TransportError) as exc:
        return failure(program, schema, exc, target, options.verbose)
    except UsageError as exc:  # unreadable TLS files
        return _usage_error(program, str(exc), usage)
    print_result(program, result, verb, view, options)
    return EXIT_OK


def _quiet_stdout() -> None:
    """After EPIPE on stdout: point it at /dev/null so the exit flush is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(program: Program, argv: Sequence[str]) -> int:
    """Run the command; the exit code (see exit_codes_help)."""
    try:
        return run(program, argv)
    except SystemExit as exc:  # argparse: --help, --version, bad options
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. | head: the reader has what it wanted
        _quiet_stdout()
        return EXIT_OK
