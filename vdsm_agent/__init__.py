"""vdsm-agent: a host-local storage agent speaking JSON-RPC 2.0 over HTTP."""

__version__ = "0.1.0"

# The version of the JSON-RPC API (rpc_schema/agent.json "info.version").
API_VERSION = "1.0"
