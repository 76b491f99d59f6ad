"""A WebSocket MCP server on the official SDK, for tests/test_channel_upstreams.py.

The SDK (2.3) has no WebSocket server transport. This is one in the shape of
its stdio and SSE transports: each socket (subprotocol `mcp`) gets a pair of
anyio memory streams carrying `SessionMessage`s, and the SDK's low-level
server (`build_server()` of the demo upstream) runs over them with
`Server.run`. So the peer is a real SDK server; only the framing is ours:
one JSON-RPC message per text frame.

`python ws_server.py --port N [--path /ws] [--require-header 'NAME: VALUE']`
(with --require-header, an upgrade without that header and value is refused with 401).
"""

from __future__ import annotations

import argparse

import anyio
import mcp_types as types
from aiohttp import WSMsgType, web
from mcp.shared.message import SessionMessage

from gateway.demo.upstream import build_server

MAX_MESSAGE = 16 * 1024 * 1024


async def handle_socket(request: web.Request) -> web.WebSocketResponse:
    required = request.app.get("required")  # absent in apps that mount this handler themselves
    if required is not None and request.headers.getall(required[0], []) != [required[1]]:
        raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
    ws = web.WebSocketResponse(protocols=("mcp",), max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    server = request.app["mcp"]._lowlevel_server
    to_server, server_reads = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    server_writes, from_server = anyio.create_memory_object_stream[SessionMessage](0)

    async def socket_to_server() -> None:
        async with to_server:
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                try:
                    message = types.jsonrpc_message_adapter.validate_json(frame.data, by_name=False)
                except Exception as exc:  # the server answers a message it cannot read
                    await to_server.send(exc)
                    continue
                await to_server.send(SessionMessage(message))

    async def server_to_socket() -> None:
        async with from_server:
            async for session_message in from_server:
                await ws.send_str(session_message.message.model_dump_json(by_alias=True, exclude_unset=True))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(socket_to_server)
        tasks.start_soon(server_to_socket)
        # Returns once the socket has closed (the read stream ends).
        await server.run(server_reads, server_writes, server.create_initialization_options())
        tasks.cancel_scope.cancel()
    await ws.close()
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--require-header", metavar="'NAME: VALUE'")
    args = parser.parse_args()
    app = web.Application()
    app["mcp"] = build_server()
    name, _, value = (args.require_header or "").partition(":")
    app["required"] = (name.strip(), value.strip()) if args.require_header else None
    app.router.add_get(args.path, handle_socket)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
