"""HTTP transport: the aiohttp application, JSON-RPC dispatch, listeners."""
