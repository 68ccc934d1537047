"""vdsm-agent-client: call one verb of the agent and print its answer.

    vdsm-agent-client [--url URL | --unix-socket PATH] [options] VERB [name=value ...]

The client itself is ``vdsm_agent.client.command``; this module gives it the
agent's ``Program``: the agent schema, the Unix socket first (a loopback TCP
caller is anonymous), the default table columns of the agent's verbs and the
task verbs ``--watch`` follows. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rpc_schema import ApiSchema
from vdsm_agent import API_VERSION, __version__
from vdsm_agent.client import command, usage
from vdsm_agent.client.program import NestedSchema, Program
from vdsm_agent.client.transport import DEFAULT_URL, INSTALLED_SOCKET, SOCKET_ENV, Defaults
from vdsm_agent.client.watch import agent_watchers

PROG = "vdsm-agent-client"

AGENT = Program(
    prog=PROG,
    schema_name="agent",
    server="agent",
    summary="Call a verb of the vdsm-agent JSON-RPC API and print its result as JSON (or "
            "a table); follow a task with --watch.",
    version=f"{PROG} {__version__} (API {API_VERSION})",
    defaults=Defaults(url=DEFAULT_URL, socket_env=SOCKET_ENV,
                      installed_socket=INSTALLED_SOCKET),
    # Chosen to fit 80 columns with typical values (docs/cli.md, "Table view").
    columns={
        "getDeviceList": ("name", "type", "size", "fstype", "inUse", "mountpoints"),
        "listTasks": ("id", "kind", "state", "progress.percent", "progress.eta"),
        "getStorageConnectionList": ("key", "uri", "state", "connected", "latencyMs"),
        "getTaskKinds": ("name", "destructive", "description"),
        "getEvents": ("seq", "at", "type", "taskID", "state"),
    },
    watchers=agent_watchers(),
    nested={"startTask": NestedSchema(param="params", key="kind", verb="getTaskKinds",
                                      member="kinds", name_field="name",
                                      schema_field="paramsSchema")},
    anonymous_hint=(f"a loopback TCP caller is anonymous (it may only ping); call through "
                    f"the agent's Unix socket: --unix-socket {INSTALLED_SOCKET} (as root or a "
                    f"member of its group), or set ${SOCKET_ENV}"),
    examples=(
        f"--unix-socket {INSTALLED_SOCKET} ping",
        "getDeviceList --table",
        "listTasks state=running --table",
        "startTask kind=checksum params.path=/var/lib/vdsm-agent/images/disk1.img --watch",
        "help startTask",
    ),
)

EXIT_OK = command.EXIT_OK
EXIT_APPLICATION_ERROR = command.EXIT_APPLICATION_ERROR
EXIT_USAGE = command.EXIT_USAGE
EXIT_PROTOCOL_ERROR = command.EXIT_PROTOCOL_ERROR
EXIT_UNREACHABLE = command.EXIT_UNREACHABLE


def build_parser(schema: ApiSchema) -> argparse.ArgumentParser:
    """The agent client's argument parser (for the man page and the tests)."""
    return usage.build_parser(AGENT, schema)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: returns the exit code (see docs/cli.md)."""
    return command.main(AGENT, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
