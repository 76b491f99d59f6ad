"""The gateway's own upstream credentials: sealed at rest, write-only, presented on every transport.

Real peers: the demo MCP server (official SDK) refusing requests without a
header (`--require-header`) or without a token from a real local OAuth token
endpoint started here (`--accept-tokens-from`); the SDK server behind a
WebSocket with the same check. Each test first shows the upstream refusing
the gateway without the credential, so a credential that is not sent fails it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from harness import free_port, spawn_upstream, wait_for_port
from test_bridge_transports import sdk_client

from gateway.demo.client import gateway_client

API_KEY_HEADER = "X-Upstream-Key"
API_KEY_VALUE = "upstream-s3cret-value"
UPSTREAM_BEARER = "upstream-bearer-token-7f3a"
CLIENT_ID = "gateway client/1"  # a space and a slash: form-encoded before Basic
CLIENT_SECRET = "oauth-s3cret:with&odd=chars"
WS_SERVER = Path(__file__).parent / "channel_servers" / "ws_server.py"
ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


def _spawn(*flags: str):
    proc, url = spawn_upstream(*flags)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def keyed_upstream():
    """The demo server; every request must carry `X-Upstream-Key: upstream-s3cret-value`."""
    yield from _spawn("--require-header", f"{API_KEY_HEADER}: {API_KEY_VALUE}")


@pytest.fixture(scope="module")
def bearer_upstream():
    """The demo server; exactly one Authorization header, the gateway's own bearer token."""
    yield from _spawn("--require-header", f"Authorization: Bearer {UPSTREAM_BEARER}")


@pytest.fixture(scope="module")
def keyed_sse_upstream():
    """The demo server on the 2024-11-05 HTTP+SSE transport, with the header check."""
    proc, url = spawn_upstream("--transport", "sse", "--require-header", f"{API_KEY_HEADER}: {API_KEY_VALUE}")
    yield url.replace("/mcp", "/sse")
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def keyed_ws_upstream():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(WS_SERVER), "--port", str(port), "--require-header", f"{API_KEY_HEADER}: {API_KEY_VALUE}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    yield f"ws://127.0.0.1:{port}/ws"
    proc.terminate()
    proc.wait(10)


HEADER_AUTH = {"kind": "header", "header_name": API_KEY_HEADER, "header_value": API_KEY_VALUE}


async def _set_auth(gw, server_id: str, auth: dict) -> dict:
    status, body = await gw.admin("PUT", f"/servers/{server_id}/auth", {"auth": auth})
    assert status == 200, body
    return body


async def _initialize(endpoint: str, api_key: str, extra: dict | None = None) -> int:
    headers = {"Authorization": f"Bearer {api_key}", "Accept": ACCEPT, **(extra or {})}
    async with aiohttp.ClientSession() as http:
        async with http.post(endpoint, json=INIT, headers=headers) as resp:
            await resp.read()
            return resp.status


async def _post_text(endpoint: str, api_key: str, message: dict = INIT) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {api_key}", "Accept": ACCEPT}
    async with aiohttp.ClientSession() as http:
        async with http.post(endpoint, json=message, headers=headers) as resp:
            return resp.status, await resp.text()


async def _bridged_refusal(gw, t, transport: str) -> str:
    """The error a bridged SDK client gets for a call; fails if the call works or hangs."""
    try:
        async with asyncio.timeout(20):
            async with sdk_client(gw, t, transport) as client:
                await client.call_tool("echo", {"text": "x"})
    except TimeoutError:
        raise AssertionError(f"the {transport} client hung instead of hearing the refusal") from None
    except Exception as exc:  # noqa: BLE001 - the SDK's MCPError, possibly inside exception groups
        leaves = [exc]
        while any(isinstance(e, BaseExceptionGroup) for e in leaves):
            leaves = [x for e in leaves for x in (e.exceptions if isinstance(e, BaseExceptionGroup) else [e])]
        return " ".join(str(e) for e in leaves)
    raise AssertionError(f"the {transport} call worked without the upstream's credential")


async def _tools(endpoint: str, api_key: str, mode: str) -> set[str]:
    async with gateway_client(endpoint, api_key, mode=mode) as client:
        return {tool.name for tool in (await client.list_tools()).tools}


