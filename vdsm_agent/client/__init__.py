"""vdsm-agent-client: call the agent's JSON-RPC verbs from a shell.

Everything about a verb (its name, summary, params and their types) comes from
``rpc_schema``; nothing here knows a verb by name. The modules:

* ``main``: the command line (entry point ``main(argv) -> int``) and exit codes;
* ``params``: ``name=value`` words -> params, by the verb's JSON Schema;
* ``schema``: reading types out of JSON Schema nodes (``$ref``, unions, enums);
* ``transport``: one POST over TCP (HTTP/HTTPS) or a Unix socket, stdlib only;
* ``output``: JSON, tables, and error lines.

Only the standard library and ``rpc_schema`` are imported, so that a call
starts in about a tenth of a second.
"""
