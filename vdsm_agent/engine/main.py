"""``vdsm-engine``: the engine daemon and its command-line client.

    vdsm-engine serve [--config FILE] [--state-dir DIR] [--listen HOST:PORT]
                      [--database URL] [any setting as a flag]
    vdsm-engine call [--url URL] [options] VERB [name=value ...]

See docs/engine.md. ``serve`` runs until SIGTERM/SIGINT; ``call`` exits with
the client's codes (0 ok, 1 application error, 2 usage, 3 protocol error, 4
unreachable).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vdsm_agent import __version__, logs
from vdsm_agent.engine import settings
from vdsm_agent.settings import SettingsError

# The daemon's modules (aiohttp, the listeners, the runner) are imported by
# serve only: 'vdsm-engine call' is a short-lived client and starts without them.

log = logging.getLogger("vdsm_agent.engine")
PROG = "vdsm-engine"


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser,
                            argparse.ArgumentParser]:
    """The top-level parser and its ``serve`` and ``call`` sub-parsers."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The central engine of vdsm-agent hosts: a registry of hosts, "
                    "aggregated views of their tasks and storage connections, and fan-out "
                    "jobs; JSON-RPC 2.0 over HTTP. 'serve' runs the daemon, 'call' calls "
                    "one of its verbs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the engine daemon",
        description="Run the engine daemon. Every setting of the config file (section "
                    "[engine]) can also be given as a flag; flags win.")
    serve.add_argument("--config", metavar="FILE", help="INI config file (section [engine])")
    settings.ENGINE.add_flags(serve)
    call = commands.add_parser(
        "call", help="call a verb of a running engine (VERB --help for its params)",
        usage=f"{PROG} call [--url URL] [options] VERB [name=value ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
        allow_abbrev=False)
    return parser, serve, call


def check_listen_address(config: settings.EngineConfig) -> None:
    """The agent's listener checks, for the engine: plain HTTP on loopback only, the
    TLS files usable (a ListenError says which is wrong)."""
    from vdsm_agent.server import listeners

    listeners.check_config(config)


def how_to_reach(urls: list[str]) -> str:
    """What the daemon prints once ready: how to call it on each of its listeners."""
    call = "'{\"jsonrpc\":\"2.0\",\"method\":\"listHosts\",\"id\":1}'"
    lines = [f"{PROG} is ready. Try:"]
    for url in urls:
        if url.startswith("unix:"):
            lines.append(f"  curl --unix-socket {url[5:]} -d {call} http://localhost/jsonrpc")
        elif url.startswith("https:"):
            lines.append(f"  {PROG} call --url {url} --cacert CA --cert CERT --key KEY "
                         "listHosts")
        else:
            lines.append(f"  {PROG} call --url {url} listHosts")
    return "\n".join(lines)


async def serve(config: settings.EngineConfig) -> None:
    from vdsm_agent.engine.app import make_app
    from vdsm_agent.engine.leases import SecondEngine
    from vdsm_agent.server import listeners
    from vdsm_agent.server.runner import serve_until_signalled
    from vdsm_agent.store.migrations import SchemaTooNew

    app = make_app(config)
    try:
        runner, urls = await listeners.start(app, config)
    except SchemaTooNew as exc:  # a downgrade, or an older engine beside newer ones
        print(f"{PROG}: cannot start: the store {settings.redact_url(config.database_url)}: "
              f"{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except SecondEngine as exc:
        print(f"{PROG}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    await serve_until_signalled(runner, log, PROG, urls, how_to_reach(urls))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["call"]:  # the client: vdsm_agent.engine.cli
        from vdsm_agent.engine import cli

        return cli.main(args[1:])
    from vdsm_agent.server import listeners
    from vdsm_agent.server.runner import run_daemon

    parser, _serve, _call = build_parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if options.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    try:
        config = settings.EngineConfig.resolve(options.config, options)
        check_listen_address(config)
    except (SettingsError, listeners.ListenError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    # failure_log: any failure to start (e.g. the database cannot be opened) is 1.
    return run_daemon(PROG, serve(config), failure_log=log)


if __name__ == "__main__":
    sys.exit(main())
