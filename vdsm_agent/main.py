"""``vdsm-agent``: the daemon's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vdsm_agent import __version__, errors, logs, settings
from vdsm_agent.server import listeners
from vdsm_agent.server.app import make_app
from vdsm_agent.server.runner import run_daemon, serve_until_signalled
from vdsm_agent.store import migrations
from vdsm_agent.system import statelock

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
    await serve_until_signalled(runner, log, "vdsm-agent", urls,
                                _how_to_reach(urls, config.allowed_roots))


def _how_to_reach(urls: list[str], roots: Sequence[str] = ()) -> str:
    ping = "'{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1}'"
    lines = [f"Image files for tasks: beneath {', '.join(roots)} (allowed_roots)" if roots
             else "No allowed root: tasks may use block devices only (add --allowed-root DIR)",
             "vdsm-agent is ready. Try:"]
    for url in urls:
        if url.startswith("unix:"):
            lines.append(f"  curl --unix-socket {url[5:]} -d {ping} http://localhost/jsonrpc")
        elif url.startswith("https:"):
            lines.append(f"  curl --cacert CA --cert CERT --key KEY -d {ping} {url}")
        else:
            lines.append(f"  curl -d {ping} {url}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = settings.resolve(args.config, args)
        listeners.check_config(config)  # plain HTTP on loopback only; TLS files usable
    except (settings.SettingsError, listeners.ListenError) as exc:
        print(f"vdsm-agent: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    # One agent per state directory, locked before anything touches the state
    # (the store, the tasks, the Unix socket) and held until the process ends.
    try:
        lock = statelock.acquire(config.state_path)
    except statelock.StateDirBusy as exc:
        print(f"vdsm-agent: {exc}", file=sys.stderr)
        return 2
    except statelock.StateLockError as exc:
        print(f"vdsm-agent: {exc}", file=sys.stderr)
        return 1
    try:
        return run_daemon("vdsm-agent", serve(config))
    except errors.StorageFull as exc:  # not even room to open the store
        print(f"vdsm-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    except migrations.SchemaTooNew as exc:  # a downgrade: the store is left as it is
        print(f"vdsm-agent: cannot start: the store {config.state_path / 'agent.db'}: {exc}",
              file=sys.stderr)
        return 2
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
