"""A naive aiohttp reverse proxy (no recording, no header rules): the floor for any aiohttp-based design.

Used by bench/proxy_bench.py as a reference target:  python bench/naive_proxy.py LISTEN_PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "te", "upgrade", "proxy-connection"}


async def session_ctx(app: web.Application) -> object:
    app["session"] = aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
        connector=aiohttp.TCPConnector(limit=0),
    )
    yield
    await app["session"].close()


async def handle(request: web.Request) -> web.StreamResponse:
    upstream = sys.argv[2]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with request.app["session"].request(
        request.method, upstream + request.rel_url.raw_path_qs, headers=headers, data=await request.read()
    ) as up:
        resp = web.StreamResponse(
            status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in HOP}
        )
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def main() -> None:
    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        handler_cancellation=True,
        loop=loop_factory() if loop_factory else None,
    )


if __name__ == "__main__":
    main()
