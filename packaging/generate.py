#!/usr/bin/env python3
"""Generate the packaged files that derive from the code: run at package build time.

    python3 packaging/generate.py [--out DIR] [--interpreter PATH] [config|manpages|wrappers ...]

* ``config``: the default config file ``vdsm-agent.conf`` (installed as
  /etc/vdsm-agent/vdsm-agent.conf, a preserved config file), from the settings
  table in ``vdsm_agent/settings.py``: every setting commented with its help,
  type, flag and default, plus the packaged system values uncommented.
* ``manpages``: ``man/vdsm-agent.8``, ``man/vdsm-agent-client.1`` and
  ``man/vdsm-agent.conf.5`` from the argparse parsers and the settings table;
  any other console script in setup.cfg (``vdsm-engine`` once it exists) gets
  a page from its ``build_parser()`` when it has one, else a short stub.
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
    """``name -> "module:function"`` from setup.cfg's console_scripts."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg, encoding="utf-8")
    raw = parser.get("options.entry_points", "console_scripts", fallback="")
    scripts = {}
    for line in raw.splitlines():
        if "=" in line:
            name, target = (part.strip() for part in line.split("=", 1))
            scripts[name] = target
    return scripts


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


def _expand_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    # argparse's own expansion of %(default)s and friends (and of "%%").
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def _option_words(action: argparse.Action) -> str:
    metavar = ""
    if action.nargs != 0:
        raw = action.metavar if action.metavar is not None else action.dest.upper()
        metavar = " ".join(raw) if isinstance(raw, tuple) else str(raw)
    names = ", ".join(f"\\fB{roff_word(option)}\\fR" for option in action.option_strings)
    return names + (f" \\fI{roff_word(metavar)}\\fR" if metavar else "")


def render_options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = [".SH OPTIONS"]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions
                   if action.option_strings and action.help != argparse.SUPPRESS]
        if not actions:
            continue
        if group.title not in (None, "options", "optional arguments"):
            lines.append(f".SS {roff_text(group.title or '')}")
        for action in actions:
            lines += [".TP", _option_words(action), roff_text(_expand_help(parser, action))]
    return lines


def _synopsis(parser: argparse.ArgumentParser) -> list[str]:
    if parser.usage:
        usage = parser.format_usage().removeprefix("usage: ")
        return [".SH SYNOPSIS", *roff_preformatted(
            "\n".join(line.strip() for line in usage.strip().splitlines()))]
    return [".SH SYNOPSIS", f"\\fB{roff_word(parser.prog)}\\fR [\\fIOPTION\\fR]..."]


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
    lines = _title("vdsm-agent", "8", "System Administration")
    lines += _name_line("vdsm-agent", "host-local storage agent (JSON-RPC 2.0 over HTTP)")
    lines += [".SH SYNOPSIS",
              "\\fBvdsm\\-agent\\fR [\\fB\\-\\-config\\fR \\fIFILE\\fR] [\\fIOPTION\\fR]..."]
    lines += [".SH DESCRIPTION", roff_text(parser.description or ""), ".PP",
              "The agent keeps storage connections (NFS, iSCSI, GlusterFS, sshfs, local "
              "directories, loop devices) connected and runs long operations on local "
              "devices and images as tasks. It answers \\fBPOST /jsonrpc\\fR and "
              "\\fBGET /health\\fR on a loopback TCP address and on a Unix socket; "
              "\\fBvdsm\\-agent\\-client\\fR(1) is its command-line client.",
              ".PP",
              "Installed from a package, it runs as the systemd service "
              "\\fBvdsm\\-agent.service\\fR with "
              f"\\fB\\-\\-config {roff_word(CONFIG_FILE)}\\fR.",
              ".SH CONFIGURATION",
              "Every setting of the configuration file is also a flag below; a flag wins "
              "over the file, which wins over the built-in default. "
              "\\fBvdsm\\-agent.conf\\fR(5) describes the file."]
    lines += render_options(parser)
    lines += [
        ".SH SIGNALS",
        ".TP", "\\fBSIGTERM\\fR, \\fBSIGINT\\fR",
        "Stop serving and exit. Running tasks are separate processes in their own "
        "sessions and keep running; the next agent re-attaches to them. The systemd "
        "unit uses \\fBKillMode=process\\fR so that a restart or an upgrade of the "
        "service does not kill them either.",
    ]
    lines += _files_section()
    lines += _see_also([("vdsm-agent-client", 1), ("vdsm-agent.conf", 5),
                        ("systemctl", 1)])
    return "\n".join(lines) + "\n"


