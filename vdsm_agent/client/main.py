"""vdsm-agent-client: call one verb of the agent and print its answer.

    vdsm-agent-client [--url URL | --unix-socket PATH] [options] VERB [name=value ...]

Verbs, their params and the params' types come from ``rpc_schema`` (the same
schema the agent validates against); see docs/cli.md for the whole story and
the exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, TextIO

import rpc_schema
from rpc_schema import ApiSchema, Verb
from vdsm_agent import API_VERSION, __version__
from vdsm_agent.client.output import error_line, render_table, tabulate, to_json
from vdsm_agent.client.params import ParamParser, UsageError, close_matches
from vdsm_agent.client.schema import SchemaView
from vdsm_agent.client.transport import (
    DEFAULT_URL,
    INSTALLED_SOCKET,
    SOCKET_ENV,
    Answer,
    Target,
    TlsFiles,
    TransportError,
    choose_target,
    post,
)

PROG = "vdsm-agent-client"

EXIT_OK = 0
EXIT_APPLICATION_ERROR = 1  # the agent answered a positive (application) error code
EXIT_USAGE = 2  # bad arguments; nothing was sent
EXIT_PROTOCOL_ERROR = 3  # the agent answered a negative (JSON-RPC protocol) error code
EXIT_UNREACHABLE = 4  # no answer, or an answer that is not JSON-RPC

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  application error: the agent answered a positive error code
     (e.g. 300 DeviceNotFound, 200 TaskNotFound)
  2  usage error in the client: bad arguments, unknown verb or param, a
     value of the wrong type, a missing required param; nothing was sent
  3  protocol error: a negative JSON-RPC error code (-32700 parse error,
     -32600 invalid request, -32601 method not found, -32602 invalid
     params, -32603 internal error)
  4  cannot reach the agent: connection refused, no socket, timeout, or an
     answer that is not JSON-RPC (an HTTP error page, non-JSON)
"""

PARAMS_HELP = f"""\
params:
  name=value    converted by the param's schema type: strings as is,
                integers/numbers parsed, booleans true/false, arrays and
                objects as JSON (paths='["/dev/sdb"]'); for an array param
                repeat name=value to build the list (paths=/dev/sdb paths=/dev/sdc)
  name:=JSON    raw JSON, whatever the schema says (count:=5, paths:='[]')

target:
  --url, else --unix-socket, else the Unix socket in ${SOCKET_ENV},
  else {INSTALLED_SOCKET} when it exists, else {DEFAULT_URL}
  (a loopback TCP caller is anonymous: most verbs need the Unix socket)
"""

_WIDTH = 79


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


def _verbs_help(schema: ApiSchema) -> str:
    names = sorted(schema.verbs)
    width = max((len(name) for name in names), default=0)
    lines = ["verbs (VERB --help or help VERB for a verb's params):"]
    for name in names:
        lines += textwrap.wrap(
            schema.verbs[name].summary, _WIDTH, initial_indent=f"  {name:<{width}}  ",
            subsequent_indent=" " * (width + 4)) or [f"  {name}"]
    return "\n".join(lines)


def build_parser(schema: ApiSchema) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=(f"{PROG} [--url URL | --unix-socket PATH] [options] VERB [name=value ...]\n"
               f"       {PROG} VERB --help | help VERB"),
        description="Call a verb of the vdsm-agent JSON-RPC API and print its result as "
                    "JSON.\n\n" + _verbs_help(schema),
        epilog=PARAMS_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help, or a verb's params with VERB --help")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} (API {API_VERSION})")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", metavar="URL",
                        help="http(s)://host[:port][/jsonrpc] (port 54321, path /jsonrpc "
                             "by default)")
    target.add_argument("--unix-socket", metavar="PATH",
                        help=f"the agent's Unix socket (default: ${SOCKET_ENV})")
    parser.add_argument("--timeout", metavar="SECONDS", type=_positive_seconds, default=60.0,
                        help="give up when there is no answer after this long (default 60); "
                             "raise it for long-polls such as waitTask")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--compact", action="store_true", help="print the result on one line")
    style.add_argument("--table", action="store_true",
                       help="print a list result (or an object's one list of objects) "
                            "as a table")
    parser.add_argument("--columns", metavar="A,B,C", type=_columns,
                        help="the table's columns, in order (implies --table)")
    parser.add_argument("--max-width", metavar="N", type=_width, default=40,
                        help="cut table cells to N characters (default 40, 0: never)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the request and HTTP status on stderr, and an error's "
                             "data as JSON")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the JSON-RPC request instead of sending it")
    tls = parser.add_argument_group("TLS (https URLs)")
    tls.add_argument("--cacert", metavar="FILE", help="CA bundle to verify the agent with")
    tls.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    tls.add_argument("--key", metavar="FILE", help="client key (PEM), if not in --cert")
    parser.add_argument("words", nargs="*", metavar="VERB [name=value ...]",
                        help=argparse.SUPPRESS)
    return parser


# -- verbs -----------------------------------------------------------------------


def find_verb(schema: ApiSchema, name: str) -> Verb:
    verb = schema.verb(name)
    if verb is not None:
        return verb
    hint = close_matches(name, sorted(schema.verbs))
    raise UsageError(
        f"unknown verb {name!r}"
        + (f" (did you mean: {', '.join(hint)}?)" if hint else "")
        + f"; '{PROG} --help' lists the verbs")


