"""Questions from a server (sampling, elicitation) and progress reach the client when the gateway speaks for the server.

The facade (a server of the other era) and the `/mcp` aggregate make the
upstream call themselves; relay.py carries what the upstream sends before its
answer. Every case runs the official SDK on both sides: the demo server's
`greet_me` (elicitation) and `ask_model` (sampling) ask their question in the
client's era, a request mid-call (2025) or an `input_required` result
(2026-07-28); the gateway translates between the two.
"""

from __future__ import annotations

import asyncio

import aiohttp
import mcp.types as types
import pytest

from gateway.demo.client import gateway_client

# (upstream, endpoint path, tool prefix, client mode): each route where the gateway makes the call.
ROUTES = [
    # A 2026-07-28 client, a 2025-era-only server: mid-call requests become input_required results.
    ("mcp_upstream_legacy", "/servers/demo/mcp", "", "2026-07-28"),
    # A 2025-era client, a 2026-07-28-only server: input_required results become mid-call requests.
    ("mcp_upstream_modern", "/servers/demo/mcp", "", "legacy"),
    # The aggregate, both eras, each against a server of the other era.
    ("mcp_upstream_legacy", "/mcp", "demo__", "2026-07-28"),
    ("mcp_upstream_modern", "/mcp", "demo__", "legacy"),
    # And against a server of the client's own era (the aggregate relays for it too).
    ("mcp_upstream_legacy", "/mcp", "demo__", "legacy"),
    ("mcp_upstream_modern", "/mcp", "demo__", "2026-07-28"),
]


