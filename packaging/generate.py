#!/usr/bin/env python3
"""Generate the packaged files that derive from the code: run at package build time.

    python3 packaging/generate.py [--out DIR] [--private DIR] [--setup-cfg FILE]
                                  [config|manpages|wrappers|completions ...]

* ``config``: the default config file ``vdsm-agent.conf`` (installed as
  /etc/vdsm-agent/vdsm-agent.conf, a preserved config file), from the settings
  table in ``vdsm_agent/settings.py``: every setting commented with its help,
  type, flag and default, plus the packaged system values uncommented.
* ``manpages``: ``man/vdsm-agent.8``, ``man/vdsm-agent-client.1`` and
  ``man/vdsm-agent.conf.5`` from the argparse parsers (rendered by
  argparse-manpage) and the settings table; any other console script in
  setup.cfg gets a page from its ``build_parser()`` when it has one, else a
  short stub (``vdsm-engine.8``, and ``vdsm-engine-call.1`` for its client).
  The pages are kept in the tree, in ``man/`` (``man -l man/vdsm-agent.8``
  from a checkout; tests/test_packaging.py checks they are current):
  regenerate them with ``.venv/bin/python packaging/generate.py --out . manpages``.
  The packages install them from there (no argparse-manpage at build time).
* ``completions``: ``completion/bash/NAME`` and ``completion/zsh/_NAME`` for
  the client programs (``vdsm-agent-client``, ``vdsm-engine``): shell
  completion of verbs and params from the API schema (``--completion``).
* ``wrappers``: for every console script in setup.cfg, ``bin/NAME`` (installed
  in /usr/bin) and ``scripts/NAME`` (in /usr/lib/vdsm-agent/scripts): the
  command runs with the package's private interpreter (its pinned
  dependencies, docs/packaging.md).

Importing the parsers needs the agent's dependencies: run this with the
private interpreter being built (``.../usr/lib/vdsm-agent/bin/python3``) and
``PYTHONPATH`` set to the source tree, as packaging/debian/rules and the spec
do. Only ``config`` needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import importlib
import importlib.metadata
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vdsm_agent import __version__, settings  # noqa: E402

PRIVATE = "/usr/lib/vdsm-agent"  # the private environment (packaging/vendor/install)
CONFIG_FILE = "/etc/vdsm-agent/vdsm-agent.conf"
# The values the packages set (the built-in defaults suit a checkout); only
# those whose setting exists in the settings table are written.
SYSTEM_VALUES = {
    "state_dir": "/var/lib/vdsm-agent",
    "unix_socket": "/run/vdsm-agent/agent.sock",
    "mount_root": "/run/vdsm-agent/mnt",
}
DAEMONS = {"vdsm-agent", "vdsm-engine"}  # section 8; other commands are section 1
WIDTH = 79


# -- setup.cfg ---------------------------------------------------------------------


def console_scripts(setup_cfg: Path = ROOT / "setup.cfg") -> dict[str, str]:
    """``name -> "module:function"`` from setup.cfg's console_scripts, read as
    setuptools writes them to entry_points.txt: an INI group of ``name = value``
    lines, each value parsed as an entry point (``importlib.metadata``)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg, encoding="utf-8")
    raw = parser.get("options.entry_points", "console_scripts", fallback="")
    group = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    group.optionxform = str  # type: ignore[assignment,method-assign]  # names keep their case
    group.read_string(f"[console_scripts]\n{raw}")
    points = [importlib.metadata.EntryPoint(name, value, "console_scripts")
              for name, value in group.items("console_scripts")]
    return {point.name: f"{point.module}:{point.attr}" for point in points}


# -- the default config file ---------------------------------------------------------


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False)


def _ini_value(setting: settings.Setting, value: Any) -> list[str]:
    """``name = value`` lines; a list takes one item per indented line."""
    if setting.repeatable:
        return [f"{setting.name} ="] + [f"    {item}" for item in value]
    if isinstance(value, bool):
        return [f"{setting.name} = {'true' if value else 'false'}"]
    return [f"{setting.name} = {value}".rstrip()]