# -- at rest and in the admin API ---------------------------------------------------------------------------
async def test_a_credential_is_sealed_at_rest_and_never_shown(gateway, pg_url, keyed_upstream, caplog):
    caplog.set_level(logging.DEBUG)
    t = await gateway.tenancy("acme", keyed_upstream)
    status, created = await gateway.admin(
        "POST", "/servers",
        {"tenant_id": t.tenant_id, "name": "second", "endpoint_url": keyed_upstream, "auth": HEADER_AUTH},
    )
    assert status == 201, created
    assert created["auth"] == {"kind": "header", "header_name": API_KEY_HEADER}
    oauth = {"kind": "oauth2_client_credentials", "token_url": "https://idp.example/token", "client_id": CLIENT_ID,
             "client_secret": CLIENT_SECRET, "scope": "mcp.read"}
    shown = await _set_auth(gateway, t.server_id, oauth)
    assert shown["auth"] == {"kind": "oauth2_client_credentials", "token_url": "https://idp.example/token",
                             "client_id": CLIENT_ID, "scope": "mcp.read", "client_auth": "basic"}
    _, page = await gateway.admin("GET", "/servers")
    _, one = await gateway.admin("GET", f"/servers/{created['id']}")
    everything = repr(page) + repr(one) + repr(created) + repr(shown)
    assert API_KEY_VALUE not in everything and CLIENT_SECRET not in everything
    assert "auth_sealed" not in everything

    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT id, auth_kind, auth_summary::text AS summary, auth_sealed FROM mcp_servers")
    finally:
        await conn.close()
    assert {r["auth_kind"] for r in rows} == {"header", "oauth2_client_credentials"}
    for row in rows:
        assert row["auth_sealed"].startswith("gwc1.")
        stored = row["summary"] + row["auth_sealed"]
        assert API_KEY_VALUE not in stored and CLIENT_SECRET not in stored
    assert API_KEY_VALUE not in caplog.text and CLIENT_SECRET not in caplog.text