class _Answers:
    """The client's side: what it was asked, and what it answers."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def sampling(self, context, params: types.CreateMessageRequestParams):
        self.asked.append("sampling:" + params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="Paris is lovely."), model="test-model"
        )

    async def elicitation(self, context, params):
        self.asked.append("elicitation:" + params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})


def _client(gw, t, path: str, mode: str, answers: _Answers):
    return gateway_client(
        f"{gw.url}{path}", t.api_key, mode=mode,
        sampling_callback=answers.sampling, elicitation_callback=answers.elicitation,
    )


@pytest.mark.parametrize(("upstream", "path", "prefix", "mode"), ROUTES)
async def test_questions_reach_the_client_and_its_answers_the_server(gateway, request, upstream, path, prefix, mode):
    t = await gateway.tenancy("acme", request.getfixturevalue(upstream))
    answers = _Answers()
    async with _client(gateway, t, path, mode, answers) as client:
        greeted = await client.call_tool(f"{prefix}greet_me", {})
        assert not greeted.is_error, greeted
        assert greeted.content[0].text == "Hello, Ada!"
        sampled = await client.call_tool(f"{prefix}ask_model", {"topic": "Paris"})
        assert sampled.content[0].text == "The model says: Paris is lovely."
        # Questions and answers between the two leave the plain calls alone.
        assert (await client.call_tool(f"{prefix}add", {"a": 1, "b": 2})).content[0].text == "3.0"
    assert answers.asked == ["elicitation:What is your name?", "sampling:One sentence about Paris, please."]
    assert gateway.gateway.dataplane.aggregate.relay.paused == 0


@pytest.mark.parametrize(("upstream", "path", "prefix", "mode"), ROUTES)
async def test_progress_reaches_the_client_under_its_own_token(gateway, request, upstream, path, prefix, mode):
    t = await gateway.tenancy("acme", request.getfixturevalue(upstream))
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with gateway_client(f"{gateway.url}{path}", t.api_key, mode=mode) as client:
        # Two calls at once: each hears only its own progress.
        other: list[float] = []

        async def on_other(progress, total, message) -> None:
            other.append(progress)

        first, second = await asyncio.gather(
            client.call_tool(f"{prefix}count", {"n": 3, "delay": 0.02}, progress_callback=on_progress),
            client.call_tool(f"{prefix}count", {"n": 5, "delay": 0.01}, progress_callback=on_other),
        )
    assert first.content[0].text == "counted to 3" and second.content[0].text == "counted to 5"
    assert seen == [(1, 3, "step 1 of 3"), (2, 3, "step 2 of 3"), (3, 3, "step 3 of 3")]
    assert other == [1, 2, 3, 4, 5]


async def _post(gw, t, body: dict, path: str = "/servers/demo/mcp") -> tuple[int, dict]:
    headers = {
        "Authorization": f"Bearer {t.api_key}", "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": body["method"],
    }
    if body["method"] == "tools/call":
        headers["Mcp-Name"] = body["params"]["name"]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}{path}", json=body, headers=headers) as response:
            return response.status, await response.json(content_type=None)


def _modern_call(name: str, request_id: int, **extra) -> dict:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    }
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": {}, "_meta": meta, **extra}}


async def test_a_paused_call_resumes_only_for_its_own_key(gateway, mcp_upstream_legacy):
    t = await gateway.tenancy("acme", mcp_upstream_legacy)
    # A second key of another tenant with a server of the same name.
    other = await gateway.tenancy("globex", mcp_upstream_legacy)
    status, paused = await _post(gateway, t, _modern_call("greet_me", 1))
    assert status == 200, paused
    result = paused["result"]
    assert result["resultType"] == "input_required"
    (key, question), = result["inputRequests"].items()
    assert question["method"] == "elicitation/create"
    state = result["requestState"]
    answer = {key: {"action": "accept", "content": {"name": "Grace"}}}

    # Another key (another tenant) cannot resume it, and learns nothing about it.
    status, refused = await _post(gateway, other, _modern_call("greet_me", 2, inputResponses=answer, requestState=state))
    assert refused["error"]["code"] == -32602 and "requestState" in refused["error"]["message"]
    # A forged state is refused the same way.
    status, forged = await _post(gateway, t, _modern_call("greet_me", 3, inputResponses=answer, requestState="gwr1.x"))
    assert forged["error"]["message"] == refused["error"]["message"]

    # Its own key resumes it, once.
    status, done = await _post(gateway, t, _modern_call("greet_me", 4, inputResponses=answer, requestState=state))
    assert done["result"]["content"][0]["text"] == "Hello, Grace!", done
    status, again = await _post(gateway, t, _modern_call("greet_me", 5, inputResponses=answer, requestState=state))
    assert again["error"]["code"] == -32602
    assert gateway.gateway.dataplane.aggregate.relay.paused == 0


async def test_paused_calls_end_with_the_gateway(gateway, mcp_upstream_legacy):
    t = await gateway.tenancy("acme", mcp_upstream_legacy)
    status, paused = await _post(gateway, t, _modern_call("greet_me", 1))
    assert paused["result"]["resultType"] == "input_required"
    relay = gateway.gateway.dataplane.aggregate.relay
    assert relay.paused == 1
    await gateway.gateway.stop()
    assert relay.paused == 0


async def test_progress_keeps_a_call_alive_up_to_the_maximum(pg_url, make_gateway, mcp_upstream):
    # upstream_timeout bounds silence, not the call: each progress restarts it.
    # stream_max_duration bounds the call however chatty it is.
    gw = await make_gateway(pg_url, dataplane={"upstream_timeout": 0.6, "stream_max_duration": 2.0})
    t = await gw.tenancy("acme", mcp_upstream)
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode="legacy") as client:
        seen: list[float] = []

        async def on_progress(progress, total, message) -> None:
            seen.append(progress)

        # 4 steps 0.35 s apart: 1.4 s in all, never 0.6 s silent.
        done = await client.call_tool("demo__count", {"n": 4, "delay": 0.35}, progress_callback=on_progress)
        assert done.content[0].text == "counted to 4" and seen == [1, 2, 3, 4]
        # 12 steps 0.35 s apart: past the 2 s maximum.
        with pytest.raises(Exception) as err:
            await client.call_tool("demo__count", {"n": 12, "delay": 0.35}, progress_callback=on_progress)
        assert "maximum duration" in str(err.value)
        # Silent for longer than upstream_timeout: a timeout.
        with pytest.raises(Exception) as err:
            await client.call_tool("demo__count", {"n": 1, "delay": 1.0})
        assert "did not answer in time" in str(err.value)


@pytest.mark.parametrize("upstream_flags", [(), ("--legacy-only",)], ids=["modern-upstream", "legacy-upstream"])
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_cancelled_call_is_cancelled_upstream(gateway, upstream_flags, mode):
    # The client gives up (2025: notifications/cancelled naming its own id; 2026-07-28:
    # it closes the answer's stream); the upstream call stops, whatever its era.
    import anyio
    from harness import spawn_upstream

    proc, url = spawn_upstream("--extras", *upstream_flags)
    try:
        t = await gateway.tenancy("acme", url)
        async with gateway_client(f"{gateway.url}/mcp", t.api_key, mode=mode) as client:
            with anyio.move_on_after(1.0) as scope:
                await client.call_tool("demo__sleep", {"seconds": 30})
            assert scope.cancelled_caught
            for _ in range(100):
                count = (await client.call_tool("demo__cancelled", {})).content[0].text
                if count == "1":
                    break
                await asyncio.sleep(0.05)
            assert count == "1"
        assert not gateway.gateway.dataplane.aggregate.relay._running
    finally:
        proc.terminate()
        proc.wait(10)
