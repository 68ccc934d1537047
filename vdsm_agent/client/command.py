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
import json
import os
import shlex
import shutil
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import rpc_schema
from rpc_schema import ApiSchema, Verb
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
from vdsm_agent.client.params import ParamParser, UsageError, close_matches
from vdsm_agent.client.program import Program
from vdsm_agent.client.schema import JsonSchema, SchemaView
from vdsm_agent.client.transport import (
    Answer,
    Target,
    TlsFiles,
    TransportError,
    choose_target,
    post,
)

EXIT_OK = 0
EXIT_APPLICATION_ERROR = 1  # a positive (application) error code; a watched task failed
EXIT_USAGE = 2  # bad arguments; nothing was sent
EXIT_PROTOCOL_ERROR = 3  # a negative (JSON-RPC protocol) error code
EXIT_UNREACHABLE = 4  # no answer, or an answer that is not JSON-RPC
EXIT_INTERRUPTED = 130  # Ctrl-C

# A long-poll (a verb with a "timeout" param) gets its own timeout plus this
# much before the client gives up on the HTTP answer.
LONG_POLL_MARGIN = 10.0
_WIDTH = 79


def exit_codes_help(server: str, examples: str = "300 DeviceNotFound, 200 TaskNotFound") -> str:
    return f"""\
exit codes:
  0  success; with --watch: the task (or job) is done
  1  application error: the {server} answered a positive error code
     (e.g. {examples}); with --watch: the task
     failed, was canceled or interrupted (the job failed or partly failed)
  2  usage error in the client: bad arguments, unknown verb or param, a
     value of the wrong type, a missing required param; nothing was sent
  3  protocol error: a negative JSON-RPC error code (-32700 parse error,
     -32600 invalid request, -32601 method not found, -32602 invalid
     params, -32603 internal error)
  4  cannot reach the {server}: connection refused, no socket, timeout, or an
     answer that is not JSON-RPC (an HTTP error page, non-JSON)
  130  Ctrl-C (with --watch: the task goes on)
"""


PARAMS_HELP = """\
params:
  name=value    converted by the param's schema type: strings as is,
                integers/numbers parsed, booleans true/false, arrays and
                objects as JSON (paths='["/dev/sdb"]'); for an array param
                repeat name=value to build the list (paths=/dev/sdb paths=/dev/sdc)
  name:=JSON    raw JSON, whatever the schema says (count:=5, paths:='[]')
  a.b=value     a field of an object param (filter.state=running,
                params.source=/a); a field that one object param declares
                may go without it (listTasks state=running kind=copy)
"""


def error_examples(schema: ApiSchema) -> str:
    """Two of the schema's application errors, for the exit codes' help."""
    found = [(spec["code"], name) for name, spec in schema.errors.items()
             if isinstance(spec.get("code"), int) and spec["code"] > 0]
    preferred = [item for item in found if item[1] in ("DeviceNotFound", "TaskNotFound",
                                                         "HostNotFound")]
    chosen = sorted(preferred or found, reverse=True)[:2]
    return ", ".join(f"{code} {name}" for code, name in chosen)


def target_help(program: Program) -> str:
    defaults = program.defaults
    order = ["--url"]
    if program.has_unix_socket:
        order.append("--unix-socket")
    if defaults.url_env:
        order.append(f"the URL in ${defaults.url_env}")
    if defaults.socket_env:
        order.append(f"the Unix socket in ${defaults.socket_env}")
    if defaults.installed_socket:
        order.append(f"{defaults.installed_socket} when it exists")
    order.append(defaults.url)
    text = "target:\n" + "\n".join(textwrap.wrap(
        ", else ".join(order), _WIDTH, initial_indent="  ", subsequent_indent="  "))
    if program.anonymous_hint:
        text += "\n  (a loopback TCP caller is anonymous: most verbs need the Unix socket)"
    return text + "\n"