def render_config(system_values: dict[str, str] | None = None) -> str:
    values = SYSTEM_VALUES if system_values is None else system_values
    lines = [
        f"# {CONFIG_FILE}: vdsm-agent configuration (INI).",
        "#",
        "# Generated from the settings table (vdsm_agent/settings.py) when the",
        f"# package was built (vdsm-agent {__version__}). Every setting is listed",
        "# with its meaning, type, command-line flag and built-in default. Commented",
        "# lines (#name = ...) show the built-in default and change nothing; the",
        "# uncommented values are the ones the package sets for a system install.",
        "# A flag on the command line wins over this file. List settings take one",
        "# value per indented line. See vdsm-agent.conf(5) and docs/configuration.md.",
        "#",
        "# This file is preserved on upgrades once you edit it. Restart the service",
        "# to apply a change: running tasks keep running (docs/packaging.md).",
        "",
        f"[{settings.SECTION}]",
    ]
    for setting in settings.SETTINGS:
        lines.append("")
        lines += _comment(setting.help)
        lines += _comment(f"Type: {setting.type}. Flag: {setting.option}. "
                          f"Default: {settings.format_default(setting)}.")
        lines += ["#" + line for line in _ini_value(setting, setting.default)]
        if setting.name in values:
            lines += _ini_value(setting, values[setting.name])
    return "\n".join(lines) + "\n"


# -- roff ----------------------------------------------------------------------------


def roff_text(text: str) -> str:
    """Escape running text: backslashes, and a leading dot or quote on a line."""
    text = text.replace("\\", "\\e")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.split("\n"))


def roff_word(text: str) -> str:
    """Escape a literal word (an option, a path): hyphens are minus signs there."""
    return roff_text(text).replace("-", "\\-")


def roff_preformatted(text: str) -> list[str]:
    lines = [".nf"]
    for line in text.rstrip("\n").split("\n"):
        lines.append(roff_text(line) if line.strip() else "")
    lines.append(".fi")
    return lines


def _title(name: str, section: str, manual: str) -> list[str]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    date = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
            .strftime("%Y-%m-%d") if epoch else "")
    return [
        '.\\" Generated by packaging/generate.py from the code; do not edit.',
        f'.TH "{name.upper()}" "{section}" "{date}" "vdsm-agent {__version__}" "{manual}"',
    ]


def _name_line(name: str, summary: str) -> list[str]:
    return [".SH NAME", f"{roff_word(name)} \\- {roff_text(summary)}"]


