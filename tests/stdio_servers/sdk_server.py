"""An MCP server on the official SDK, served over stdio, for tests/test_stdio_upstream.py.

Flags make it misbehave the ways stdio servers do in the field:

  --ignore-term   ignore SIGTERM
  --linger        keep running after stdin has closed (the SDK alone would exit)
  --grandchild    start a process of its own first (it inherits the pipes and ignores SIGTERM)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from mcp.server.mcpserver import MCPServer

_STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"


def build_server(grandchild: int | None) -> MCPServer:
    server = MCPServer("stdio-test")

    @server.tool(description="Return the text unchanged.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two numbers.")
    def add(a: float, b: float) -> float:
        return a + b

    @server.tool(description="Answer after `seconds`.")
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @server.tool(description="Exit the whole process at once with `status`.")
    def crash(status: int = 3) -> str:
        os._exit(status)

    @server.tool(description="Write `lines` lines of `width` characters to stderr, then one of `tail` without a newline.")
    def flood(lines: int, width: int, tail: int = 0) -> int:
        line = b"e" * width + b"\n"
        for _ in range(lines):
            os.write(2, line)
        if tail:
            os.write(2, b"t" * tail)
        return lines

    @server.tool(description="This process's pid and its child's.")
    def pids() -> dict:
        return {"pid": os.getpid(), "grandchild": grandchild}

    @server.resource("test://readme", mime_type="text/plain")
    def readme() -> str:
        return "a test server"

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--linger", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", _STUBBORN]).pid if args.grandchild else None
    build_server(grandchild).run("stdio")
    while args.linger:
        time.sleep(60)


if __name__ == "__main__":
    main()
