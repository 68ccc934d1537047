"""What makes one command-line client different from another.

``vdsm-agent-client`` and ``vdsm-engine call`` are the same client
(``vdsm_agent.client.command``) given a different ``Program``: its name, its
schema, where it connects by default and from which environment variables,
the word for what answers ("agent", "engine"), the default table columns of
its verbs and the verbs ``--watch`` can follow. Everything else (parsing,
help, tables, errors, exit codes, completion) is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from vdsm_agent.client.transport import Defaults

if TYPE_CHECKING:
    from vdsm_agent.client.calling import Caller
    from vdsm_agent.client.watch import Follower

# Makes a follower for a verb called with --watch: (caller, the verb's params).
WatchFactory = Callable[["Caller", dict[str, Any]], "Follower"]


@dataclasses.dataclass(frozen=True)
class NestedSchema:
    """Where the schema of an open object param comes from: startTask's ``params``
    is the ``paramsSchema`` of the kind named by ``kind`` in getTaskKinds' list."""

    param: str  # the open object param (params)
    key: str  # the param that names the schema (kind)
    verb: str  # the verb that lists the schemas (getTaskKinds)
    member: str  # its result's list (kinds)
    name_field: str  # an item's name (name)
    schema_field: str  # an item's schema (paramsSchema)


@dataclasses.dataclass(frozen=True)
class Program:
    prog: str  # as typed: "vdsm-agent-client", "vdsm-engine call"
    schema_name: str  # rpc_schema.load(schema_name)
    server: str  # what answers, in messages: "agent", "engine"
    summary: str  # the first line of --help
    version: str
    defaults: Defaults
    # Per verb: the table's columns when --columns is not given (fit 80 columns).
    columns: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Verbs --watch can follow.
    watchers: Mapping[str, WatchFactory] = dataclasses.field(default_factory=dict)
    # Open object params whose schema the server lists.
    nested: Mapping[str, NestedSchema] = dataclasses.field(default_factory=dict)
    # Said after a Forbidden answer to an anonymous TCP caller.
    anonymous_hint: str = ""
    # Example command lines (after the program name), for the man page.
    examples: tuple[str, ...] = ()

    @property
    def has_unix_socket(self) -> bool:
        return self.defaults.socket_env is not None

    @property
    def name(self) -> str:
        """The command's file name (vdsm-engine for 'vdsm-engine call')."""
        return self.prog.split()[0]
