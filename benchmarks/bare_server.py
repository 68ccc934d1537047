"""The baseline: a bare aiohttp JSON handler, no JSON-RPC machinery at all.

``await request.json()`` then ``web.json_response(...)`` with the access log
off: the cheapest honest JSON-over-HTTP endpoint aiohttp offers. Its answer has
the same shape as the agent's ``ping`` answer so both send about as many bytes.

Run: ``python -m benchmarks.bare_server --port 18080`` (path ``/jsonrpc``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from aiohttp import web

from vdsm_agent import __version__

STARTED = time.monotonic()


async def handle(request: web.Request) -> web.Response:
    payload = await request.json()
    return web.json_response({
        "jsonrpc": "2.0",
        "result": {"version": __version__, "uptime": round(time.monotonic() - STARTED, 3)},
        "id": payload.get("id"),
    })


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/jsonrpc", handle)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
