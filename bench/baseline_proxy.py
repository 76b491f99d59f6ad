"""The baseline for bench/proxy.py: a plain aiohttp pass-through proxy.

    python bench/baseline_proxy.py --port 9200 --upstream http://127.0.0.1:9100/mcp [--connections 64]

One aiohttp web handler answers every POST by sending its body to the
upstream with one shared `aiohttp.ClientSession` (keep-alive pool, connector
limit sized for the benchmark's concurrency) and returning the upstream's
status, Content-Type and body. It runs on uvloop without an access log, like
the gateway.

It is the bar the gateway is measured against, so it is what a competent
engineer would write in ten minutes with aiohttp: no authentication, no
limits, no logging, and no handicap either. It does not stream (the stub
answers small JSON bodies) and forwards only the two content headers.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
import uvloop
from aiohttp import web


SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str, connections: int) -> web.Application:
    app = web.Application()

    async def open_session(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, keepalive_timeout=60)
        # No cookie jar: a proxy's one session must not carry one client's cookies to the next.
        app[SESSION] = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def close_session(app: web.Application) -> None:
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {
            "Content-Type": request.headers.get("Content-Type", "application/json"),
            "Accept": request.headers.get("Accept", "application/json, text/event-stream"),
        }
        async with request.app[SESSION].post(upstream, data=body, headers=headers) as upstream_response:
            content = await upstream_response.read()
            content_type = upstream_response.headers.get("Content-Type")
            return web.Response(
                body=content,
                status=upstream_response.status,
                headers={"Content-Type": content_type} if content_type else None,
            )

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_post("/{path:.*}", forward)
    return app


async def serve(host: str, port: int, upstream: str, connections: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    runner = web.AppRunner(build_app(upstream, connections), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    print(f"baseline_proxy on http://{host}:{port}/ -> {upstream}", file=sys.stderr, flush=True)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A plain aiohttp pass-through proxy (the benchmark's baseline).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="URL every request is forwarded to")
    parser.add_argument("--connections", type=int, default=100, help="connector limit (size it for the load)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.upstream, args.connections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