def page_client() -> str:
    import rpc_schema
    from vdsm_agent.client import main as client

    parser = client.build_parser(rpc_schema.load("agent"))
    lines = _title("vdsm-agent-client", "1", "User Commands")
    lines += _name_line("vdsm-agent-client", "call a verb of the vdsm-agent JSON-RPC API")
    lines += _synopsis(parser)
    description = parser.description or ""
    intro, _, verbs = description.partition("\n\n")
    lines += [".SH DESCRIPTION", roff_text(intro)]
    if verbs:
        lines += [".SH VERBS", *roff_preformatted(verbs)]
    lines += render_options(parser)
    params_help = getattr(client, "PARAMS_HELP", "")
    exit_help = getattr(client, "EXIT_CODES_HELP", "")
    if params_help:
        lines += [".SH PARAMETERS AND TARGET", *roff_preformatted(params_help)]
    if exit_help:
        lines += [".SH EXIT STATUS", *roff_preformatted(exit_help)]
    if not params_help and not exit_help and parser.epilog:
        lines += [".SH NOTES", *roff_preformatted(parser.epilog)]
    socket_env = getattr(client, "SOCKET_ENV", "")
    if socket_env:
        lines += [".SH ENVIRONMENT", ".TP", f"\\fB{roff_word(socket_env)}\\fR",
                  "The agent's Unix socket, when neither \\fB\\-\\-url\\fR nor "
                  "\\fB\\-\\-unix\\-socket\\fR is given (e.g. "
                  "\\fI/run/vdsm\\-agent/agent.sock\\fR)."]
    lines += [".SH EXAMPLES", *roff_preformatted(
        "vdsm-agent-client --unix-socket /run/vdsm-agent/agent.sock ping\n"
        "vdsm-agent-client --unix-socket /run/vdsm-agent/agent.sock getDeviceList --table\n"
        "vdsm-agent-client help startTask\n")]
    lines += _see_also([("vdsm-agent", 8), ("curl", 1)])
    return "\n".join(lines) + "\n"


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
    manual = "System Administration" if section == "8" else "User Commands"
    module_name = target.split(":")[0]
    parser = None
    subcommands: list[argparse.ArgumentParser] = []
    try:
        build = getattr(importlib.import_module(module_name), "build_parser", None)
        if callable(build):
            parser = build()
            if isinstance(parser, tuple):  # (top parser, *sub-command parsers)
                parser, *subcommands = parser
    except Exception:  # a stub is better than no page; the stub says where to look
        parser = None
    lines = _title(name, section, manual)
    if isinstance(parser, argparse.ArgumentParser):
        lines += _name_line(name, _first_sentence(parser.description or name))
        lines += _synopsis(parser)
        lines += [".SH DESCRIPTION", roff_text(parser.description or "")]
        lines += render_options(parser)
        for sub in subcommands:
            lines += [f".SH COMMAND {roff_text(sub.prog.split()[-1].upper())}",
                      roff_text(sub.description or ""),
                      *render_options(sub)[1:]]
    else:
        lines += _name_line(name, "part of vdsm-agent")
        lines += [".SH SYNOPSIS", f"\\fB{roff_word(name)}\\fR [\\fIOPTION\\fR]...",
                  ".SH DESCRIPTION",
                  f"Run \\fB{roff_word(name)} \\-\\-help\\fR for its options. This page is "
                  "a stub: the command has no argument parser the page generator can read "
                  "yet."]
    lines += _see_also([("vdsm-agent", 8)])
    return "\n".join(lines) + "\n"


KNOWN_PAGES: dict[str, tuple[str, Callable[[], str]]] = {
    "vdsm-agent": ("8", page_agent),
    "vdsm-agent-client": ("1", page_client),
}


def manpages(scripts: dict[str, str]) -> dict[str, str]:
    """File name -> page text, one per console script plus the config file's."""
    pages = {"vdsm-agent.conf.5": page_config()}
    for name, target in scripts.items():
        if name in KNOWN_PAGES:
            section, render = KNOWN_PAGES[name]
            pages[f"{name}.{section}"] = render()
        else:
            section = "8" if name in DAEMONS else "1"
            pages[f"{name}.{section}"] = page_generic(name, target)
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


# -- command line --------------------------------------------------------------------

KINDS = ("config", "manpages", "wrappers")


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    print(f"generate: wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="*", metavar="config|manpages|wrappers",
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
