"""An MCP server on the SDK's low-level API for the discovery tests: many tools in pages, one that changes.

- `--tools N` tools `tool_000`.. with an input schema each, `--page-size` per page
  behind opaque cursors, so discovery must follow `nextCursor`;
- `mutable`, whose description the tool `mutate` changes (its definition changes
  upstream, as a server silently changing what a tool does would); `mutate`
  answers with the new description and announces `notifications/tools/list_changed`;
- `broken` lists: `--fail-lists` makes every list request an error, for failure tests
  (the server still answers `initialize`).

Run: `python tests/registry/paged_server.py --port 8093 --tools 120 --page-size 25` (path /mcp).
"""

from __future__ import annotations

import argparse
import base64

import mcp.types as types
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError


def build(tools: int, page_size: int, *, fail_lists: bool = False) -> Server:
    state = {"mutable": "Does one thing.", "mutations": 0}

    def catalog() -> list[types.Tool]:
        listed = [
            types.Tool(name=f"tool_{i:03d}", description=f"Tool number {i}.",
                       input_schema={"type": "object", "properties": {"n": {"type": "integer", "minimum": i}},
                                     "required": ["n"]})
            for i in range(tools)
        ]
        listed.append(types.Tool(name="mutable", description=state["mutable"], input_schema={"type": "object"},
                                 annotations=types.ToolAnnotations(read_only_hint=True)))
        listed.append(types.Tool(name="mutate", description="Change what `mutable` says it does.",
                                 input_schema={"type": "object", "properties": {"to": {"type": "string"}}}))
        return listed

    async def list_tools(ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        if fail_lists:
            raise MCPError(code=-32603, message="the catalogue is being rebuilt")
        start = int(base64.urlsafe_b64decode(params.cursor).decode()) if params and params.cursor else 0
        every = catalog()
        end = start + page_size
        cursor = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(every) else None
        return types.ListToolsResult(tools=every[start:end], next_cursor=cursor)

    async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name == "mutate":
            state["mutations"] += 1
            state["mutable"] = (params.arguments or {}).get("to") or f"Now does something else ({state['mutations']})."
            try:
                await ctx.session.send_tool_list_changed()
            except Exception:  # noqa: BLE001 - a 2026-07-28 request has no session to notify on
                pass
            return types.CallToolResult(content=[types.TextContent(type="text", text=state["mutable"])])
        if params.name == "mutable":
            return types.CallToolResult(content=[types.TextContent(type="text", text="did it")])
        return types.CallToolResult(content=[types.TextContent(type="text", text=params.name)])

    return Server("paged", on_list_tools=list_tools, on_call_tool=call_tool)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tools", type=int, default=120)
    parser.add_argument("--page-size", type=int, default=25)
    parser.add_argument("--fail-lists", action="store_true")
    args = parser.parse_args()
    app = build(args.tools, args.page_size, fail_lists=args.fail_lists).streamable_http_app(host="127.0.0.1")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