async def test_credential_fields_are_validated(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    cases = [
        ({"kind": "header", "header_name": "Host", "header_value": "x"}, "auth.header_name"),
        ({"kind": "header", "header_name": "X-Key", "header_value": "a\r\nInjected: yes"}, "auth.header_value"),
        ({"kind": "header", "header_name": "Bad Name", "header_value": "x"}, "auth.header_name"),
        ({"kind": "oauth2_client_credentials", "token_url": "ftp://x/token", "client_id": "a", "client_secret": "b"},
         "auth.token_url"),
        ({"kind": "oauth2_client_credentials", "token_url": "https://x/token", "client_id": "a"},
         "auth.client_secret"),
        ({"kind": "kerberos"}, "auth.kind"),
    ]
    for auth, field in cases:
        status, body = await gateway.admin("PUT", f"/servers/{t.server_id}/auth", {"auth": auth})
        assert status == 422, (auth, body)
        assert field in {d["field"] for d in body["error"]["details"]}, (auth, body)
    status, body = await gateway.admin(
        "POST", "/servers", {"tenant_id": t.tenant_id, "name": "cmd", "endpoint_url": "python -m x",
                             "transport_type": "stdio", "auth": HEADER_AUTH},
    )
    assert status == 422 and body["error"]["details"][0]["field"] == "auth"


# -- every transport presents it -----------------------------------------------------------------------------
async def test_a_static_header_reaches_the_upstream_on_every_transport(gateway, keyed_upstream):
    t = await gateway.tenancy("acme", keyed_upstream)
    # Without the credential the upstream refuses, and the refusal reaches the client.
    assert await _initialize(t.endpoint, t.api_key) == 401
    for transport in ("sse", "websocket"):  # as a JSON-RPC error, not a hang
        assert "refused the gateway's credentials (HTTP 401)" in await _bridged_refusal(gateway, t, transport)

    await _set_auth(gateway, t.server_id, HEADER_AUTH)
    assert await _initialize(t.endpoint, t.api_key) == 200  # pass-through (server.py _forward)
    for mode in ("legacy", "2026-07-28"):
        assert "echo" in await _tools(t.endpoint, t.api_key, mode)
        # /mcp: the gateway's own MCP client (mcp_client.UpstreamClient)
        assert "demo__echo" in await _tools(f"{gateway.url}/mcp", t.api_key, mode)
    for transport in ("sse", "websocket"):  # the bridge's own upstream requests (bridge.py)
        async with sdk_client(gateway, t, transport) as client:
            assert (await client.call_tool("echo", {"text": "hi"})).content[0].text == "hi"

    # Removing it: refused again (nothing cached a credential that is gone).
    await _set_auth(gateway, t.server_id, {"kind": "none"})
    assert await _initialize(t.endpoint, t.api_key) == 401


async def test_sse_and_websocket_upstreams_present_it(gateway, mcp_upstream, keyed_sse_upstream, keyed_ws_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    ids = {}
    for name, url, transport in (("old-sse", keyed_sse_upstream, "sse"), ("sock", keyed_ws_upstream, "websocket")):
        status, body = await gateway.admin(
            "POST", "/servers", {"tenant_id": t.tenant_id, "name": name, "endpoint_url": url,
                                 "transport_type": transport},
        )
        assert status == 201, body
        ids[name] = body["id"]
    for name in ids:  # refused without the credential
        status, text = await _post_text(f"{gateway.url}/servers/{name}/mcp", t.api_key)
        assert status == 502 and "401" in text, text
    for name, server_id in ids.items():
        await _set_auth(gateway, server_id, HEADER_AUTH)
        async with gateway_client(f"{gateway.url}/servers/{name}/mcp", t.api_key, mode="legacy") as client:
            assert (await client.call_tool("add", {"a": 40, "b": 2})).content[0].text == "42.0"


async def test_the_clients_own_authorization_is_never_forwarded(gateway, bearer_upstream, keyed_upstream):
    # The upstream takes exactly one Authorization header, the gateway's: a forwarded client
    # token would be a second value, and the upstream would refuse.
    t = await gateway.tenancy("acme", bearer_upstream)
    await _set_auth(gateway, t.server_id, {"kind": "header", "header_name": "Authorization",
                                           "header_value": f"Bearer {UPSTREAM_BEARER}"})
    assert await _initialize(t.endpoint, t.api_key) == 200
    for mode in ("legacy", "2026-07-28"):
        assert "demo__echo" in await _tools(f"{gateway.url}/mcp", t.api_key, mode)
    async with sdk_client(gateway, t, "websocket") as client:
        assert (await client.call_tool("echo", {"text": "x"})).content[0].text == "x"

    # A header of the credential's name sent by the client is dropped, not added to the gateway's.
    k = await gateway.tenancy("globex", keyed_upstream)
    await _set_auth(gateway, k.server_id, HEADER_AUTH)
    assert await _initialize(k.endpoint, k.api_key, {API_KEY_HEADER: "client-chosen"}) == 200


# -- OAuth client credentials ------------------------------------------------------------------------------
class TokenEndpoint:
    """A real OAuth 2.0 token endpoint (client credentials grant) on a local port.

    Issued tokens are written to a file the upstream reads per request, so
    revoking one (`revoke_all`) makes the upstream refuse it at once.
    """

    def __init__(self, tokens_file: Path) -> None:
        self.tokens_file = tokens_file
        self.tokens_file.write_text("")
        self.requests: list[dict] = []
        self.expires_in: int | None = 3600
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/oauth/token"
        self._runner: web.AppRunner | None = None

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        client_id, _, secret = base64.b64decode(encoded).decode().partition(":") if scheme == "Basic" else ("", "", "")
        client_id, secret = unquote(client_id), unquote(secret)
        self.requests.append({"form": form, "client_id": client_id, "secret": secret})
        if scheme != "Basic":  # RFC 6749 2.3.1: or in the body
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if (client_id, secret) != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"tok-{len(self.requests)}"
        with self.tokens_file.open("a") as fh:
            fh.write(token + "\n")
        answer = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return web.json_response(answer)

    def revoke_all(self) -> None:
        self.tokens_file.write_text("")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth/token", self.token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def token_endpoint(tmp_path):
    endpoint = TokenEndpoint(tmp_path / "tokens")
    await endpoint.start()
    yield endpoint
    await endpoint.stop()


@pytest.fixture
def oauth_upstream(token_endpoint):
    yield from _spawn("--accept-tokens-from", str(token_endpoint.tokens_file))


def _oauth(endpoint: TokenEndpoint, **extra) -> dict:
    return {"kind": "oauth2_client_credentials", "token_url": endpoint.url, "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, "scope": "mcp:tools mcp:read", **extra}


async def test_oauth_token_is_fetched_once_cached_and_refreshed(gateway, token_endpoint, oauth_upstream, caplog):
    caplog.set_level(logging.DEBUG)
    t = await gateway.tenancy("acme", oauth_upstream)
    assert await _initialize(t.endpoint, t.api_key) == 401  # no credential yet
    await _set_auth(gateway, t.server_id, _oauth(token_endpoint))

    for _ in range(3):
        assert await _initialize(t.endpoint, t.api_key) == 200
    assert "demo__echo" in await _tools(f"{gateway.url}/mcp", t.api_key, "legacy")
    assert "echo" in await _tools(t.endpoint, t.api_key, "2026-07-28")
    (first,) = token_endpoint.requests  # one fetch served them all
    assert first["form"] == {"grant_type": "client_credentials", "scope": "mcp:tools mcp:read"}
    assert (first["client_id"], first["secret"]) == (CLIENT_ID, CLIENT_SECRET)

    # The upstream stops taking the token: its 401 drops it, the next request gets a new one.
    token_endpoint.revoke_all()
    assert await _initialize(t.endpoint, t.api_key) == 401
    assert await _initialize(t.endpoint, t.api_key) == 200
    assert len(token_endpoint.requests) == 2
    assert CLIENT_SECRET not in caplog.text


async def test_oauth_token_is_refreshed_before_it_expires(gateway, token_endpoint, oauth_upstream):
    token_endpoint.expires_in = 2  # refreshed a tenth of its life early: after 1.8 s
    t = await gateway.tenancy("acme", oauth_upstream)
    await _set_auth(gateway, t.server_id, _oauth(token_endpoint, client_auth="body"))
    assert await _initialize(t.endpoint, t.api_key) == 200
    assert await _initialize(t.endpoint, t.api_key) == 200
    assert len(token_endpoint.requests) == 1
    await asyncio.sleep(2.0)
    assert await _initialize(t.endpoint, t.api_key) == 200
    assert len(token_endpoint.requests) == 2
    # client_auth "body": the id and secret travel in the form, not in a Basic header.
    assert token_endpoint.requests[1]["form"]["client_secret"] == CLIENT_SECRET
    assert token_endpoint.requests[1]["client_id"] == ""


async def test_a_token_endpoint_that_refuses_gives_a_clear_502(gateway, token_endpoint, oauth_upstream, caplog):
    caplog.set_level(logging.DEBUG)
    t = await gateway.tenancy("acme", oauth_upstream)
    await _set_auth(gateway, t.server_id, {**_oauth(token_endpoint), "client_secret": "wrong-secret-value"})
    async with aiohttp.ClientSession() as http:
        async with http.post(t.endpoint, json=INIT,
                             headers={"Authorization": f"Bearer {t.api_key}", "Accept": ACCEPT}) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
    assert token_endpoint.url in error["message"] and "invalid_client" in error["message"]
    assert "wrong-secret-value" not in error["message"] and "wrong-secret-value" not in caplog.text
    # A failed fetch is remembered briefly: a burst does not hammer the endpoint.
    for _ in range(5):
        assert await _initialize(t.endpoint, t.api_key) == 502
    assert len(token_endpoint.requests) == 1


async def test_a_gateway_with_another_secrets_key_says_so(pg_url, make_gateway, keyed_upstream):
    a = await make_gateway(pg_url, secrets={"key": "a" * 40})
    t = await a.tenancy("acme", keyed_upstream)
    await _set_auth(a, t.server_id, HEADER_AUTH)
    assert await _initialize(t.endpoint, t.api_key) == 200
    b = await make_gateway(pg_url, secrets={"key": "b" * 40})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{b.url}/servers/demo/mcp", json=INIT,
                             headers={"Authorization": f"Bearer {t.api_key}", "Accept": ACCEPT}) as resp:
            assert resp.status == 502
            message = (await resp.json())["error"]["message"]
    assert "another secrets.key" in message