# -- the parser --------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _columns(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected NAME[,NAME...]")
    return names


def verbs_help(schema: ApiSchema) -> str:
    names = sorted(schema.verbs)
    width = max((len(name) for name in names), default=0)
    lines = ["verbs (VERB --help or help VERB for a verb's params):"]
    for name in names:
        lines += textwrap.wrap(
            schema.verbs[name].summary, _WIDTH, initial_indent=f"  {name:<{width}}  ",
            subsequent_indent=" " * (width + 4)) or [f"  {name}"]
    return "\n".join(lines)


def usage_line(program: Program) -> str:
    target = "[--url URL | --unix-socket PATH]" if program.has_unix_socket else "[--url URL]"
    return (f"{program.prog} {target} [options] VERB [name=value ...]\n"
            f"       {program.prog} VERB --help | help VERB")


def build_parser(program: Program, schema: ApiSchema) -> argparse.ArgumentParser:
    server = program.server
    parser = argparse.ArgumentParser(
        prog=program.prog,
        usage=usage_line(program),
        description=f"{program.summary}\n\n" + verbs_help(schema),
        epilog=(PARAMS_HELP + "\n" + target_help(program) + "\n"
                + exit_codes_help(server, error_examples(schema))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help, or a verb's params with VERB --help")
    parser.add_argument("--version", action="version", version=program.version)
    target = parser.add_mutually_exclusive_group()
    port = program.defaults.port
    target.add_argument("--url", metavar="URL",
                        help=f"http(s)://host[:port][/jsonrpc] (port {port}, path /jsonrpc "
                             "by default)")
    if program.has_unix_socket:
        target.add_argument("--unix-socket", metavar="PATH",
                            help=f"the {server}'s Unix socket (default: "
                                 f"${program.defaults.socket_env}, else "
                                 f"{program.defaults.installed_socket} when it exists)")
    parser.add_argument("--timeout", metavar="SECONDS", type=_positive_seconds, default=60.0,
                        help="give up when there is no answer after this long (default 60); "
                             "a long-poll (a verb's timeout=N) gets N + 10 s at least")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--compact", action="store_true", help="print the result on one line")
    style.add_argument("--table", action="store_true",
                       help="print the result as a table (a list: one row per item, with "
                            "the verb's default columns; one object: key/value)")
    parser.add_argument("--columns", metavar="A,B,C", type=_columns,
                        help="the table's columns, in order; a.b reaches into an object "
                             "(progress.percent) (implies --table)")
    parser.add_argument("--all-columns", action="store_true",
                        help="every column, not the verb's default ones (implies --table)")
    parser.add_argument("--raw", action="store_true",
                        help="exact numbers in tables: bytes, seconds, timestamps as sent")
    parser.add_argument("--max-width", metavar="N", type=_width, default=None,
                        help="cut table cells to N characters (0: never; default: 40, "
                             "or on a terminal the table's fit to its width)")
    parser.add_argument("-w", "--watch", action="store_true",
                        help="follow the task (or job) with a progress bar until it is "
                             "final; exit 0 if done, 1 if not; Ctrl-C stops watching, "
                             "not the task (verbs: "
                             + (", ".join(sorted(program.watchers)) or "none") + ")")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the request and HTTP status on stderr, and an error's "
                             "data as JSON")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the JSON-RPC request instead of sending it")
    parser.add_argument("--completion", choices=("bash", "zsh"),
                        help="print a shell completion script for the verbs and params "
                             "(e.g. source <(%(prog)s --completion bash))")
    tls = parser.add_argument_group("TLS (https URLs)")
    tls.add_argument("--cacert", metavar="FILE", help=f"CA bundle to verify the {server} with")
    tls.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    tls.add_argument("--key", metavar="FILE", help="client key (PEM), if not in --cert")
    parser.add_argument("words", nargs="*", metavar="VERB [name=value ...]",
                        help=argparse.SUPPRESS)
    return parser


# -- verbs and their help -----------------------------------------------------------


def find_verb(program: Program, schema: ApiSchema, name: str) -> Verb:
    verb = schema.verb(name)
    if verb is not None:
        return verb
    hint = close_matches(name, sorted(schema.verbs))
    raise UsageError(
        f"unknown verb {name!r}"
        + (f" (did you mean: {', '.join(hint)}?)" if hint else "")
        + f"; '{program.prog} --help' lists the verbs")


def verb_usage(program: Program, verb: Verb, view: SchemaView) -> str:
    parser = ParamParser(verb, view)
    words = []
    for name, node in parser.properties.items():
        word = f"{name}=VALUE" + (" ..." if "array" in view.types(node) else "")
        words.append(word if name in parser.required else f"[{word}]")
    head = f"usage: {program.prog} [options] {verb.name}"
    return "\n".join(textwrap.wrap(" ".join([head, *words]), _WIDTH,
                                   subsequent_indent=" " * (len(head) + 1),
                                   break_long_words=False, break_on_hyphens=False))


def example_words(verb: Verb, view: SchemaView, params: dict[str, Any]) -> list[str]:
    """Command-line words for an example's params, the friendliest that round-trip."""
    parser = ParamParser(verb, view)
    words: list[str] = []
    for name, value in params.items():
        candidates: list[list[str]] = []
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            candidates.append([f"{name}={item}" for item in value])
        if isinstance(value, str):
            candidates.append([f"{name}={value}"])
        else:
            candidates.append([f"{name}={json.dumps(value, separators=(',', ':'))}"])
        chosen = [f"{name}:={json.dumps(value, separators=(',', ':'))}"]
        for candidate in candidates:
            try:
                if parser.parse(candidate, complete=False).get(name) == value:
                    chosen = candidate
                    break
            except UsageError:
                continue
        words += chosen
    return words


def verb_help(program: Program, schema: ApiSchema, verb: Verb, view: SchemaView) -> str:
    parser = ParamParser(verb, view)
    lines = [verb_usage(program, verb, view), "", verb.summary]
    for paragraph in verb.description.split("\n\n"):
        if paragraph.strip():
            lines += ["", *textwrap.wrap(paragraph, _WIDTH)]
    lines += ["", "params:" if parser.properties else "params: none"]
    width = max((len(name) for name in parser.properties), default=0)
    for name, node in parser.properties.items():
        node = view.resolve(node)
        flag = "required" if name in parser.required else "optional"
        lines.append(f"  {name:<{width}}  {view.describe(node)}, {flag}")
        indent = " " * (width + 4)
        description = node.get("description")
        if isinstance(description, str) and description:
            lines += textwrap.wrap(description, _WIDTH, initial_indent=indent,
                                   subsequent_indent=indent)
        types = view.types(node)
        if "array" in types and "string" not in types:
            lines += textwrap.wrap(
                f"A JSON array ({name}='[...]'), or one item per {name}=VALUE (repeatable).",
                _WIDTH, initial_indent=indent, subsequent_indent=indent)
        fields = view.properties(node)
        if fields:
            lines += textwrap.wrap(
                "Fields (name=VALUE or " + name + ".name=VALUE): " + ", ".join(fields) + ".",
                _WIDTH, initial_indent=indent, subsequent_indent=indent)
    if parser.open:
        lines.append("  (other names are accepted too)")
    if verb.name in program.watchers:
        lines += ["", "--watch: follow it with a progress bar until it is final "
                      "(exit 0 if done, 1 if not)."]
    if verb.errors:
        lines += ["", "errors:"]
        for name in verb.errors:
            spec = schema.errors.get(name, {})
            lines.append(f"  {spec.get('code', '?')} {name}")
            lines += textwrap.wrap(str(spec.get("description", "")), _WIDTH,
                                   initial_indent="      ", subsequent_indent="      ")
    examples = [example for example in verb.examples
                if isinstance(example.get("params"), dict)]
    if examples:
        lines += ["", "examples:"]
        for example in examples:
            words = example_words(verb, view, example["params"])
            lines.append("  " + " ".join([program.prog, shlex.join([verb.name, *words])]))
    return "\n".join(lines) + "\n"


# -- calls ---------------------------------------------------------------------------


class RpcError(Exception):
    """The server answered a JSON-RPC error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message")))
        self.error = error

    @property
    def name(self) -> str:
        data = self.error.get("data")
        return str(data.get("name")) if isinstance(data, dict) else ""


class NotJsonRpc(Exception):
    """An HTTP answer that is not a JSON-RPC 2.0 response to our request."""


def _is_reply(reply: Any) -> bool:
    """A JSON-RPC 2.0 response to our request (id 1), or an error without an id."""
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
        return False
    if ("result" in reply) == ("error" in reply):
        return False
    if "error" in reply:
        error = reply["error"]
        if not isinstance(error, dict) or type(error.get("code")) is not int:
            return False
        return reply.get("id") in (1, None)
    return bool(reply.get("id") == 1)


def decode(answer: Answer) -> Any:
    """The result of an HTTP answer; RpcError for an error answer, NotJsonRpc."""
    http_problem = f"HTTP {answer.status} {answer.reason}".rstrip()
    try:
        reply = json.loads(answer.body)
    except ValueError:
        snippet = answer.body[:200].decode("utf-8", "replace").strip()
        if answer.status != 200:
            raise NotJsonRpc(f"{http_problem}: {snippet}" if snippet else http_problem) \
                from None
        raise NotJsonRpc(f"the answer is not JSON: {snippet!r}") from None
    if not _is_reply(reply):
        problem = "the answer is not a JSON-RPC 2.0 response"
        raise NotJsonRpc(f"{http_problem}: {problem}" if answer.status != 200 else problem)
    if "error" in reply:
        raise RpcError(reply["error"])
    return reply["result"]


class Caller:
    """Calls verbs of one server, for the command and for a watch."""

    def __init__(self, program: Program, schema: ApiSchema, target: Target, tls: TlsFiles,
                 timeout: float, verbose: bool = False) -> None:
        self.program = program
        self.schema = schema
        self.target = target
        self.tls = tls
        self.timeout = timeout
        self.verbose = verbose

    def has(self, method: str, *params: str) -> bool:
        """Whether the schema has this verb, with these params."""
        verb = self.schema.verb(method)
        return verb is not None and set(params) <= set(verb.params.get("properties", {}))

    def http_timeout(self, method: str, params: Mapping[str, Any]) -> float:
        """--timeout, or more for a long-poll: its own timeout plus a margin."""
        verb = self.schema.verb(method)
        declared = (verb.params.get("properties", {}) if verb else {}).get("timeout")
        if not isinstance(declared, dict):
            return self.timeout
        wait = params.get("timeout", declared.get("default", 0))
        if isinstance(wait, int | float) and not isinstance(wait, bool):
            return max(self.timeout, float(wait) + LONG_POLL_MARGIN)
        return self.timeout

    def call(self, method: str, params: Mapping[str, Any]) -> Any:
        """The result; RpcError, NotJsonRpc or TransportError."""
        request = {"jsonrpc": "2.0", "method": method, "params": dict(params), "id": 1}
        body = json.dumps(request, separators=(",", ":")).encode()
        if self.verbose:
            _say(sys.stderr, f"> POST {self.target}")
            _say(sys.stderr, f"> {body.decode()}")
        answer = post(self.target, body, self.http_timeout(method, params), self.tls,
                      self.program.server)
        if self.verbose:
            _say(sys.stderr, f"< HTTP {answer.status} {answer.reason}")
        return decode(answer)


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
        if value is not None and value != []:  # a next page token, unreachable hosts
            _say(sys.stderr, f"{name}: {to_json(value, compact=True)}")


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
