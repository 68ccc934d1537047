"""``vdsm-agent``: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from vdsm_agent import __version__, logs, settings
from vdsm_agent.server import listeners
from vdsm_agent.server.app import make_app

log = logging.getLogger("vdsm_agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdsm-agent",
        description="Host-local storage agent (JSON-RPC 2.0 over HTTP). Every setting "
                    "of the config file can also be given as a flag; flags win.")
    parser.add_argument("--version", action="version", version=f"vdsm-agent {__version__}")
    parser.add_argument("--config", metavar="FILE", help="INI config file (section [agent])")
    settings.add_flags(parser)
    return parser


async def serve(config: settings.Config) -> None:
    app = make_app(config)
    runner, urls = await listeners.start(app, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("vdsm-agent %s serving on %s", __version__, ", ".join(urls))
    _print_how_to_reach(urls)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()


def _print_how_to_reach(urls: list[str]) -> None:
    ping = "'{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1}'"
    lines = ["vdsm-agent is ready. Try:"]
    for url in urls:
        if url.startswith("unix:"):
            lines.append(f"  curl --unix-socket {url[5:]} -d {ping} http://localhost/jsonrpc")
        else:
            lines.append(f"  curl -d {ping} {url}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = settings.resolve(args.config, args)
        listeners.check_listen_address(config)
    except (settings.SettingsError, listeners.ListenError) as exc:
        print(f"vdsm-agent: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    try:
        asyncio.run(serve(config))
    except listeners.ListenError as exc:
        print(f"vdsm-agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
