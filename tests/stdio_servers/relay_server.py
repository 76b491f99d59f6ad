"""The demo server (`gateway.demo.upstream.build_server`) with a few tools more, for tests/test_relay_channels.py.

Served over stdio (the default), the 2024-11-05 HTTP+SSE transport or WebSocket:

  python relay_server.py
  python relay_server.py --transport sse --port N         GET /sse, POST /messages/
  python relay_server.py --transport websocket --port N   /ws, framed as channel_servers/ws_server.py does

The tools added ask the client in the middle of a call, or log, at a moment
the test chooses, so a test can have another call in flight when they do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import warnings
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer

from gateway.demo.upstream import Name, build_server


def build_relay_server() -> MCPServer:
    server = build_server()

    @server.tool(description="After `seconds`, ask the client for a name (elicitation); say what came back.")
    async def ask_after(seconds: float, ctx: Context) -> str:
        await asyncio.sleep(seconds)
        try:
            answer = await ctx.elicit("Who is asking?", Name)
        except Exception as exc:  # the gateway refused to relay it: the test reads why
            return f"refused: {exc}"
        return f"answered: {answer.data.name}" if answer.action == "accept" else f"answered: {answer.action}"

    @server.tool(description="Answer after `seconds`.")
    async def hold(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "held"

    @server.tool(description="After `seconds`, send `text` as an info log message, then answer.")
    async def log_then_answer(text: str, ctx: Context, seconds: float = 0.0) -> str:
        await asyncio.sleep(seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # logging is deprecated in 2026-07-28; stdio speaks 2025-11-25
            await ctx.info(text)
        return "logged"

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("stdio", "sse", "websocket"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    server = build_relay_server()
    if args.transport == "stdio":
        server.run("stdio")
    elif args.transport == "sse":
        import uvicorn

        uvicorn.run(server.sse_app(host=args.host), host=args.host, port=args.port, log_level="warning")
    else:
        from aiohttp import web

        sys.path.insert(0, str(Path(__file__).parent.parent / "channel_servers"))
        from ws_server import handle_socket

        app = web.Application()
        app["mcp"] = server
        app.router.add_get("/ws", handle_socket)
        web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
