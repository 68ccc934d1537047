"""Command line of the hollow agents.

``python -m benchmarks.hollow [serve] --hosts 5000 --base-port 20000 --hosts-file hosts.json``
serves the hosts until SIGTERM/SIGINT and prints one JSON line when ready
(``{"ready": true, "control": URL, ...}``); ``--print-urls`` prints each
host's ``name url`` before it.

``python -m benchmarks.hollow ctl --hosts-file hosts.json freeze 3 7 10-19``
(or ``--control URL``) sends a control command: ``status``, ``hosts``,
``freeze``/``thaw``/``kill``/``start``/``restart`` HOSTS (indexes, names,
``A-B`` ranges, ``all``; ``restart reset=true downtime=5``), ``rates
task=1 progress=0.5 connection=0.1``, ``tick kind=task HOSTS``,
``resetCounters``.

``python -m benchmarks.hollow register --engine http://127.0.0.1:54322/jsonrpc
--hosts-file hosts.json`` adds every host to an engine.

``python -m benchmarks.hollow bench ...`` runs the measurement of
docs/benchmarks.md ("Hollow agents"; ``benchmarks.hollow.bench``);
``python -m benchmarks.hollow engines ...`` what leases cost whole engines on
PostgreSQL (``benchmarks.hollow.engines``; docs/benchmarks.md, "Failover").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import orjson

from benchmarks.hollow import bench, control, engines
from benchmarks.hollow.server import (
    FleetOptions,
    HollowFleet,
    descriptors_needed,
    raise_open_files,
    serve,
    write_hosts_file,
)
from benchmarks.hollow.state import HostOptions


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hollow [serve]",
        description="Serve N simulated agents (hollow hosts) from one process.")
    add = parser.add_argument
    add("--hosts", type=int, required=True, help="how many hosts")
    add("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--base-port", type=int, default=0,
        help="host i listens on BASE+i (0: ports chosen by the kernel); with "
             "--path-per-host, the one port")
    add("--path-per-host", action="store_true",
        help="one port, a URL path per host (http://HOST:PORT/h/INDEX/jsonrpc)")
    add("--control-port", type=int, default=0, help="port of the control API (0: any)")
    add("--hosts-file", help="write {control, hosts: [{name, url}]} here (JSON)")
    add("--print-urls", action="store_true", help="print 'name url' per host")
    add("--prefix", default="hollow", help="host name prefix (default hollow)")
    add("--tasks", type=int, default=10, help="finished tasks per host at start (default 10)")
    add("--connections", type=int, default=1,
        help="managed storage connections per host at start (default 1)")
    add("--task-rate", type=float, default=0.0,
        help="task transitions per host per minute (default 0)")
    add("--progress-rate", type=float, default=0.0,
        help="progress events per host per minute (default 0)")
    add("--connection-rate", type=float, default=0.0,
        help="connection state flips per host per minute (default 0)")
    add("--events-max", type=int, default=HostOptions.events_max,
        help=f"events kept per host (default {HostOptions.events_max})")
    add("--events-max-wait", type=float, default=HostOptions.events_max_wait,
        help="largest getEvents timeout (default 60)")
    add("--events-progress-interval", type=float,
        default=HostOptions.events_progress_interval,
        help="at most one progress event per task per this many seconds (default 1)")
    add("--probe-interval", type=float, default=HostOptions.probe_interval,
        help="lastCheck of connections moves this often (default 10; 0: never)")
    add("--task-seconds", type=float, default=HostOptions.task_seconds,
        help="run time of a started task of a kind other than test.sleep (default 5)")
    add("--retention", type=int, default=HostOptions.retention,
        help="finished tasks kept per host (default 100)")
    add("--seed", type=int, default=0, help="random seed (phases, IDs of nothing else)")
    add("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return parser


def options_from(args: argparse.Namespace) -> FleetOptions:
    if args.hosts < 1:
        raise SystemExit("--hosts must be at least 1")
    return FleetOptions(
        hosts=args.hosts, listen=args.listen, base_port=args.base_port,
        path_per_host=args.path_per_host, control_port=args.control_port, tasks=args.tasks,
        connections=args.connections,
        rates={"task": args.task_rate, "progress": args.progress_rate,
               "connection": args.connection_rate},
        host=HostOptions(events_max=args.events_max, events_max_wait=args.events_max_wait,
                         events_progress_interval=args.events_progress_interval,
                         probe_interval=args.probe_interval, task_seconds=args.task_seconds,
                         retention=args.retention),
        seed=args.seed, prefix=args.prefix)


def main_serve(argv: Sequence[str]) -> int:
    args = serve_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from(args)
    limit = raise_open_files(descriptors_needed(options))
    if limit < descriptors_needed(options):
        print(f"hollow: warning: RLIMIT_NOFILE is {limit}, {descriptors_needed(options)} "
              "wanted; connections may fail", file=sys.stderr)

    def ready(fleet: HollowFleet) -> None:
        if args.hosts_file:
            write_hosts_file(args.hosts_file, fleet)
        if args.print_urls:
            for host in fleet.hosts:
                print(host.name, host.url)
        print(orjson.dumps({"ready": True, "control": fleet.control_url,
                            "hosts": len(fleet.hosts), "first": fleet.hosts[0].url,
                            "last": fleet.hosts[-1].url, "hostsFile": args.hosts_file,
                            "mode": "path" if options.path_per_host else "port"}).decode(),
              flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(options, ready, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"hollow: {exc}", file=sys.stderr)
        return 1
    return 0


def main_ctl(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hollow ctl",
                                     description="Send a command to a hollow process.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--control", help="the control URL (printed when ready)")
    where.add_argument("--hosts-file", help="the hosts file (has the control URL)")
    parser.add_argument("command", help="status, hosts, freeze, thaw, kill, start, restart, "
                                        "rates, tick, resetCounters")
    parser.add_argument("words", nargs="*", help="HOST selectors and name=value params")
    args = parser.parse_args(argv)
    url = args.control or control.read_hosts_file(args.hosts_file)["control"]
    try:
        result = control.call(url, args.command, **control.command_params(args.words))
    except control.ControlError as exc:
        print(f"hollow ctl: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


def main_register(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hollow register",
                                     description="addHost every hollow host to an engine.")
    parser.add_argument("--engine", default="http://127.0.0.1:54322/jsonrpc",
                        help="the engine's JSON-RPC URL")
    parser.add_argument("--hosts-file", required=True)
    parser.add_argument("--batch", type=int, default=100, help="addHost calls per batch")
    args = parser.parse_args(argv)
    hosts = control.read_hosts_file(args.hosts_file)["hosts"]
    try:
        added = control.register(args.engine, hosts, args.batch)
    except control.ControlError as exc:
        print(f"hollow register: {exc}", file=sys.stderr)
        return 1
    print(f"{added} hosts added ({len(hosts) - added} were known)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == "ctl":
        return main_ctl(words[1:])
    if words and words[0] == "register":
        return main_register(words[1:])
    if words and words[0] == "bench":
        return bench.main(words[1:])
    if words and words[0] == "engines":
        return engines.main(words[1:])
    if words and words[0] == "serve":
        words = words[1:]
    return main_serve(words)


if __name__ == "__main__":
    sys.exit(main())
