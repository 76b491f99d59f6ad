"""What every locust user of loadtests/ shares: the targets file, MCP messages in both eras, and judging answers.

How answers are counted (the README's "Load testing" section says the same for readers of the reports):

- A request is a success when the gateway answered it as MCP expects: HTTP 200 with a
  JSON-RPC `result` (a JSON body or the matching event of an SSE body), 202 for a
  notification, 2xx for a session's DELETE.
- A failure (locust's failure count, the `_failures.csv` rows) is anything else: a
  JSON-RPC `error` inside an HTTP 200 ("JSON-RPC <code>: <message>"), a tool result with
  `isError` ("tool error: ..."), any other HTTP status ("HTTP <status>: <JSON-RPC message or
  body>"), an answer that is not JSON-RPC, a connection error or timeout.
- HTTP 429 is neither: it is reported as its own entry, request type `429` and name
  `<request name> [<tier>]` (the tier from the refusal's `error.data.tier`: api_key, user,
  tenant, global, ip, ip_ban, anonymous, sessions), marked as a success so that it never
  counts among the failures. In the stats table and `_stats.csv` these rows stand apart,
  with their own counts and latencies; for every user but the abusive one, any such row
  means quotas shaped the run.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant

try:  # the gateway's own JSON library when it is installed (less CPU on the load generator)
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    loads = orjson.loads
except ImportError:  # pragma: no cover - locust alone on a load machine
    import json

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    loads = json.loads

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
CLIENT_INFO = {"name": "mcp-gateway-loadtest", "version": "1"}
TARGETS_PATH = Path(os.environ.get("LOADTEST_TARGETS", Path(__file__).resolve().parent / "targets.json"))
# Seconds each user waits between tasks (0: as fast as the gateway answers, a closed loop).
THINK_SECONDS = float(os.environ.get("LOADTEST_THINK", "0"))

# The tool mix: (tool, arguments, weight). The names and arguments of the stub's tools, which are
# the demo server's too, so the same users run against `gateway demo`'s server.
TOOL_MIX: tuple[tuple[str, dict, int], ...] = (
    ("echo", {"text": "hello from locust"}, 6),
    ("add", {"a": 2, "b": 3}, 3),
    ("word_count", {"text": "the quick brown fox"}, 1),
)
TOOL_ARGUMENTS = {name: arguments for name, arguments, _ in TOOL_MIX}
_TOOL_NAMES = [name for name, _, _ in TOOL_MIX]
_TOOL_WEIGHTS = [weight for _, _, weight in TOOL_MIX]


def load_targets(path: Path = TARGETS_PATH) -> dict | None:
    """The file loadtests/provision.py wrote, or None when there is none yet."""
    try:
        return loads(path.read_bytes())
    except FileNotFoundError:
        return None


TARGETS = load_targets()


def pick_tool() -> tuple[str, dict]:
    name = random.choices(_TOOL_NAMES, _TOOL_WEIGHTS)[0]
    return name, TOOL_ARGUMENTS[name]


class Answer:
    """What a judged request gave: its result (None unless it succeeded) and the response headers."""

    __slots__ = ("result", "headers", "status")

    def __init__(self, result: dict | None, headers, status: int) -> None:
        self.result, self.headers, self.status = result, headers, status


class McpUser(FastHttpUser):
    """A client of the gateway's MCP endpoints. Subclasses are the traffic shapes (loadtests/locustfile.py)."""

    abstract = True
    host = TARGETS["gateway"] if TARGETS else None
    wait_time = constant(THINK_SECONDS)
    # A refused request comes back at once; a slow gateway should show as latency, not as a timeout.
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        if TARGETS is None:
            raise RuntimeError(
                f"no targets file at {TARGETS_PATH}: run loadtests/provision.py first (or set LOADTEST_TARGETS)"
            )
        self.targets = TARGETS
        self._ids = itertools.count(1)

    # -- requests ---------------------------------------------------------------------------------
    def rpc(
        self, path: str, method: str, params: dict | None, *, key: str, name: str, modern: bool,
        session: str | None = None, headers: dict | None = None,
    ) -> Answer:
        """POST one JSON-RPC request and judge its answer (see the module docstring)."""
        request_id = next(self._ids)
        params = dict(params or {})
        all_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": ACCEPT}
        if modern:
            params["_meta"] = {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
                "io.modelcontextprotocol/clientCapabilities": {},
            }
            all_headers["MCP-Protocol-Version"] = MODERN
            all_headers["Mcp-Method"] = method
            if method in ("tools/call", "prompts/get"):
                all_headers["Mcp-Name"] = params["name"]
        elif method != "initialize":
            all_headers["MCP-Protocol-Version"] = LEGACY
        if session is not None:
            all_headers["Mcp-Session-Id"] = session
        if headers:
            all_headers.update(headers)
        body = dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        with self.client.post(path, data=body, headers=all_headers, name=name, catch_response=True) as response:
            return self._judge(response, request_id, name)

    def notify(self, path: str, method: str, *, key: str, name: str, session: str | None) -> bool:
        """POST a 2025-era notification: 202 (or 200) with no JSON-RPC error is a success."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": ACCEPT,
                   "MCP-Protocol-Version": LEGACY}
        if session is not None:
            headers["Mcp-Session-Id"] = session
        body = dumps({"jsonrpc": "2.0", "method": method})
        with self.client.post(path, data=body, headers=headers, name=name, catch_response=True) as response:
            status = response.status_code
            if status == 429:
                self._rate_limited(response, name)
                return False
            if status in (200, 202):
                response.success()
                return True
            response.failure(_http_failure(response))
            return False

    def delete_session(self, path: str, *, key: str, session: str, name: str) -> bool:
        headers = {"Authorization": f"Bearer {key}", "MCP-Protocol-Version": LEGACY, "Mcp-Session-Id": session}
        with self.client.delete(path, headers=headers, name=name, catch_response=True) as response:
            status = response.status_code
            if status == 429:
                self._rate_limited(response, name)
                return False
            if 200 <= status < 300:
                response.success()
                return True
            response.failure(_http_failure(response))
            return False

    # -- judging ----------------------------------------------------------------------------------
    def _judge(self, response, request_id: int, name: str) -> Answer:
        status = response.status_code
        headers = response.headers
        if status == 429:
            self._rate_limited(response, name)
            return Answer(None, headers, status)
        if status != 200:
            response.failure(_http_failure(response))
            return Answer(None, headers, status)
        try:
            message = _message(response, request_id)
        except ValueError as exc:
            response.failure(f"not a JSON-RPC answer: {exc}")
            return Answer(None, headers, status)
        error = message.get("error")
        if error is not None:
            if isinstance(error, dict):
                response.failure(f"JSON-RPC {error.get('code')}: {error.get('message')}")
            else:
                response.failure(f"JSON-RPC error: {str(error)[:200]}")
            return Answer(None, headers, status)
        result = message.get("result")
        if not isinstance(result, dict):
            response.failure("JSON-RPC answer without a result object")
            return Answer(None, headers, status)
        if result.get("isError"):
            text = next((c.get("text") for c in result.get("content", ()) if isinstance(c, dict)), "")
            response.failure(f"tool error: {str(text)[:200]}")
            return Answer(None, headers, status)
        response.success()
        return Answer(result, headers, status)

    def _rate_limited(self, response, name: str) -> None:
        """Report a 429 as its own entry (type `429`, the tier in the name), never as a failure."""
        tier = "unknown"
        try:
            error = loads(response.content).get("error") or {}
            tier = (error.get("data") or {}).get("tier") or tier
        except (ValueError, AttributeError, TypeError):
            pass
        response.request_meta["request_type"] = "429"
        response.request_meta["name"] = f"{name} [{tier}]"
        response.success()


def _message(response, request_id: int) -> dict:
    """The JSON-RPC response to `request_id` in a JSON or an SSE body."""
    content = response.content or b""
    content_type = (response.headers.get("content-type") or "").lower()
    if content_type.startswith("text/event-stream"):
        for event in content.replace(b"\r\n", b"\n").split(b"\n\n"):
            data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
            if not data:
                continue
            message = loads(data)
            if isinstance(message, dict) and message.get("id") == request_id and "method" not in message:
                return message
        raise ValueError("the event stream ended without the answer")
    message = loads(content)
    if not isinstance(message, dict):
        raise ValueError("the body is not one JSON-RPC message")
    return message


def _http_failure(response) -> str:
    """`HTTP <status>: <what the gateway said>`: stable text, so locust groups failures by cause."""
    status = response.status_code
    if not status:  # no answer at all: locust's own error names the cause
        return f"connection error: {response.error!r}"[:300] if getattr(response, "error", None) else "no answer"
    detail = ""
    try:
        error = loads(response.content).get("error")
        if isinstance(error, dict):
            detail = f"JSON-RPC {error.get('code')}: {error.get('message')}"
    except (ValueError, AttributeError, TypeError):
        detail = (response.content or b"")[:200].decode(errors="replace")
    return f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
