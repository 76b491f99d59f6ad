"""A small MCP server on the official SDK: the upstream of `gateway demo` and the tests.

It speaks Streamable HTTP in both eras (the SDK serves 2025-era sessions and
2026-07-28 stateless requests on one endpoint) and offers a few tools, a
resource, a resource template and a prompt, so a new user has something to call.

Run alone: `python -m gateway.demo.upstream --port 8090` (path /mcp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime, timezone

from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve, Sample
from mcp.types import CreateMessageResult, SamplingMessage, TextContent
from pydantic import BaseModel


class Name(BaseModel):
    name: str


def ask_for_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)


def ask_the_model(topic: str) -> Sample:
    question = SamplingMessage(role="user", content=TextContent(type="text", text=f"One sentence about {topic}, please."))
    return Sample([question], max_tokens=100)


def build_server(*, extras: bool = False) -> MCPServer:
    """The demo server; `extras` adds tools for tests: `toggle_tool` (the tool list changes),
    `sleep` and `cancelled` (whether calls were cancelled), and the resource `config://settings`."""
    server = MCPServer("gateway-demo", instructions="Demo tools behind the MCP gateway.")

    @server.tool(description="Return the text unchanged.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two numbers.")
    def add(a: float, b: float) -> float:
        return a + b

    @server.tool(description="Count the words in a text.")
    def word_count(text: str) -> int:
        return len(text.split())

    @server.tool(description="The current UTC time, ISO 8601.")
    def utc_now() -> str:
        return datetime.now(timezone.utc).isoformat(timespec="seconds")

    @server.tool(description="Count to n, reporting progress at each step, `delay` seconds apart.")
    async def count(n: int, ctx: Context, delay: float = 0.0) -> str:
        for i in range(1, n + 1):
            if delay:
                await asyncio.sleep(delay)
            await ctx.report_progress(i, n, f"step {i} of {n}")
        return f"counted to {n}"

    # Questions for the client. The SDK asks them in the client's era: a request
    # in the middle of the call (2025), or an input_required result (2026-07-28).
    @server.tool(description="Greet the user by the name they give when asked (elicitation).")
    async def greet_me(person: Annotated[Name, Resolve(ask_for_name)]) -> str:
        return f"Hello, {person.name}!"

    @server.tool(description="Ask the client's model for one sentence on a topic (sampling).")
    async def ask_model(topic: str, answer: Annotated[CreateMessageResult, Resolve(ask_the_model)]) -> str:
        text = answer.content.text if isinstance(answer.content, TextContent) else "(no text)"
        return f"The model says: {text}"

    @server.resource("demo://readme", description="What this server is.", mime_type="text/plain")
    def readme() -> str:
        return "A demo MCP server registered behind the gateway."

    @server.resource("demo://notes/{topic}", description="A short note on a topic.", mime_type="text/plain")
    def note(topic: str) -> str:
        return f"A note on {topic}."

    @server.prompt(description="Ask for a greeting.")
    def greet(name: str) -> str:
        return f"Please write a short, warm greeting for {name}."

    if extras:
        present = {"extra": False}
        sleeps = {"cancelled": 0}

        @server.tool(description="Sleep for `seconds` (a call to cancel).")
        async def sleep(seconds: float) -> str:
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                sleeps["cancelled"] += 1
                raise
            return f"slept {seconds:g}s"

        @server.tool(description="How many `sleep` calls were cancelled.")
        def cancelled() -> int:
            return sleeps["cancelled"]

        @server.tool(description="Add the tool `extra`, or remove it if present (tools/list changes).")
        async def toggle_tool(ctx: Context) -> str:
            if present["extra"]:
                server.remove_tool("extra")
            else:
                server.add_tool(lambda: "extra", name="extra", description="Comes and goes.")
            present["extra"] = not present["extra"]
            await ctx.notify_tools_changed()
            return "extra is " + ("present" if present["extra"] else "gone")

        @server.resource("config://settings", description="The server's settings (ADMIN only through the gateway).",
                         mime_type="application/json")
        def settings() -> str:
            return json.dumps({"mode": "demo", "secret_level": 3})

    return server


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--json-response", action="store_true", help="answer with JSON instead of SSE")
    parser.add_argument(
        "--legacy-only", action="store_true", help="behave like a 2025-11-25 server: refuse 2026-07-28 requests"
    )
    parser.add_argument(
        "--modern-only", action="store_true", help="take 2026-07-28 requests only: refuse the 2025-era handshake"
    )
    parser.add_argument(
        "--transport", choices=("streamable-http", "sse"), default="streamable-http",
        help="sse: the 2024-11-05 HTTP+SSE transport instead (GET /sse, POST /messages/)",
    )
    parser.add_argument(
        "--extras", action="store_true",
        help="add tools for tests: toggle_tool (the tool list changes), sleep, cancelled; and the resource "
        "config://settings",
    )
    parser.add_argument(
        "--require-header", action="append", default=[], metavar="'NAME: VALUE'",
        help="refuse (401) a request unless it carries this header with this value, and no other value under "
        "the same name (repeatable: any one of them will do)",
    )
    parser.add_argument(
        "--accept-tokens-from", metavar="FILE",
        help="refuse (401) a request unless 'Authorization: Bearer <token>' names a line of FILE (read per request)",
    )
    args = parser.parse_args(argv)
    if args.transport == "sse":
        app = build_server(extras=args.extras).sse_app(host=args.host)
    else:
        app = build_server(extras=args.extras).streamable_http_app(json_response=args.json_response, host=args.host)
    if args.legacy_only:
        app = _OneEra(app, modern=False)
    elif args.modern_only:
        app = _OneEra(app, modern=True)
    if args.require_header or args.accept_tokens_from:
        # An upstream that wants the gateway's own credential (tests of upstream credentials).
        required = [(n.strip().lower().encode("latin-1"), v.strip().encode("latin-1"))
                    for n, _, v in (h.partition(":") for h in args.require_header)]
        tokens_file = args.accept_tokens_from
        inner = app

        def admitted(headers: list[tuple[bytes, bytes]]) -> bool:
            for name, value in required:
                sent = [v for n, v in headers if n == name]
                if sent and all(v == value for v in sent):
                    return True
            if tokens_file:
                with open(tokens_file, "rb") as fh:
                    valid = {b"Bearer " + line.strip() for line in fh if line.strip()}
                sent = [v for n, v in headers if n == b"authorization"]
                return len(sent) == 1 and sent[0] in valid
            return False

        async def app(scope, receive, send) -> None:
            if scope["type"] in ("http", "websocket") and not admitted(scope["headers"]):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b'{"error": "invalid_token"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await inner(scope, receive, send)

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on")


class _OneEra:
    """ASGI wrapper making the server speak one era only, refusing the other with 400 as such servers do.

    `modern=False`: a 2025-11-25 server (a 2026-07-28 request is refused).
    `modern=True`: a server that dropped the handshake (anything not 2026-07-28 is refused).
    """

    def __init__(self, app, *, modern: bool) -> None:
        self.app = app
        self.modern = modern

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            version = dict(scope["headers"]).get(b"mcp-protocol-version", b"")
            if (version == b"2026-07-28") != self.modern:
                shown = version.decode("latin-1") or "none given"
                error = {"code": -32600, "message": f"Bad Request: Unsupported protocol version: {shown}"}
                body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


if __name__ == "__main__":
    main()