def _first_sentence(text: str) -> str:
    text = " ".join(text.split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(\s|$)", text)
    summary = match.group(1) if match else text
    return summary.rstrip(".")


MANUALS = {"1": "User Commands", "5": "File Formats", "8": "System Administration"}
GENERATED = '.\\" Generated by packaging/generate.py from the code; do not edit.'


def page_date() -> str:
    """The release date (debian/changelog), or SOURCE_DATE_EPOCH's: the same every run."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).strftime("%Y-%m-%d")
    changelog = (ROOT / "packaging" / "debian" / "changelog").read_text(encoding="utf-8")
    match = re.search(r"^ -- .*>  (.+)$", changelog, re.M)
    if not match:
        return ""
    when = datetime.datetime.strptime(match.group(1).strip(), "%a, %d %b %Y %H:%M:%S %z")
    return when.strftime("%Y-%m-%d")


def render_page(parser: argparse.ArgumentParser, name: str, section: str, summary: str,
                description: list[str] | None = None,
                sections: Sequence[tuple[str, list[str]]] = (),
                synopsis: list[str] | None = None) -> str:
    """A man page from an argparse parser, by argparse-manpage (the options; the
    synopsis and description unless given), then ``sections`` (roff lines)."""
    from argparse_manpage.manpage import Manpage

    if description is not None:
        parser.description = None  # ours replaces argparse-manpage's rendering of it
    parser.epilog = None  # what it says is in our own sections
    page = Manpage(parser)
    page.prog = name
    page.section = int(section)
    page.manual = MANUALS[section]
    page.source = f"vdsm-agent {__version__}"
    page.date = page_date()
    page.description = summary
    if synopsis is not None:
        page.add_section("synopsis", "=", "\n".join(synopsis))
    if description is not None:
        page.add_section("description", "=", "\n".join(description))
    for heading, lines in sections:
        page.add_section(heading, "=", "\n".join(lines))
    return GENERATED + "\n" + _escape_text_lines(str(page))


def _escape_text_lines(page: str) -> str:
    """Text that argparse-manpage wrapped onto a line starting with '.' or "'"
    (a default like ./vdsm-agent-state) would be read as a request: escape it."""
    return "\n".join("\\&" + line if re.match(r"^(\.[^A-Za-z\\]|')", line) else line
                     for line in page.split("\n"))


def _see_also(names: Iterable[tuple[str, int]]) -> list[str]:
    return [".SH SEE ALSO", ",\n".join(f"\\fB{roff_word(name)}\\fR({section})"
                                      for name, section in names)]


def _files_section() -> list[str]:
    return [
        ".SH FILES",
        ".TP", f"\\fI{roff_word(CONFIG_FILE)}\\fR",
        "The configuration file (see \\fBvdsm\\-agent.conf\\fR(5)).",
        ".TP", "\\fI/var/lib/vdsm\\-agent\\fR",
        "The state directory: the sqlite store and the tasks' output files.",
        ".TP", "\\fI/run/vdsm\\-agent/agent.sock\\fR",
        "The Unix socket (mode 0660; members of the group \\fBvdsm\\-agent\\fR may use it).",
        ".TP", "\\fI/run/vdsm\\-agent/mnt\\fR",
        "Mount points of the storage connections, one directory per URI scheme.",
    ]


def page_agent() -> str:
    from vdsm_agent.main import build_parser

    parser = build_parser()
    description = [
        roff_text(parser.description or ""), ".PP",
        "The agent keeps storage connections (NFS, iSCSI, GlusterFS, sshfs, local "
        "directories, loop devices) connected and runs long operations on local "
        "devices and images as tasks. It answers \\fBPOST /jsonrpc\\fR and "
        "\\fBGET /health\\fR on a loopback TCP address and on a Unix socket; "
        "\\fBvdsm\\-agent\\-client\\fR(1) is its command-line client.",
        ".PP",
        "Installed from a package, it runs as the systemd service "
        "\\fBvdsm\\-agent.service\\fR with "
        f"\\fB\\-\\-config {roff_word(CONFIG_FILE)}\\fR.",
        ".PP",
        "Every setting of the configuration file is also a flag below; a flag wins "
        "over the file, which wins over the built-in default. "
        "\\fBvdsm\\-agent.conf\\fR(5) describes the file."]
    sections = [
        ("signals", [
            ".TP", "\\fBSIGTERM\\fR, \\fBSIGINT\\fR",
            "Stop serving and exit. Running tasks are separate processes in their own "
            "sessions and keep running; the next agent re-attaches to them. The systemd "
            "unit uses \\fBKillMode=process\\fR so that a restart or an upgrade of the "
            "service does not kill them either."]),
        ("files", _files_section()[1:]),
        ("see also", _see_also([("vdsm-agent-client", 1), ("vdsm-agent.conf", 5),
                                ("systemctl", 1)])[1:]),
    ]
    return render_page(parser, "vdsm-agent", "8",
                       "host-local storage agent (JSON-RPC 2.0 over HTTP)",
                       description, sections,
                       ["\\fBvdsm\\-agent\\fR [\\fB\\-\\-config\\fR \\fIFILE\\fR] "
                        "[\\fIOPTION\\fR]..."])


def page_client_program(program: Any, name: str, summary: str,
                        see_also: Iterable[tuple[str, int]]) -> str:
    """The page of a client program (vdsm-agent-client, vdsm-engine call)."""
    import rpc_schema
    from vdsm_agent.client import usage

    schema = rpc_schema.load(program.schema_name)
    parser = usage.build_parser(program, schema)
    verbs: list[str] = []
    for verb_name, verb in sorted(schema.verbs.items()):
        verbs += [".TP", f"\\fB{roff_word(verb_name)}\\fR", roff_text(verb.summary)]
    environment: list[str] = []
    if program.defaults.url_env:
        environment += [".TP", f"\\fB{roff_word(program.defaults.url_env)}\\fR",
                        f"The {program.server}'s URL, when \\fB\\-\\-url\\fR is not given."]
    if program.defaults.socket_env:
        environment += [".TP", f"\\fB{roff_word(program.defaults.socket_env)}\\fR",
                        f"The {program.server}'s Unix socket, when neither \\fB\\-\\-url\\fR "
                        "nor \\fB\\-\\-unix\\-socket\\fR is given (e.g. "
                        "\\fI/run/vdsm\\-agent/agent.sock\\fR)."]
    environment += [".TP", "\\fBNO_COLOR\\fR",
                    "Set (to anything): no colours in tables and the progress bar. Colours "
                    "are only used on a terminal."]
    usage_line = usage.usage_line(program)
    synopsis = roff_preformatted("\n".join(line.strip() for line in usage_line.splitlines()))
    description = [
        roff_text(program.summary), ".PP",
        "Verbs, their params and the params' types come from the API schema, the same "
        f"one the {program.server} validates requests against; "
        f"\\fB{roff_word(program.prog)} \\fIVERB\\fB \\-\\-help\\fR shows a verb's "
        "params, errors and examples. Options may come before or after the verb."]
    sections = [
        ("verbs", verbs),
        ("parameters", roff_preformatted(usage.PARAMS_HELP.split("\n", 1)[1])),
        ("target", roff_preformatted(usage.target_help(program).split("\n", 1)[1])),
        ("exit status", roff_preformatted(
            usage.exit_codes_help(program.server, usage.error_examples(schema))
            .split("\n", 1)[1])),
        ("environment", environment),
        ("examples", roff_preformatted("\n".join(f"{program.prog} {example}"
                                                 for example in program.examples))),
        ("see also", _see_also(see_also)[1:]),
    ]
    return render_page(parser, name, "1", summary, description, sections, synopsis)


def page_client() -> str:
    from vdsm_agent.client.main import AGENT

    return page_client_program(AGENT, "vdsm-agent-client",
                               "call a verb of the vdsm-agent JSON-RPC API",
                               [("vdsm-agent", 8), ("vdsm-engine-call", 1), ("curl", 1)])


def page_engine_call() -> str:
    from vdsm_agent.engine.cli import ENGINE

    return page_client_program(ENGINE, "vdsm-engine-call",
                               "call a verb of the vdsm-engine JSON-RPC API",
                               [("vdsm-engine", 8), ("vdsm-agent-client", 1)])


def page_config() -> str:
    lines = _title("vdsm-agent.conf", "5", "File Formats")
    lines += _name_line("vdsm-agent.conf", "configuration file of vdsm-agent")
    lines += [
        ".SH SYNOPSIS", f"\\fI{roff_word(CONFIG_FILE)}\\fR",
        ".SH DESCRIPTION",
        "An INI file read by \\fBvdsm\\-agent\\fR(8) when it is given with "
        "\\fB\\-\\-config\\fR, as the packaged systemd unit does. Every setting lives in "
        f"the \\fB[{settings.SECTION}]\\fR section and is also a command-line flag, which "
        "wins over the file. List settings take one value per line (indented "
        "continuation lines). An unknown setting is an error. Restart the service to "
        "apply a change; running tasks keep running.",
        ".PP",
        "The packaged file lists every setting, commented out with its built-in "
        "default, and sets these system values:",
        ".RS 4",
        *roff_preformatted("\n".join(f"{name} = {value}" for name, value in
                                     SYSTEM_VALUES.items() if name in settings.BY_NAME)),
        ".RE",
        ".SH SETTINGS",
    ]
    for setting in settings.SETTINGS:
        lines += [
            ".TP",
            f"\\fB{roff_word(setting.name)}\\fR (\\fI{roff_text(setting.type)}\\fR; flag "
            f"\\fB{roff_word(setting.option)}\\fR; default "
            f"\\fI{roff_word(settings.format_default(setting))}\\fR)",
            roff_text(setting.help),
        ]
    lines += [".SH EXAMPLE", *roff_preformatted(
        f"[{settings.SECTION}]\n"
        "state_dir = /var/lib/vdsm-agent\n"
        "unix_socket = /run/vdsm-agent/agent.sock\n"
        "allowed_roots =\n"
        "    /srv/images\n"
        "    /var/lib/vdsm-agent/images\n")]
    lines += _see_also([("vdsm-agent", 8), ("vdsm-agent-client", 1)])
    return "\n".join(lines) + "\n"


def page_generic(name: str, target: str) -> str:
    """A page for another console script: from its build_parser() if it has one."""
    section = "8" if name in DAEMONS else "1"
    module_name = target.split(":")[0]
    parser = None
    try:
        build = getattr(importlib.import_module(module_name), "build_parser", None)
        if callable(build):
            parser = build()
            if isinstance(parser, tuple):  # (top parser, *sub-command parsers)
                parser = parser[0]
    except Exception:  # a stub is better than no page; the stub says where to look
        parser = None
    if isinstance(parser, argparse.ArgumentParser):
        see_also = [("vdsm-agent", 8)]
        if name == "vdsm-engine":
            see_also.insert(0, ("vdsm-engine-call", 1))
        return render_page(parser, name, section, _first_sentence(parser.description or name),
                           sections=[("see also", _see_also(see_also)[1:])])
    lines = _title(name, section, MANUALS[section])
    lines += _name_line(name, "part of vdsm-agent")
    lines += [".SH SYNOPSIS", f"\\fB{roff_word(name)}\\fR [\\fIOPTION\\fR]...",
              ".SH DESCRIPTION",
              f"Run \\fB{roff_word(name)} \\-\\-help\\fR for its options. This page is "
              "a stub: the command has no argument parser the page generator can read yet."]
    lines += _see_also([("vdsm-agent", 8)])
    return "\n".join(lines) + "\n"


KNOWN_PAGES: dict[str, tuple[str, Callable[[], str]]] = {
    "vdsm-agent": ("8", page_agent),
    "vdsm-agent-client": ("1", page_client),
}
# Pages of sub-commands that are programs of their own, by console script.
SUB_PAGES: dict[str, tuple[str, str, Callable[[], str]]] = {
    "vdsm-engine": ("vdsm-engine-call", "1", page_engine_call),
}


def manpages(scripts: dict[str, str]) -> dict[str, str]:
    """File name -> page text, one per console script (and sub-command program)
    plus the config file's."""
    pages = {"vdsm-agent.conf.5": page_config()}
    for name, target in scripts.items():
        if name in KNOWN_PAGES:
            section, render = KNOWN_PAGES[name]
            pages[f"{name}.{section}"] = render()
        else:
            section = "8" if name in DAEMONS else "1"
            pages[f"{name}.{section}"] = page_generic(name, target)
        if name in SUB_PAGES and ".SH OPTIONS" in pages[f"{name}.{section}"]:
            sub_name, sub_section, render = SUB_PAGES[name]
            pages[f"{sub_name}.{sub_section}"] = render()
    return pages


# -- wrappers -----------------------------------------------------------------------


def render_wrapper(name: str, private: str = PRIVATE) -> str:
    """/usr/bin/NAME: runs the entry script with the private interpreter.

    A shell wrapper (not a #!/usr/lib/vdsm-agent/bin/python3 script) keeps the
    interpreter path in /usr/bin scripts the distribution's, while the process
    still runs as PRIVATE/bin/python3: task processes started with
    sys.executable get the same environment. ``-I``: no PYTHONPATH, no user
    site-packages, no script directory on sys.path.
    """
    return (
        "#!/bin/sh\n"
        f"# {name}: generated by packaging/generate.py from setup.cfg's console_scripts.\n"
        f"# {private} is the package's private Python environment: Debian's python3\n"
        "# plus the pinned dependencies in its site-packages (docs/packaging.md).\n"
        f'exec {private}/bin/python3 -I {private}/scripts/{name} "$@"\n'
    )


def render_entry(name: str, target: str) -> str:
    """PRIVATE/scripts/NAME: the console script's entry point (run, not imported)."""
    module, _, function = target.partition(":")
    if not module or not function or not re.fullmatch(r"[\w.]+", module + function):
        raise ValueError(f"console script {name}: cannot wrap {target!r}")
    return (
        f"# {name}: generated by packaging/generate.py from setup.cfg's console_scripts;\n"
        "# run by /usr/bin/" + name + " with the private interpreter.\n"
        "import sys\n"
        "\n"
        f"from {module} import {function}\n"
        "\n"
        f"sys.exit({function}())\n"
    )


# -- shell completion ------------------------------------------------------------------

# Console scripts that are client programs (vdsm_agent.client), and where their
# Program is: their completion scripts come from their API schema.
CLIENT_PROGRAMS = {
    "vdsm-agent-client": "vdsm_agent.client.main:AGENT",
    "vdsm-engine": "vdsm_agent.engine.cli:ENGINE",
}


def completions(scripts: dict[str, str]) -> dict[str, str]:
    """'bash/NAME' and 'zsh/_NAME' -> script, for each client program in ``scripts``."""
    import rpc_schema
    from vdsm_agent.client.completion import script

    found: dict[str, str] = {}
    for name, where in CLIENT_PROGRAMS.items():
        if name not in scripts:
            continue
        module, _, attribute = where.partition(":")
        program = getattr(importlib.import_module(module), attribute)
        schema = rpc_schema.load(program.schema_name)
        found[f"bash/{name}"] = script(program, schema, "bash")
        found[f"zsh/_{name}"] = script(program, schema, "zsh")
    return found


# -- command line --------------------------------------------------------------------

KINDS = ("config", "manpages", "wrappers", "completions")


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    print(f"generate: wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="*", metavar="config|manpages|wrappers|completions",
                        help="what to generate (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "packaging",
                        help="output directory (default: build/packaging)")
    parser.add_argument("--private", default=PRIVATE,
                        help=f"the private environment the wrappers use (default: {PRIVATE})")
    parser.add_argument("--setup-cfg", type=Path, default=ROOT / "setup.cfg",
                        help="where the console scripts are declared")
    options = parser.parse_args(argv)
    what = set(options.what or KINDS)
    unknown = what - set(KINDS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))} (choose from {', '.join(KINDS)})")
    scripts = console_scripts(options.setup_cfg)
    if not scripts:
        print(f"generate: no console_scripts in {options.setup_cfg}", file=sys.stderr)
        return 1
    if "config" in what:
        write(options.out / "vdsm-agent.conf", render_config())
    if "manpages" in what:
        for file_name, text in manpages(scripts).items():
            write(options.out / "man" / file_name, text)
    if "wrappers" in what:
        for name, target in scripts.items():
            write(options.out / "bin" / name, render_wrapper(name, options.private), 0o755)
            write(options.out / "scripts" / name, render_entry(name, target))
    if "completions" in what:
        for file_name, text in completions(scripts).items():
            write(options.out / "completion" / file_name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