def verb_usage(verb: Verb, view: SchemaView) -> str:
    parser = ParamParser(verb, view)
    words = []
    for name, node in parser.properties.items():
        word = f"{name}=VALUE" + (" ..." if "array" in view.types(node) else "")
        words.append(word if name in parser.required else f"[{word}]")
    head = f"usage: {PROG} [options] {verb.name}"
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


def verb_help(schema: ApiSchema, verb: Verb, view: SchemaView) -> str:
    parser = ParamParser(verb, view)
    lines = [verb_usage(verb, view), "", verb.summary]
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
    if parser.open:
        lines.append("  (other names are accepted too)")
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
            lines.append("  " + shlex.join([PROG, verb.name, *words]))
    return "\n".join(lines) + "\n"


# -- the call --------------------------------------------------------------------


def _say(stream: TextIO, text: str) -> None:
    print(text, file=stream)


def _usage_error(message: str, usage: str) -> int:
    _say(sys.stderr, usage)
    _say(sys.stderr, f"{PROG}: error: {message}")
    return EXIT_USAGE


def _unreachable(target: Target, reason: str) -> int:
    _say(sys.stderr, f"{PROG}: cannot reach the agent at {target}: {reason}")
    return EXIT_UNREACHABLE


def handle_answer(answer: Answer, target: Target, schema: ApiSchema, verb: Verb,
                  view: SchemaView, options: argparse.Namespace) -> int:
    if options.verbose:
        _say(sys.stderr, f"< HTTP {answer.status} {answer.reason}")
    http_problem = f"HTTP {answer.status} {answer.reason}".rstrip()
    try:
        reply = json.loads(answer.body)
    except ValueError:
        snippet = answer.body[:200].decode("utf-8", "replace").strip()
        if answer.status != 200:
            return _unreachable(target, f"{http_problem}: {snippet}" if snippet else http_problem)
        return _unreachable(target, f"the answer is not JSON: {snippet!r}")
    if not _is_reply(reply):
        problem = "the answer is not a JSON-RPC 2.0 response"
        return _unreachable(target, f"{http_problem}: {problem}" if answer.status != 200
                            else problem)
    if "error" in reply:
        error = reply["error"]
        names_by_code = {spec["code"]: name for name, spec in schema.errors.items()
                         if isinstance(spec.get("code"), int)}
        _say(sys.stderr, error_line(error, names_by_code))
        if options.verbose and "data" in error:
            _say(sys.stderr, to_json(error["data"]))
        return EXIT_APPLICATION_ERROR if error["code"] > 0 else EXIT_PROTOCOL_ERROR
    print_result(reply["result"], verb, view, options)
    return EXIT_OK


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


def print_result(result: Any, verb: Verb, view: SchemaView,
                 options: argparse.Namespace) -> None:
    if not (options.table or options.columns):
        _say(sys.stdout, to_json(result, compact=options.compact))
        return
    table = tabulate(result, verb.result, view)
    if table is None:  # a scalar: nothing to tabulate
        _say(sys.stdout, to_json(result, compact=True))
        return
    if options.columns and table.rows:
        unknown = [name for name in options.columns if name not in table.columns]
        if unknown:
            _say(sys.stderr, f"{PROG}: no such column: {', '.join(unknown)} "
                             f"(columns: {', '.join(table.columns)})")
    text = render_table(table, options.columns, options.max_width)
    if text:
        _say(sys.stdout, text)
    if not table.rows:
        _say(sys.stderr, "(no rows)")
    for name, value in table.rest.items():
        _say(sys.stderr, f"{name}: {to_json(value, compact=True)}")


def run(argv: Sequence[str]) -> int:
    schema = rpc_schema.load("agent")
    view = SchemaView(schema.document)
    parser = build_parser(schema)
    options = parser.parse_intermixed_args(argv)
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
            return _usage_error(str(exc), parser.format_usage().rstrip())
        sys.stdout.write(verb_help(schema, verb, view))
        return EXIT_OK
    if not words:
        return _usage_error(f"a verb is required; '{PROG} --help' lists them",
                            parser.format_usage().rstrip())
    try:
        verb = find_verb(schema, words[0])
    except UsageError as exc:
        return _usage_error(str(exc), parser.format_usage().rstrip())
    try:
        params = ParamParser(verb, view).parse(words[1:])
        target = choose_target(options.url, options.unix_socket, dict(os.environ))
    except UsageError as exc:
        return _usage_error(f"{exc}; see '{PROG} {verb.name} --help'", verb_usage(verb, view))
    request = {"jsonrpc": "2.0", "method": verb.name, "params": params, "id": 1}
    body = json.dumps(request, separators=(",", ":")).encode()
    if options.dry_run:
        _say(sys.stdout, to_json(request, compact=options.compact))
        return EXIT_OK
    if options.verbose:
        _say(sys.stderr, f"> POST {target}")
        _say(sys.stderr, f"> {body.decode()}")
    tls = TlsFiles(options.cacert, options.cert, options.key)
    try:
        answer = post(target, body, options.timeout, tls)
    except TransportError as exc:
        return _unreachable(target, str(exc))
    except UsageError as exc:
        return _usage_error(str(exc), parser.format_usage().rstrip())
    return handle_answer(answer, target, schema, verb, view, options)


def _quiet_stdout() -> None:
    """After EPIPE on stdout: point it at /dev/null so the exit flush is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: returns the exit code (see EXIT_CODES_HELP)."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help, --version, bad options
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. | head: the reader has what it wanted
        _quiet_stdout()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
