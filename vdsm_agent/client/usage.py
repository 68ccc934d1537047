"""What the client says about itself: its usage, help texts and argument parser.

The verbs, their params and the examples come from the program's schema, so
``--help``, ``VERB --help`` and the man pages (packaging/generate.py, by
argparse-manpage) never name a verb the server does not have.
"""

from __future__ import annotations

import argparse
import json
import shlex
import textwrap
from typing import Any

from rpc_schema import ApiSchema, Verb
from vdsm_agent.client.params import ParamParser, UsageError, close_matches
from vdsm_agent.client.program import Program
from vdsm_agent.client.schema import SchemaView

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
