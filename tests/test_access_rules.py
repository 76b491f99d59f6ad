"""Access rules (allow/deny by tenant, role, user or key), role permissions on MCP methods, config:// for ADMIN.

The decision itself is checked without a network (auth/access.py); everything
else runs a real gateway on PostgreSQL in front of the SDK demo server (with
its test extras: `config://settings`), through every path a client reaches an
upstream: the byte pass-through of `/servers/{name}/mcp`, the facade (a
2026-07-28 client of a 2025-era-only server), the `/mcp` aggregate, and the
bridged WebSocket and SSE transports. The central property: what a list shows
is exactly what a call allows, enumerated for several principals and rule sets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import uuid
from dataclasses import dataclass

import aiohttp
import mcp.types as types
import orjson
import pytest
from aiohttp import web
from harness import spawn_upstream
from mcp.shared.exceptions import MCPError

from gateway.auth import access
from gateway.dataplane.enforce import SseRewriter
from gateway.dataplane.jsonrpc import FORBIDDEN, UNKNOWN_SERVER
from gateway.demo.client import gateway_client
from gateway.snapshot import ServerEntry, Snapshot

MODES = ["legacy", "2026-07-28"]
ACCEPT = "application/json, text/event-stream"
# The extras demo server's items (the enumeration below calls every one of them).
TOOLS = {
    "echo": {"text": "hi"}, "add": {"a": 1, "b": 2}, "word_count": {"text": "a b"}, "utc_now": {}, "count": {"n": 1},
    "greet_me": {}, "ask_model": {"topic": "tea"}, "sleep": {"seconds": 0}, "cancelled": {}, "toggle_tool": {},
}
PROMPTS = {"greet": {"name": "Ada"}}
RESOURCES = {"demo://readme", "config://settings"}


# -- the decision, without a network --------------------------------------------------------------------
_T = uuid.uuid4()
_PROD = ServerEntry(uuid.uuid4(), _T, "prod", "http://127.0.0.1:1/mcp", "http", "UNKNOWN", "", "/mcp")
_DEV = ServerEntry(uuid.uuid4(), _T, "dev", "http://127.0.0.1:1/mcp", "http", "UNKNOWN", "", "/mcp")


@dataclass
class _Who:
    role: str
    id: uuid.UUID
    user_id: uuid.UUID
    tenant_id: uuid.UUID = _T


def _who(role: str) -> _Who:
    return _Who(role, uuid.uuid4(), uuid.uuid4())


def _rule(effect: str, server: ServerEntry | None = None, **fields) -> access.AccessRule:
    values = dict(role=None, user_id=None, api_key_id=None, tool=None, resource=None, prompt=None) | fields
    return access.AccessRule(id=uuid.uuid4(), tenant_id=_T, effect=effect, server_id=server and server.id, **values)


def _snapshot(*rules: access.AccessRule) -> Snapshot:
    servers = {(_T, "prod"): _PROD, (_T, "dev"): _DEV}
    return Snapshot(version=1, tenants={}, keys_by_prefix={}, servers=servers,
                    access=access.AccessPolicy(rules, servers.values()))


def test_no_rules_allow_everything_but_what_roles_forbid():
    snap, user, admin, readonly = _snapshot(), _who("USER"), _who("ADMIN"), _who("READONLY")
    assert access.usable(snap, user, _PROD) and access.usable(snap, readonly, _PROD)
    assert access.decide(snap, user, _PROD, "tool", "anything")
    assert not access.decide(snap, readonly, _PROD, "tool", "anything")  # READONLY lists and reads only
    assert access.decide(snap, readonly, _PROD, "prompt", "p") and access.decide(snap, readonly, _PROD, "resource", "a://b")
    for uri in ("config://settings", "CONFIG://settings", " config://settings", "con\tfig://x", "config:x"):
        assert not access.decide(snap, user, _PROD, "resource", uri), uri
        assert access.decide(snap, admin, _PROD, "resource", uri), uri
    assert not access.may_hide(snap, admin, _PROD, "tool") and not access.may_hide(snap, admin, _PROD, "resource")
    assert access.may_hide(snap, user, _PROD, "resource")  # config:// could be in it
    assert access.may_hide(snap, readonly, _PROD, "tool")


def test_deny_wins_and_names_its_subject_only():
    alice, bob, key_holder = _who("USER"), _who("USER"), _who("SERVICE")
    snap = _snapshot(
        _rule("allow", _PROD, tool="del*"),  # allowed to everyone in the tenant...
        _rule("deny", _PROD, user_id=alice.user_id, tool="delete_*"),  # ...but alice is denied: deny wins
        _rule("deny", None, api_key_id=key_holder.id, prompt="secret*"),  # every server, one key
        _rule("deny", _DEV, role="USER", resource="file:///private/*"),
    )
    assert not access.decide(snap, alice, _PROD, "tool", "delete_all")
    assert access.decide(snap, bob, _PROD, "tool", "delete_all")
    assert access.decide(snap, alice, _PROD, "tool", "echo")
    assert not access.decide(snap, key_holder, _PROD, "prompt", "secret_plan")
    assert not access.decide(snap, key_holder, _DEV, "prompt", "secret_plan")
    assert access.decide(snap, bob, _DEV, "prompt", "secret_plan")
    assert not access.decide(snap, bob, _DEV, "resource", "file:///private/a/b")
    assert access.decide(snap, bob, _PROD, "resource", "file:///private/a/b")  # another server
    assert access.decide(snap, key_holder, _DEV, "resource", "file:///private/a")  # another role
    assert access.decide(snap, bob, _DEV, "tool", "file:///private/a")  # a resource glob says nothing of tools


def test_an_allowed_object_is_closed_to_everyone_else():
    admin, user, readonly = _who("ADMIN"), _who("USER"), _who("READONLY")
    snap = _snapshot(_rule("allow", _PROD, role="ADMIN"), _rule("allow", _PROD, role="USER", tool="read_*"))
    # prod is ADMIN's, except read_* tools for USERs; dev has no rules and stays open.
    assert access.usable(snap, admin, _PROD) and access.decide(snap, admin, _PROD, "tool", "write")
    assert access.usable(snap, user, _PROD)  # a tool of it is allowed to the user
    assert access.decide(snap, user, _PROD, "tool", "read_x")
    assert not access.decide(snap, user, _PROD, "tool", "write")
    assert not access.decide(snap, user, _PROD, "prompt", "p")
    assert not access.usable(snap, readonly, _PROD)
    for kind, name in (("tool", "read_x"), ("prompt", "p"), ("resource", "a://b")):
        assert not access.decide(snap, readonly, _PROD, kind, name)  # a closed server denies every item
    assert access.usable(snap, readonly, _DEV) and access.decide(snap, user, _DEV, "tool", "write")


def test_a_server_wide_deny_closes_the_server_and_only_for_its_subject():
    user, other = _who("USER"), _who("USER")
    snap = _snapshot(_rule("deny", _PROD, api_key_id=user.id), _rule("allow", _PROD, api_key_id=user.id, tool="*"))
    assert not access.usable(snap, user, _PROD)
    assert not access.decide(snap, user, _PROD, "tool", "echo")  # the allow does not beat the deny
    assert access.usable(snap, other, _PROD) and not access.decide(snap, other, _PROD, "tool", "echo")
    assert access.usable(snap, user, _DEV)


def test_globs_are_whole_name_and_case_sensitive():
    user = _who("USER")
    snap = _snapshot(_rule("deny", None, tool="get_?"), _rule("deny", None, resource="Demo://notes/*"),
                     _rule("deny", None, prompt="[ab]*"))
    assert not access.decide(snap, user, _PROD, "tool", "get_x")
    assert access.decide(snap, user, _PROD, "tool", "get_xy") and access.decide(snap, user, _PROD, "tool", "xget_x")
    assert access.decide(snap, user, _PROD, "tool", "GET_X")
    # URI schemes are case-insensitive, so a rule's and a request's are compared lower-cased.
    assert not access.decide(snap, user, _PROD, "resource", "demo://notes/a/b")
    assert not access.decide(snap, user, _PROD, "resource", "DEMO://notes/a")
    assert access.decide(snap, user, _PROD, "resource", "demo://Notes/a")
    assert not access.decide(snap, user, _PROD, "prompt", "alpha") and access.decide(snap, user, _PROD, "prompt", "c")


def test_role_table_is_closed_for_unknown_methods():
    readonly, user = _who("READONLY"), _who("USER")
    for method in ("tools/list", "resources/read", "prompts/get", "initialize", "notifications/initialized", None):
        assert access.method_permitted(readonly, method), method
    for method in ("tools/call", "tasks/result", "some/new_method"):
        assert not access.method_permitted(readonly, method), method
        assert access.method_permitted(user, method), method


# -- SSE rewriting (the pass-through's list answers) -------------------------------------------------------
def test_sse_rewriter_rewrites_the_answer_and_passes_everything_else_byte_for_byte():
    answer = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}'
    body = (
        b": a comment\r\n\r\n"
        b"id: 41\r\nevent: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\n"
        b"id: 42\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\n"
        b"data: \"id\":1,\"result\":{\"tools\":[1,2]}}\n\n"
        b"retry: 10\r\r"
    )

    def rewrite(data: bytes) -> bytes:
        return answer if b'"result"' in data else data

    expected = (
        b": a comment\r\n\r\n"
        b"id: 41\r\nevent: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\n"
        b"id: 42\nevent: message\ndata: " + answer + b"\n\n"
        b"retry: 10\r\r"
    )
    for size in (1, 2, 3, 7, len(body)):
        rewriter = SseRewriter(rewrite)
        out = b"".join(rewriter.feed(body[i:i + size]) for i in range(0, len(body), size)) + rewriter.finish()
        assert out == expected, size
    rewriter = SseRewriter(rewrite)  # an upstream that stops mid-event: the event is still rewritten
    assert rewriter.feed(b"data: {\"result\": 1}") == b""
    assert rewriter.finish() == b"data: " + answer + b"\n\n"


# -- a gateway and its principals -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream_extras():
    proc, url = spawn_upstream("--extras")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def upstream_extras_legacy():
    """The extras server behaving like a 2025-11-25 one: a 2026-07-28 client goes through the facade."""
    proc, url = spawn_upstream("--extras", "--legacy-only")
    yield url
    proc.terminate()
    proc.wait(10)


@dataclass
class Who:
    user_id: str
    key_id: str
    key: str


async def _principal(gw, tenant_id: str, name: str, role: str, scopes=("proxy",)) -> Who:
    status, user = await gw.admin("POST", "/users", {"tenant_id": tenant_id, "username": name,
                                                      "email": f"{name}@example.com", "role": role})
    assert status == 201, user
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": name, "scopes": list(scopes)})
    assert status == 201, key
    return Who(user["id"], key["id"], key["key"])


async def _rule_for(gw, tenant_id: str, key: str | None = None, **fields) -> dict:
    status, rule = await gw.admin("POST", "/access-rules", {"tenant_id": tenant_id, **fields}, key=key)
    assert status == 201, rule
    return rule


MODERN = "2026-07-28"
_NAMED = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


def _modern(message: dict) -> tuple[dict, dict]:
    """A 2026-07-28 (stateless) form of `message` and the headers that must agree with it."""
    params = dict(message.get("params") or {})
    params["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                       "io.modelcontextprotocol/clientCapabilities": {}}
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": message["method"]}
    field = _NAMED.get(message["method"])
    if field is not None:
        encoded = base64.b64encode(params[field].encode()).decode()
        headers["Mcp-Name"] = f"=?base64?{encoded}?="
    return {**message, "params": params}, headers


async def _post(gw, key: str, path: str, message, headers: dict | None = None) -> tuple[int, object]:
    """POST one raw message (as a 2026-07-28 stateless request; a batch, and anything given headers, as it is)."""
    if isinstance(message, dict) and headers is None:
        message, headers = _modern(message)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gw.url}{path}", data=orjson.dumps(message),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": ACCEPT,
                     **(headers or {})},
        ) as resp:
            text = await resp.text()
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
                return resp.status, orjson.loads(data[-1])
            return resp.status, orjson.loads(text) if text else None


def _rpc(method: str, params: dict | None = None, request_id: int = 1) -> dict:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


class _Answers:
    """The client's answers to the demo server's questions (greet_me, ask_model)."""

    async def sampling(self, context, params):
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="ok"),
                                         model="test")

    async def elicitation(self, context, params):
        return types.ElicitResult(action="accept", content={"name": "Ada"})


def _client(gw, path: str, key: str, mode: str):
    answers = _Answers()
    return gateway_client(f"{gw.url}{path}", key, mode=mode, sampling_callback=answers.sampling,
                          elicitation_callback=answers.elicitation)


def _refused(exc: BaseException) -> bool:
    """Refused by the gateway: 403 -32031, or (on /mcp) an item of a server closed to the caller, "Unknown ..."."""
    if not isinstance(exc, MCPError):
        return False
    error = exc.error
    return error.code == FORBIDDEN or (error.code == -32602 and error.message.startswith("Unknown "))


@pytest.fixture
async def acme(gateway, upstream_extras, upstream_extras_legacy):
    """Tenant acme: servers alpha (both eras) and beta (2025-era only), and a principal of every role."""
    t = await gateway.tenancy("acme", upstream_extras, server_name="alpha")
    status, beta = await gateway.admin(
        "POST", "/servers", {"tenant_id": t.tenant_id, "name": "beta", "endpoint_url": upstream_extras_legacy}
    )
    assert status == 201, beta
    people = {
        "user": Who(t.user_id, t.api_key_id, t.api_key),
        "admin": await _principal(gateway, t.tenant_id, "acme-admin", "ADMIN"),
        "service": await _principal(gateway, t.tenant_id, "acme-service", "SERVICE"),
        "readonly": await _principal(gateway, t.tenant_id, "acme-readonly", "READONLY"),
    }
    return gateway, t, people


# -- the admin API -------------------------------------------------------------------------------------
async def test_rules_are_created_listed_read_and_deleted(acme):
    gw, t, people = acme
    _, before = await gw.admin("GET", "/tenants")
    rule = await _rule_for(gw, t.tenant_id, effect="deny", role="READONLY", server_name="alpha", tool="delete_*",
                           description="no deleting for readers")
    assert rule["subject_type"] == "role" and rule["role"] == "READONLY"
    assert rule["object_type"] == "tool" and rule["tool"] == "delete_*"
    assert rule["server_id"] == t.server_id and rule["server_name"] == "alpha"
    everywhere = await _rule_for(gw, t.tenant_id, effect="allow", api_key_id=people["service"].key_id,
                                 resource="demo://*")
    assert everywhere["server_id"] is None and everywhere["subject_type"] == "api_key"
    status, page = await gw.admin("GET", "/access-rules")
    assert status == 200 and {r["id"] for r in page["items"]} == {rule["id"], everywhere["id"]}
    status, page = await gw.admin("GET", f"/access-rules?server_id={t.server_id}")
    assert [r["id"] for r in page["items"]] == [rule["id"]]
    status, got = await gw.admin("GET", f"/access-rules/{rule['id']}")
    assert status == 200 and got == rule
    status, gone = await gw.admin("DELETE", f"/access-rules/{rule['id']}")
    assert status == 200 and gone["id"] == rule["id"]
    status, _ = await gw.admin("GET", f"/access-rules/{rule['id']}")
    assert status == 404
    status, _ = await gw.admin("DELETE", f"/access-rules/{rule['id']}")
    assert status == 404
    # Every write moved the configuration version (so every process reloads).
    assert gw.gateway.store.current.version >= 3 + 3
    status, doc = await gw.admin("GET", "/openapi.json")
    assert "/api/v1/access-rules" in doc["paths"] and "AccessRuleCreate" in doc["components"]["schemas"]


async def test_validation_lists_every_bad_field(acme):
    gw, t, people = acme
    status, body = await gw.admin("POST", "/access-rules", {
        "tenant_id": t.tenant_id, "effect": "maybe", "role": "READONLY", "user_id": people["user"].user_id,
        "server_id": t.server_id, "server_name": "alpha", "tool": "a*", "prompt": "b*", "resource": "x\u0000",
        "colour": "blue",
    })
    assert status == 422
    fields = sorted(d["field"] for d in body["error"]["details"])
    assert fields == ["colour", "effect", "prompt", "resource", "server_name", "user_id"], body
    status, page = await gw.admin("GET", "/access-rules")
    assert page["items"] == []


async def test_a_rule_must_name_objects_of_its_own_tenant(acme, mcp_upstream):
    gw, t, people = acme
    other = await gw.tenancy("globex", mcp_upstream, server_name="gx")
    for fields, missing in (({"server_id": other.server_id}, "server"), ({"server_name": "gx"}, "server"),
                            ({"user_id": other.user_id}, "user"), ({"api_key_id": other.api_key_id}, "API key"),
                            ({"server_id": str(uuid.uuid4())}, "server")):
        status, body = await gw.admin("POST", "/access-rules", {"tenant_id": t.tenant_id, "effect": "deny", **fields})
        assert status == 404 and body["error"]["message"] == f"{missing} not found", (fields, body)


async def test_another_tenant_cannot_see_or_touch_rules(acme, mcp_upstream):
    gw, t, people = acme
    other = await gw.tenancy("globex", mcp_upstream, server_name="gx")
    acme_admin = await _principal(gw, t.tenant_id, "acme-boss", "ADMIN", scopes=("admin",))
    globex_admin = await _principal(gw, other.tenant_id, "globex-boss", "ADMIN", scopes=("admin",))
    # A tenant admin writes rules for its own tenant without naming it.
    status, mine = await gw.admin("POST", "/access-rules", {"effect": "deny", "tool": "echo"}, key=acme_admin.key)
    assert status == 201 and mine["tenant_id"] == t.tenant_id
    theirs = await _rule_for(gw, other.tenant_id, effect="deny", tool="add", key=globex_admin.key)
    status, page = await gw.admin("GET", "/access-rules", key=globex_admin.key)
    assert [r["id"] for r in page["items"]] == [theirs["id"]]
    status, page = await gw.admin("GET", f"/access-rules?tenant_id={t.tenant_id}", key=globex_admin.key)
    assert page["items"] == []
    missing = str(uuid.uuid4())
    answers = []
    for method in ("GET", "DELETE"):
        for rule_id in (mine["id"], missing):
            status, body = await gw.admin(method, f"/access-rules/{rule_id}", key=globex_admin.key)
            answers.append((status, body))
    assert all(a == (404, {"error": {"code": "not_found", "message": "access rule not found"}}) for a in answers)
    # globex cannot write into acme, nor point a rule at acme's objects.
    for fields in ({"tenant_id": t.tenant_id}, {"server_id": t.server_id}, {"user_id": t.user_id},
                   {"api_key_id": t.api_key_id}, {"server_name": "alpha"}):
        status, body = await gw.admin("POST", "/access-rules", {"effect": "allow", **fields}, key=globex_admin.key)
        assert status == 404, (fields, body)
    status, got = await gw.admin("GET", f"/access-rules/{mine['id']}", key=acme_admin.key)
    assert status == 200  # still there, untouched
    # Nor does globex's rule reach acme's principals: acme may still call add.
    status, answer = await _post(gw, t.api_key, "/servers/alpha/mcp", _rpc("tools/call", {"name": "add",
                                                                                     "arguments": {"a": 1, "b": 1}}))
    assert status == 200 and "result" in answer, answer
    # A USER's key cannot administer rules at all.
    status, _ = await gw.admin("GET", "/access-rules", key=t.api_key)
    assert status == 403


# -- enforcement -----------------------------------------------------------------------------------------
async def _call_status(gw, key: str, path: str, tool: str) -> tuple[int, object]:
    return await _post(gw, key, path, _rpc("tools/call", {"name": tool, "arguments": TOOLS.get(tool, {})}))


@pytest.mark.parametrize("subject", ["tenant", "role", "user", "api_key"])
async def test_a_deny_reaches_exactly_its_subject(acme, subject):
    gw, t, people = acme
    target = people["user"]
    fields = {"tenant": {}, "role": {"role": "USER"}, "user": {"user_id": target.user_id},
              "api_key": {"api_key_id": target.key_id}}[subject]
    await _rule_for(gw, t.tenant_id, effect="deny", server_name="alpha", tool="e*", **fields)
    status, answer = await _call_status(gw, target.key, "/servers/alpha/mcp", "echo")
    assert status == 403 and answer["error"]["code"] == FORBIDDEN, answer
    assert "echo" in answer["error"]["message"] and "alpha" in answer["error"]["message"]
    status, answer = await _call_status(gw, target.key, "/servers/alpha/mcp", "add")  # not matched by e*
    assert status == 200 and "result" in answer
    status, answer = await _call_status(gw, target.key, "/servers/beta/mcp", "echo")  # another server
    assert status == 200 and "result" in answer
    status, answer = await _call_status(gw, people["service"].key, "/servers/alpha/mcp", "echo")
    assert (status == 403) == (subject == "tenant"), answer
    # Through /mcp the same, under the namespaced name.
    status, answer = await _post(gw, target.key, "/mcp", _rpc("tools/call", {"name": "alpha__echo",
                                                                          "arguments": {"text": "x"}}))
    assert status == 403 and answer["error"]["code"] == FORBIDDEN and "alpha__echo" in answer["error"]["message"]


async def test_allow_closes_an_object_to_everyone_else_and_deny_wins(acme):
    gw, t, people = acme
    await _rule_for(gw, t.tenant_id, effect="allow", role="ADMIN", server_name="alpha", tool="add")
    await _rule_for(gw, t.tenant_id, effect="allow", user_id=people["user"].user_id, server_name="alpha", tool="a*")
    await _rule_for(gw, t.tenant_id, effect="deny", api_key_id=people["admin"].key_id, server_name="alpha", tool="*")
    results = {}
    for who in ("user", "admin", "service"):
        for tool in ("add", "echo"):
            status, _ = await _call_status(gw, people[who].key, "/servers/alpha/mcp", tool)
            results[who, tool] = status
    assert results == {
        ("user", "add"): 200,  # its own allow
        ("user", "echo"): 200,  # not on any allowlist
        ("admin", "add"): 403,  # its key's deny beats its role's allow
        ("admin", "echo"): 403,
        ("service", "add"): 403,  # add is allowlisted, and not for SERVICE
        ("service", "echo"): 200,
    }


async def test_a_closed_server_looks_like_a_missing_one(acme):
    gw, t, people = acme
    await _rule_for(gw, t.tenant_id, effect="deny", user_id=people["user"].user_id, server_name="alpha")
    closed = await _post(gw, people["user"].key, "/servers/alpha/mcp", _rpc("tools/list"))
    missing = await _post(gw, people["user"].key, "/servers/nope/mcp", _rpc("tools/list"))
    assert closed[0] == missing[0] == 404
    assert closed[1]["error"]["code"] == missing[1]["error"]["code"] == UNKNOWN_SERVER
    assert closed[1]["error"]["message"].replace("alpha", "X") == missing[1]["error"]["message"].replace("nope", "X")
    status, answer = await _post(gw, people["user"].key, "/mcp", _rpc("tools/list"))
    names = {tool["name"] for tool in answer["result"]["tools"]}
    assert names and not any(n.startswith("alpha__") for n in names) and "beta__echo" in names
    status, answer = await _post(gw, people["user"].key, "/mcp", _rpc("tools/call", {"name": "alpha__echo"}))
    assert answer["error"] == {"code": -32602, "message": "Unknown tool: alpha__echo"}
    # The bridges refuse to open it, like a missing server.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/servers/alpha/sse",
                            headers={"Authorization": f"Bearer {people['user'].key}"}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == UNKNOWN_SERVER
    status, _ = await _post(gw, people["service"].key, "/servers/alpha/mcp", _rpc("tools/list"))
    assert status == 200


async def test_resource_and_prompt_globs(acme):
    gw, t, people = acme
    key = people["user"].key
    await _rule_for(gw, t.tenant_id, effect="deny", role="USER", resource="demo://notes/secret*")
    await _rule_for(gw, t.tenant_id, effect="deny", role="USER", server_name="alpha", prompt="gr*")
    status, answer = await _post(gw, key, "/servers/alpha/mcp", _rpc("resources/read",
                                                                     {"uri": "demo://notes/secret-plans"}))
    assert status == 403 and answer["error"]["code"] == FORBIDDEN
    status, answer = await _post(gw, key, "/servers/alpha/mcp", _rpc("resources/read", {"uri": "demo://notes/tea"}))
    assert status == 200 and answer["result"]["contents"][0]["text"] == "A note on tea."
    status, answer = await _post(gw, key, "/mcp", _rpc("resources/read",
                                                       {"uri": "mcpgw://beta/demo://notes/secret"}))
    assert status == 403 and answer["error"]["code"] == FORBIDDEN
    status, answer = await _post(gw, key, "/servers/alpha/mcp", _rpc("prompts/get",
                                                                     {"name": "greet", "arguments": {"name": "A"}}))
    assert status == 403
    status, answer = await _post(gw, key, "/servers/beta/mcp", _rpc("prompts/get",
                                                                    {"name": "greet", "arguments": {"name": "A"}}))
    assert status == 200 and "result" in answer
    # Completing a denied prompt's arguments is using it too.
    status, answer = await _post(gw, key, "/servers/alpha/mcp", _rpc("completion/complete", {
        "ref": {"type": "ref/prompt", "name": "greet"}, "argument": {"name": "name", "value": "A"}}))
    assert status == 403
    status, answer = await _post(gw, key, "/servers/alpha/mcp", _rpc("prompts/list"))
    assert answer["result"]["prompts"] == []
    # A template whose text a deny does not match stays listed: its denied expansions are refused when read.
    status, answer = await _post(gw, key, "/servers/alpha/mcp", _rpc("resources/templates/list"))
    assert [r["uriTemplate"] for r in answer["result"]["resourceTemplates"]] == ["demo://notes/{topic}"]
    await _rule_for(gw, t.tenant_id, effect="deny", role="USER", resource="demo://notes/*")
    status, answer = await _post(gw, key, "/servers/alpha/mcp", _rpc("resources/templates/list"))
    assert answer["result"]["resourceTemplates"] == []


@pytest.mark.parametrize("mode", MODES)
async def test_readonly_lists_and_reads_but_calls_no_tool(acme, mode):
    gw, t, people = acme
    for path, prefix in (("/servers/alpha/mcp", ""), ("/servers/beta/mcp", ""), ("/mcp", "alpha__")):
        async with _client(gw, path, people["readonly"].key, mode) as client:
            assert (await client.list_tools()).tools == []  # it could call none of them
            uri = "demo://readme" if not prefix else "mcpgw://alpha/demo://readme"
            assert (await client.read_resource(uri)).contents[0].text.startswith("A demo MCP server")
            assert (await client.get_prompt(f"{prefix}greet", {"name": "Ada"})).messages
            with pytest.raises(MCPError) as err:
                await client.call_tool(f"{prefix}echo", {"text": "x"})
            assert err.value.error.code == FORBIDDEN
            assert "READONLY" in err.value.error.message, err.value.error.message


@pytest.mark.parametrize("mode", MODES)
async def test_config_resources_are_for_admins_only(acme, mode):
    gw, t, people = acme
    for path, uri in (("/servers/alpha/mcp", "config://settings"), ("/servers/beta/mcp", "config://settings"),
                      ("/mcp", "mcpgw://alpha/config://settings")):
        async with _client(gw, path, people["admin"].key, mode) as client:
            assert uri in {str(r.uri) for r in (await client.list_resources()).resources}
            assert '"secret_level"' in (await client.read_resource(uri)).contents[0].text
        for who in ("user", "service", "readonly"):
            async with _client(gw, path, people[who].key, mode) as client:
                listed = {str(r.uri) for r in (await client.list_resources()).resources}
                assert uri not in listed and any("demo://readme" in u for u in listed)
                with pytest.raises(MCPError) as err:
                    await client.read_resource(uri)
                assert err.value.error.code == FORBIDDEN and "ADMIN" in err.value.error.message
    # Spelled otherwise, it is the same resource to the upstream, and refused the same.
    for spelled in ("CONFIG://settings", " config://settings"):
        status, answer = await _post(gw, people["user"].key, "/servers/alpha/mcp",
                                     _rpc("resources/read", {"uri": spelled}))
        assert status == 403, spelled


# -- the central property: lists show exactly what calls allow ----------------------------------------------
async def _observe(gw, path: str, key: str, mode: str, prefix: str, uri_of) -> tuple[set, set]:
    """(listed, usable) items of one server as one principal sees them through one endpoint."""
    listed, usable = set(), set()
    async with _client(gw, path, key, mode) as client:
        listed |= {("tool", t.name) for t in (await client.list_tools()).tools if t.name.startswith(prefix)}
        listed |= {("prompt", p.name) for p in (await client.list_prompts()).prompts if p.name.startswith(prefix)}
        listed |= {("resource", str(r.uri)) for r in (await client.list_resources()).resources
                   if str(r.uri).startswith(uri_of(""))}
        attempts = [("tool", prefix + name, client.call_tool, (prefix + name, args)) for name, args in TOOLS.items()]
        attempts += [("prompt", prefix + name, client.get_prompt, (prefix + name, args))
                     for name, args in PROMPTS.items()]
        attempts += [("resource", uri_of(uri), client.read_resource, (uri_of(uri),)) for uri in sorted(RESOURCES)]
        for kind, name, use, args in attempts:
            try:
                await use(*args)
                if name.endswith("toggle_tool"):
                    await use(*args)  # twice: the server's tool list is as it was
            except MCPError as exc:
                if _refused(exc):
                    continue
                raise
            usable.add((kind, name))
    return listed, usable


async def _closed(gw, path: str, key: str) -> bool:
    status, answer = await _post(gw, key, path, _rpc("tools/list"))
    return status == 404 and answer["error"]["code"] == UNKNOWN_SERVER


RULE_SETS = {
    "none": [],
    "mixed": [
        {"effect": "deny", "tool": "word_*"},
        {"effect": "allow", "role": "ADMIN", "server_name": "alpha", "tool": "utc_*"},
        {"effect": "deny", "user_id": "user", "prompt": "*"},
        {"effect": "allow", "api_key_id": "service", "server_name": "beta", "resource": "demo://*"},
    ],
    "closed": [
        {"effect": "allow", "role": "SERVICE", "server_name": "alpha"},
        {"effect": "allow", "user_id": "user", "server_name": "alpha", "tool": "e*"},
        {"effect": "deny", "role": "USER", "resource": "demo://readme"},
        {"effect": "deny", "api_key_id": "admin", "server_name": "beta"},
    ],
}
# A few of each rule set's consequences, so that agreement between lists and calls cannot be vacuous.
EXPECTED = {
    ("mixed", "admin", "alpha"): {"has": {("tool", "utc_now"), ("resource", "config://settings")},
                                  "lacks": {("tool", "word_count")}},
    ("mixed", "user", "alpha"): {"lacks": {("tool", "utc_now"), ("prompt", "greet"), ("tool", "word_count")},
                                 "has": {("tool", "echo")}},
    ("mixed", "user", "beta"): {"lacks": {("resource", "demo://readme"), ("prompt", "greet")}},
    ("mixed", "service", "beta"): {"has": {("resource", "demo://readme"), ("prompt", "greet")}},
    ("closed", "user", "alpha"): {"has": {("tool", "echo")}, "lacks": {("tool", "add"), ("prompt", "greet")}},
    ("closed", "service", "alpha"): {"has": {("tool", "add"), ("prompt", "greet"), ("resource", "demo://readme")}},
    ("closed", "user", "beta"): {"has": {("tool", "add")}, "lacks": {("resource", "demo://readme")}},
    ("closed", "readonly", "beta"): {"has": {("prompt", "greet")}, "lacks": {("tool", "echo")}},
}
CLOSED = {("closed", "admin", "alpha"), ("closed", "readonly", "alpha"), ("closed", "admin", "beta")}


@pytest.mark.parametrize("mode", MODES)
async def test_lists_show_exactly_what_calls_allow(acme, mode):
    gw, t, people = acme
    for name, rules in RULE_SETS.items():
        status, page = await gw.admin("GET", "/access-rules")
        for rule in page["items"]:  # a rule change takes effect at once, no restart
            assert (await gw.admin("DELETE", f"/access-rules/{rule['id']}"))[0] == 200
        for rule in rules:
            fields = dict(rule)
            for ref, attr in (("user_id", "user_id"), ("api_key_id", "key_id")):
                if ref in fields:
                    fields[ref] = getattr(people[fields[ref]], attr)
            await _rule_for(gw, t.tenant_id, **fields)
        for (who, principal), server in itertools.product(people.items(), ("alpha", "beta")):
            case = (name, who, server)
            if case in CLOSED:
                assert await _closed(gw, f"/servers/{server}/mcp", principal.key), case
                listed, usable = await _observe(gw, "/mcp", principal.key, mode, f"{server}__",
                                                lambda u, s=server: f"mcpgw://{s}/{u}")
                assert listed == usable == set(), case
                continue
            direct = await _observe(gw, f"/servers/{server}/mcp", principal.key, mode, "", lambda u: u)
            assert direct[0] == direct[1], (case, "listed but refused:", direct[0] - direct[1],
                                            "usable but unlisted:", direct[1] - direct[0])
            prefixed = await _observe(gw, "/mcp", principal.key, mode, f"{server}__",
                                      lambda u, s=server: f"mcpgw://{s}/{u}")
            assert prefixed[0] == prefixed[1], (case, "/mcp", prefixed)
            # /mcp shows the same items as the server's own endpoint, namespaced.
            renamed = {(kind, n.removeprefix(f"{server}__").removeprefix(f"mcpgw://{server}/"))
                       for kind, n in prefixed[0]}
            assert renamed == direct[0], case
            expected = EXPECTED.get(case, {})
            assert expected.get("has", set()) <= direct[0], (case, direct[0])
            assert not expected.get("lacks", set()) & direct[0], (case, direct[0])
            if who == "admin" and name == "none":
                assert len(direct[0]) == len(TOOLS) + len(PROMPTS) + len(RESOURCES)


# -- batches, bridges, other processes -----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _batch_peer():
    """A hand-written 2025-03-26 peer that answers JSON-RPC batches (the SDK's servers refuse them):
    tools/list lists echo and add; anything else gets {}. `?sse=1` answers as one SSE event."""

    async def handle(request: web.Request) -> web.StreamResponse:
        messages = await request.json()
        answers = [
            {"jsonrpc": "2.0", "id": m["id"],
             "result": {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ("echo", "add")]}
             if m["method"] == "tools/list" else {}}
            for m in messages if "id" in m
        ]
        if request.query.get("sse"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"event: message\r\ndata: " + orjson.dumps(answers) + b"\r\n\r\n")
            await response.write_eof()
            return response
        return web.json_response(answers)

    app = web.Application()
    app.router.add_post("/mcp", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/mcp"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_a_batch_is_checked_item_by_item_and_its_lists_filtered(acme, answer):
    gw, t, people = acme
    key, headers = people["user"].key, {"MCP-Protocol-Version": "2025-03-26"}
    async with _batch_peer() as url:
        url += "?sse=1" if answer == "sse" else ""
        status, _ = await gw.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "batcher",
                                                         "endpoint_url": url})
        assert status == 201
        await _rule_for(gw, t.tenant_id, effect="deny", role="USER", server_name="batcher", tool="add")
        batch = [_rpc("tools/call", {"name": "echo", "arguments": {}}, 1),
                 _rpc("tools/call", {"name": "add", "arguments": {}}, 2)]
        status, refused = await _post(gw, key, "/servers/batcher/mcp", batch, headers)
        assert status == 403 and refused["error"]["code"] == FORBIDDEN and "'add'" in refused["error"]["message"]
        lists = [_rpc("tools/list", {}, 7), _rpc("ping", {}, 8)]
        for who, expected in (("user", {"echo"}), ("service", {"echo", "add"})):
            status, answers = await _post(gw, people[who].key, "/servers/batcher/mcp", lists, headers)
            assert status == 200, answers
            by_id = {m["id"]: m for m in answers}
            assert {tool["name"] for tool in by_id[7]["result"]["tools"]} == expected and by_id[8]["result"] == {}


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_bridged_transports_enforce_rules_and_filter_lists(acme, transport):
    from test_bridge_transports import sdk_client

    gw, t, people = acme
    await _rule_for(gw, t.tenant_id, effect="deny", role="USER", server_name="alpha", tool="add")
    reader = type(t)(**{**t.__dict__, "api_key": people["readonly"].key, "server_name": "alpha"})
    user = type(t)(**{**t.__dict__, "server_name": "alpha"})
    async with sdk_client(gw, user, transport) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "echo" in names and "add" not in names
        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        assert "demo://readme" in uris and "config://settings" not in uris
        with pytest.raises(MCPError) as err:
            await client.call_tool("add", {"a": 1, "b": 2})
        assert err.value.error.code == FORBIDDEN
        assert (await client.call_tool("echo", {"text": "yes"})).content[0].text == "yes"
        # A rule made while connected applies to the next message.
        await _rule_for(gw, t.tenant_id, effect="deny", role="USER", server_name="alpha", tool="echo")
        with pytest.raises(MCPError) as err:
            await client.call_tool("echo", {"text": "no"})
        assert err.value.error.code == FORBIDDEN
    async with sdk_client(gw, reader, transport) as client:
        assert (await client.list_tools()).tools == []
        with pytest.raises(MCPError) as err:
            await client.call_tool("utc_now", {})
        assert err.value.error.code == FORBIDDEN


async def test_a_rule_reaches_every_process_without_restart(acme, pg_url, make_gateway):
    gw, t, people = acme
    second = await make_gateway(pg_url)
    key = people["service"].key
    assert (await _call_status(second, key, "/servers/alpha/mcp", "echo"))[0] == 200
    rule = await _rule_for(gw, t.tenant_id, effect="deny", api_key_id=people["service"].key_id, tool="echo")
    assert (await _call_status(gw, key, "/servers/alpha/mcp", "echo"))[0] == 403  # this process: at once
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (await _call_status(second, key, "/servers/alpha/mcp", "echo"))[0] != 403:  # the other: by its poll
        assert loop.time() < deadline, "the second process never applied the rule"
        await asyncio.sleep(0.05)
    await gw.admin("DELETE", f"/access-rules/{rule['id']}")
    deadline = loop.time() + 10
    while (await _call_status(second, key, "/servers/alpha/mcp", "echo"))[0] != 200:
        assert loop.time() < deadline, "the second process never dropped the rule"
        await asyncio.sleep(0.05)


async def test_listeners_hear_that_a_rule_changed_their_lists(acme):
    from test_list_changes import _Events, _listen_raw

    gw, t, people = acme
    async with aiohttp.ClientSession() as http:
        for path in ("/mcp", "/servers/beta/mcp"):  # the aggregate, and the facade (2026-07-28 to a 2025 server)
            response = await _listen_raw(http, gw, t, path, toolsListChanged=True)
            events = _Events(response)
            assert (await events.next())["method"] == "notifications/subscriptions/acknowledged"
            rule = await _rule_for(gw, t.tenant_id, effect="deny", role="USER", tool="echo")
            assert (await events.next())["method"] == "notifications/tools/list_changed", path
            await gw.admin("DELETE", f"/access-rules/{rule['id']}")
            assert (await events.next())["method"] == "notifications/tools/list_changed", path
            response.close()
