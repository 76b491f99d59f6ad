"""A minimal MCP server over stdio on the standard library alone, for tests/test_stdio_upstream.py.

It starts in tens of milliseconds (the SDK takes about a second to import), so
the tests that start many servers use it, and it can misbehave on purpose in
ways the SDK will not: stray lines on stdout, requests to the client, a line
longer than the gateway accepts.

  --grandchild    start a process of its own first (it sleeps; it holds no pipe)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TOOLS = ["echo", "pids", "environ", "probe", "hang", "cancelled", "huge"]


def main() -> None:
    grandchild = None
    if "--grandchild" in sys.argv:
        grandchild = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ).pid
    out = sys.stdout.buffer
    lines = iter(sys.stdin.buffer)
    cancelled: list = []

    def send(message) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    def text(request_id, value: str) -> None:
        send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": value}]}})

    for line in lines:
        message = json.loads(line)
        method, request_id = message.get("method"), message.get("id")
        params = message.get("params") or {}
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": request_id, "result": {
                "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                "serverInfo": {"name": "tiny", "version": "0"}}})
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": request_id, "result": {}})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": request_id, "result": {
                "tools": [{"name": n, "inputSchema": {"type": "object"}} for n in TOOLS]}})
        elif method == "tools/call":
            name, arguments = params.get("name"), params.get("arguments") or {}
            if name == "echo":
                text(request_id, arguments["text"])
            elif name == "pids":
                text(request_id, json.dumps({"pid": os.getpid(), "grandchild": grandchild}))
            elif name == "environ":
                text(request_id, json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}))
            elif name == "probe":
                # Noise the client must skip, then two requests to it; report its answers.
                out.write(b"not json at all\n\xff\xfe invalid utf-8\n\n[1, 2]\n\"a string\"\n")
                out.write(b'{"jsonrpc": "2.0", "id": 987654, "result": {}}\n')
                out.write(b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"}}\n')
                send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}})
                send({"jsonrpc": "2.0", "id": "s1", "method": "ping"})
                send({"jsonrpc": "2.0", "id": "s2", "method": "sampling/createMessage", "params": {"messages": []}})
                answers = {}
                while len(answers) < 2:
                    reply = json.loads(next(lines))
                    answers[reply["id"]] = reply
                text(request_id, json.dumps(answers))
            elif name == "hang":
                # No answer; wait until the client cancels this request.
                while True:
                    other = json.loads(next(lines))
                    if other.get("method") == "notifications/cancelled" and other["params"]["requestId"] == request_id:
                        cancelled.append(other["params"])
                        break
            elif name == "cancelled":
                text(request_id, json.dumps(cancelled))
            elif name == "huge":
                out.write(b'{"jsonrpc": "2.0", "id": %d, "result": {"x": "' % request_id)
                out.write(b"x" * arguments["size"] + b'"}}\n')
                out.flush()
            else:
                send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"Unknown tool: {name}"}})
        elif request_id is not None:
            send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}})


if __name__ == "__main__":
    main()
