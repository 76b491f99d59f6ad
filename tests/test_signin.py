"""Sign-in through the OAuth authorization-code flow with PKCE, and the sessions it opens.

The providers are real: `oauth_provider.LocalProvider`, an OIDC provider
(discovery, JWKS, signed ID tokens, userinfo) and a GitHub-shaped one, served
over HTTP in the test's loop. The browser is an aiohttp client with a cookie
jar that follows redirects; the gateway runs on PostgreSQL. Database rows are
read and changed directly only to look (hashes, not tokens) and to move time
(expiry) or state (a deactivated user, a suspended tenant).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from harness import RunningGateway, free_port, start_gateway
from oauth_provider import LocalProvider

from gateway import config

TLS_BASE = "https://gateway-admin.example.test"


@dataclass
class World:
    gw: RunningGateway
    oidc: LocalProvider
    github: LocalProvider
    db: str
    acme: str = ""
    globex: str = ""
    users: dict[str, str] | None = None

    @property
    def base(self) -> str:
        return self.gw.gateway.controlplane_url

    async def sql(self, query: str, *args):
        conn = await asyncpg.connect(self.db)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()


def _toml(oidc: LocalProvider, github: LocalProvider, port: int, session_ttl: int) -> str:
    base = f"http://127.0.0.1:{port}"
    for name in ("corp", "corp-join"):
        oidc.redirect_uris.add(f"{base}/auth/callback/{name}")
    oidc.redirect_uris.add(f"{TLS_BASE}/auth/callback/corp-tls")
    github.redirect_uris.add(f"{base}/auth/callback/github")
    corp = f'kind = "oidc"\nclient_id = "{oidc.client_id}"\nclient_secret = "{oidc.client_secret}"\nissuer = "{oidc.issuer}"'
    return f"""
[signin]
redirect_base_url = "{base}"
session_ttl = {session_ttl}

[[signin.providers]]
name = "corp"
{corp}

[[signin.providers]]
name = "corp-join"
{corp}
create_users_tenant = "acme"
create_users_domains = ["acme.test"]

[[signin.providers]]
name = "corp-tls"
{corp}
redirect_base_url = "{TLS_BASE}"

[[signin.providers]]
name = "github"
kind = "github"
client_id = "{github.client_id}"
client_secret = "{github.client_secret}"
authorize_url = "{github.base}/login/oauth/authorize"
token_url = "{github.base}/login/oauth/access_token"
api_url = "{github.base}/api"
"""


async def make_world(database_url: str, tmp_path, ttl: int = 3600, **sections) -> World:
    """Both providers and a gateway on a control-plane port they know; `sections` as for `start_gateway`."""
    oidc = await LocalProvider("oidc").start()
    github = await LocalProvider("github", client_id="Iv1.gateway").start()
    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(_toml(oidc, github, port, ttl))
    gw = await start_gateway(database_url, config_file=path, controlplane={"port": port}, **sections)
    w = World(gw, oidc, github, database_url, users={})
    status, acme = await gw.admin("POST", "/tenants", {"name": "acme"})
    assert status == 201, acme
    status, globex = await gw.admin("POST", "/tenants", {"name": "globex"})
    assert status == 201, globex
    w.acme, w.globex = acme["id"], globex["id"]
    for name, tenant, role in (("alice", w.acme, "ADMIN"), ("bob", w.acme, "USER"), ("carol", w.globex, "ADMIN")):
        domain = "acme.test" if tenant == w.acme else "globex.test"
        status, user = await gw.admin("POST", "/users", {"tenant_id": tenant, "username": name,
                                                         "email": f"{name}@{domain}", "role": role})
        assert status == 201, user
        w.users[name] = user["id"]
    return w


@pytest.fixture
async def world(pg_url, tmp_path, request):
    w = await make_world(pg_url, tmp_path, getattr(request, "param", 3600))
    try:
        yield w
    finally:
        await w.gw.gateway.stop()
        await w.oidc.stop()
        await w.github.stop()


def browser() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for IP-address hosts (the gateway listens on 127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(w: World, person: str, provider: str = "corp", http: aiohttp.ClientSession | None = None):
    """The whole flow in a browser that follows redirects: (status, JSON answer, the response)."""
    idp = w.github if provider == "github" else w.oidc
    idp.next_user = person
    own = http is None
    http = http or browser()
    try:
        async with http.get(f"{w.base}/auth/login/{provider}") as resp:
            return resp.status, await resp.json(), resp
    finally:
        if own:
            await http.close()


async def admin(w: World, method: str, path: str, token: str, json=None):
    return await w.gw.admin(method, path, json, key=token)


async def step_to_callback(w: World, http: aiohttp.ClientSession, provider: str = "corp") -> str:
    """Login and the provider's answer, without following the redirect back: the callback URL."""
    async with http.get(f"{w.base}/auth/login/{provider}", allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        to_provider = resp.headers["Location"]
    async with http.get(to_provider, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


def _cookies(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """Each Set-Cookie header of a response by cookie name, as sent."""
    found = {}
    for header in resp.headers.getall("Set-Cookie", []):
        found[header.partition("=")[0]] = header
    return found


# -- the whole flow -----------------------------------------------------------------------------
async def test_oidc_sign_in_opens_a_session_that_works_on_the_admin_api(world):
    w = world
    w.oidc.add_user("alice", "Alice@ACME.test")  # addresses match whatever their case
    async with browser() as http:
        status, body, resp = await sign_in(w, "alice", http=http)
        assert status == 200, body
        token = body["token"]
        assert token.startswith("gws_") and body["user_id"] == w.users["alice"] and body["role"] == "ADMIN"
        assert body["tenant_id"] == w.acme and body["provider"] == "corp"
        # What the gateway asked the provider for: PKCE S256, a nonce, a state, and never the verifier.
        asked = w.oidc.authorize_requests[-1]
        assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
        assert asked["nonce"] and asked["state"] and "code_verifier" not in asked
        # The browser holds the session as a cookie: the admin API takes it (reads).
        assert {c.key: c.value for c in http.cookie_jar}["gw_session"] == token
        async with http.get(f"{w.base}/api/v1/users") as answer:
            assert answer.status == 200
            names = {u["username"] for u in (await answer.json())["items"]}
    assert names == {"alice", "bob"}  # a tenant ADMIN: its tenant, nothing of globex
    # A program sends the token as a bearer, on every admin route a key would reach.
    status, made = await admin(w, "POST", "/users", token, {"username": "dan", "email": "dan@acme.test"})
    assert status == 201 and made["tenant_id"] == w.acme, made
    status, tenants = await admin(w, "GET", "/tenants", token)
    assert status == 200 and [t["name"] for t in tenants["items"]] == ["acme"]
    status, listed = await admin(w, "GET", "/sessions", token)
    assert status == 200 and [s["id"] for s in listed["items"]] == [body["id"]]
    # Stored as a hash only.
    rows = await w.sql("SELECT * FROM sessions")
    assert len(rows) == 1 and rows[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(dict(rows[0])) and rows[0]["provider"] == "corp"
    assert await w.sql("SELECT * FROM signin_states") == []  # the pending sign-in was used up


async def test_github_sign_in_uses_only_addresses_github_verified(world):
    w = world
    # Primary address unverified (alice's!), a secondary verified one (bob's): bob signs in.
    w.github.add_user("bobby", "alice@acme.test", emails=[
        {"email": "alice@acme.test", "verified": False, "primary": True},
        {"email": "bob@acme.test", "verified": True, "primary": False},
    ])
    status, body, _ = await sign_in(w, "bobby", "github")
    assert status == 200, body
    assert body["user_id"] == w.users["bob"]
    status, users = await admin(w, "GET", "/users", body["token"])
    assert status == 200 and [u["username"] for u in users["items"]] == ["bob"]  # a USER sees itself
    row = (await w.sql("SELECT provider, subject FROM sessions"))[0]
    assert row["provider"] == "github" and row["subject"] == str(w.github.users["bobby"]["id"])
    # Only an unverified address: refused, whatever user it would match.
    w.github.add_user("mallory", "alice@acme.test", verified=False)
    status, body, _ = await sign_in(w, "mallory", "github")
    assert status == 403 and body["error"]["code"] == "no_verified_email", body


async def test_unverified_oidc_email_is_not_used(world):
    w = world
    w.oidc.add_user("mallory", "alice@acme.test", verified=False)
    status, body, _ = await sign_in(w, "mallory")
    assert status == 403 and body["error"]["code"] == "no_verified_email", body
    assert await w.sql("SELECT id FROM sessions") == []


async def test_email_from_userinfo_when_the_id_token_has_none(world):
    w = world
    w.oidc.add_user("bob", "bob@acme.test", email_in_id_token=False)
    status, body, _ = await sign_in(w, "bob")
    assert status == 200 and body["user_id"] == w.users["bob"], body


# -- state and PKCE -----------------------------------------------------------------------------
async def test_state_must_be_this_browsers_and_works_once(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.next_user = "alice"
    async with browser() as http:
        callback = await step_to_callback(w, http)
        state = parse_qs(urlsplit(callback).query)["state"][0]
        # Another browser (no state cookie) cannot use this browser's callback: login CSRF.
        async with browser() as other:
            async with other.get(callback) as resp:
                body = await resp.json()
                assert resp.status == 400 and body["error"]["code"] == "invalid_state", body
                assert "not started in this browser" in body["error"]["message"]
        # A state this browser does not hold, with its cookie: refused too.
        async with http.get(callback.replace(state, state[:-4] + "AAAA")) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_state"
    # (the refusal cleared this browser's state cookie, as any callback does)
    async with browser() as http:
        callback = await step_to_callback(w, http)
        state = parse_qs(urlsplit(callback).query)["state"][0]
        async with http.get(callback) as resp:
            assert resp.status == 200, await resp.text()
        # Replayed, even with the state cookie put back: the state was used.
        async with http.get(callback, headers={"Cookie": f"gw_signin={state}"}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["error"]["code"] == "invalid_state", body
            assert "already used" in body["error"]["message"]
    # Made up, state and cookie alike.
    async with browser() as http:
        made_up = "x" * 43
        async with http.get(f"{w.base}/auth/callback/corp?code=abc&state={made_up}",
                            headers={"Cookie": f"gw_signin={made_up}"}) as resp:
            assert resp.status == 400 and "unknown" in (await resp.json())["error"]["message"]
    assert w.oidc.token_errors == []  # no refused state ever reached the provider
    assert len(await w.sql("SELECT id FROM sessions")) == 1


async def test_a_state_expires(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.next_user = "alice"
    async with browser() as http:
        callback = await step_to_callback(w, http)
        await w.sql("UPDATE signin_states SET expires_at = now() - interval '1 second'")
        async with http.get(callback) as resp:
            body = await resp.json()
    assert resp.status == 400 and "expired" in body["error"]["message"], body


@pytest.mark.parametrize("provider", ["corp", "github"])
async def test_a_code_from_another_sign_in_fails_pkce_at_the_provider(world, provider):
    w = world
    idp = w.github if provider == "github" else w.oidc
    idp.add_user("eve", "bob@acme.test")
    idp.add_user("alice", "alice@acme.test")
    # The attacker starts a sign-in and keeps its code (never redeemed)...
    idp.next_user = "eve"
    async with browser() as attacker:
        stolen = parse_qs(urlsplit(await step_to_callback(w, attacker, provider)).query)["code"][0]
    # ...and pushes it into the victim's callback, whose state and cookie are genuine.
    idp.next_user = "alice"
    async with browser() as victim:
        callback = await step_to_callback(w, victim, provider)
        own = parse_qs(urlsplit(callback).query)["code"][0]
        async with victim.get(callback.replace(own, stolen)) as resp:
            body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["code"] == "provider_refused"
    message = body["error"]["message"]
    assert "refused the authorization code: invalid_grant" in message and "PKCE" in message, message
    assert idp.token_errors == ["invalid_grant"]  # the provider, not the gateway, caught it
    assert await w.sql("SELECT id FROM sessions") == []


async def test_an_id_token_not_made_for_this_sign_in_is_refused(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.id_token_nonce = "from-another-sign-in"
    status, body, _ = await sign_in(w, "alice")
    assert status == 400 and "nonce" in body["error"]["message"], body
    w.oidc.id_token_nonce, w.oidc.id_token_audience = None, "another-client"
    status, body, _ = await sign_in(w, "alice")
    assert status == 502 and body["error"]["code"] == "provider_error", body
    assert "ID token did not verify" in body["error"]["message"]
    assert await w.sql("SELECT id FROM sessions") == []


async def test_the_person_declining_at_the_provider_is_reported(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.deny = True
    status, body, _ = await sign_in(w, "alice")
    assert status == 400 and body["error"]["code"] == "provider_refused", body
    assert "access_denied" in body["error"]["message"]


# -- who may sign in ----------------------------------------------------------------------------
async def test_an_unknown_address_is_refused_and_no_user_is_made(world):
    w = world
    w.oidc.add_user("stranger", "stranger@elsewhere.test")
    status, body, _ = await sign_in(w, "stranger")
    assert status == 403 and body["error"]["code"] == "unknown_user", body
    assert "stranger@elsewhere.test" in body["error"]["message"]
    assert await w.sql("SELECT id FROM sessions") == []
    assert await w.sql("SELECT id FROM users WHERE email = 'stranger@elsewhere.test'") == []


async def test_users_are_made_only_where_configured(world):
    w = world
    w.oidc.add_user("dave", "dave@acme.test")
    status, body, _ = await sign_in(w, "dave")  # "corp" does not make users
    assert status == 403 and body["error"]["code"] == "unknown_user", body
    status, body, _ = await sign_in(w, "dave", "corp-join")  # "corp-join" does, in acme, for acme.test
    assert status == 200, body
    (row,) = await w.sql("SELECT tenant_id, role, username FROM users WHERE email = 'dave@acme.test'")
    assert str(row["tenant_id"]) == w.acme and row["role"] == "READONLY" and row["username"] == "dave"
    assert body["user_id"] != w.users["alice"] and body["role"] == "READONLY"
    w.oidc.add_user("erin", "erin@elsewhere.test")
    status, body, _ = await sign_in(w, "erin", "corp-join")  # not in create_users_domains
    assert status == 403 and body["error"]["code"] == "unknown_user", body


async def test_an_inactive_user_or_a_suspended_tenant_is_refused(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    status, body, _ = await sign_in(w, "alice")
    assert status == 200
    token = body["token"]
    await w.sql("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(w.users["alice"]))
    status, body, _ = await sign_in(w, "alice")
    assert status == 403 and body["error"]["code"] == "user_inactive", body
    status, body = await admin(w, "GET", "/users", token)  # the open session stops at once
    assert status == 401 and "deactivated" in body["error"]["message"], body
    await w.sql("UPDATE users SET is_active = true WHERE id = $1", uuid.UUID(w.users["alice"]))
    await w.sql("UPDATE tenants SET status = 'suspended' WHERE id = $1", uuid.UUID(w.acme))
    status, body, _ = await sign_in(w, "alice")
    assert status == 403 and body["error"]["code"] == "tenant_suspended", body
    status, body = await admin(w, "GET", "/users", token)
    assert status == 403 and "suspended" in body["error"]["message"], body
    assert len(await w.sql("SELECT id FROM sessions")) == 1


# -- the session's life -------------------------------------------------------------------------
@pytest.mark.parametrize("world", [60], indirect=True)
async def test_a_session_expires(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    before = time.time()
    status, body, resp = await sign_in(w, "alice")
    assert status == 200, body
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00")).timestamp()
    assert before + 60 - 5 <= expires <= time.time() + 60 + 5  # signin.session_ttl = 60
    assert "Max-Age=60" in _cookies(resp)["gw_session"]
    token = body["token"]
    status, _ = await admin(w, "GET", "/users", token)
    assert status == 200
    await w.sql("UPDATE sessions SET expires_at = now() - interval '1 second'")
    status, body = await admin(w, "GET", "/users", token)
    assert status == 401 and "expired" in body["error"]["message"], body
    status, listed = await admin(w, "GET", "/sessions", w.gw.admin_key)
    assert status == 200 and listed["items"] == []


async def test_sign_out_and_revocation_take_effect_at_once(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    origin = {"Origin": w.base}
    # Sign-out with the token as a bearer.
    status, body, _ = await sign_in(w, "alice")
    token = body["token"]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{w.base}/auth/logout", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(f"{w.base}/auth/logout", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 401  # nothing left to end
        async with http.post(f"{w.base}/auth/logout", headers={"Authorization": f"Bearer {w.gw.admin_key}"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "not_a_session"
    status, body = await admin(w, "GET", "/users", token)
    assert status == 401 and "ended" in body["error"]["message"], body
    # Sign-out in a browser: the cookie, and only from the gateway's own origin.
    async with browser() as http:
        status, body, _ = await sign_in(w, "alice", http=http)
        token = body["token"]
        async with http.post(f"{w.base}/auth/logout") as resp:
            assert resp.status == 403, await resp.text()  # no Origin: could be another site's form
        async with http.post(f"{w.base}/auth/logout", headers={"Origin": "http://evil.test"}) as resp:
            assert resp.status == 403
        status, _ = await admin(w, "GET", "/users", token)
        assert status == 200
        async with http.post(f"{w.base}/auth/logout", headers=origin) as resp:
            assert resp.status == 200
            cleared = _cookies(resp)["gw_session"]
        assert "Max-Age=0" in cleared or "expires=Thu, 01 Jan 1970" in cleared
    async with aiohttp.ClientSession() as http:  # the old cookie, sent by hand: refused
        async with http.get(f"{w.base}/api/v1/users", headers={"Cookie": f"gw_session={token}"}) as resp:
            assert resp.status == 401
    # Revocation by an admin.
    status, body, _ = await sign_in(w, "alice")
    token, session_id = body["token"], body["id"]
    status, _ = await admin(w, "GET", "/users", token)
    assert status == 200
    status, revoked = await admin(w, "DELETE", f"/sessions/{session_id}", w.gw.admin_key)
    assert status == 200 and revoked["is_active"] is False and revoked["ended_at"], revoked
    status, body = await admin(w, "GET", "/users", token)
    assert status == 401 and "revoked" in body["error"]["message"], body
    # A browser's change through the admin API with the cookie: same-origin only.
    async with browser() as http:
        status, body, _ = await sign_in(w, "alice", http=http)
        own = body["id"]
        async with http.delete(f"{w.base}/api/v1/sessions/{own}") as resp:
            assert resp.status == 403
        async with http.delete(f"{w.base}/api/v1/sessions/{own}", headers=origin) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(f"{w.base}/api/v1/users") as resp:
            assert resp.status == 401


async def test_a_tenant_admin_reaches_only_its_tenants_sessions(world):
    w = world
    tokens, ids = {}, {}
    for person in ("alice", "bob", "carol"):
        w.oidc.add_user(person, f"{person}@{'globex' if person == 'carol' else 'acme'}.test")
        status, body, _ = await sign_in(w, person)
        assert status == 200, body
        tokens[person], ids[person] = body["token"], body["id"]

    async def listed(who: str) -> set[str]:
        status, body = await admin(w, "GET", "/sessions", tokens[who])
        assert status == 200, body
        return {s["id"] for s in body["items"]}

    assert await listed("alice") == {ids["alice"], ids["bob"]}  # acme's ADMIN: acme's sessions
    assert await listed("bob") == {ids["bob"]}  # a USER: its own
    assert await listed("carol") == {ids["carol"]}
    status, everyone = await admin(w, "GET", "/sessions", w.gw.admin_key)
    assert {s["id"] for s in everyone["items"]} == set(ids.values())  # the operator: all
    # Another tenant's session is "not found", exactly like one that does not exist.
    status, other = await admin(w, "DELETE", f"/sessions/{ids['carol']}", tokens["alice"])
    status_missing, missing = await admin(w, "DELETE", f"/sessions/{uuid.uuid4()}", tokens["alice"])
    assert (status, other) == (status_missing, missing) == (404, {"error": {"code": "not_found",
                                                                            "message": "session not found"}})
    status, _ = await admin(w, "DELETE", f"/sessions/{ids['alice']}", tokens["bob"])  # a USER: own only
    assert status == 404
    for person in ("carol", "alice"):
        status, _ = await admin(w, "GET", "/users", tokens[person])
        assert status == 200, person
    status, _ = await admin(w, "DELETE", f"/sessions/{ids['bob']}", tokens["alice"])
    assert status == 200
    status, _ = await admin(w, "GET", "/users", tokens["bob"])
    assert status == 401


async def test_session_cookie_flags(world):
    w = world
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.next_user = "alice"
    # On loopback over http: HttpOnly, SameSite=Lax, no Secure (a browser would drop it).
    async with browser() as http:
        async with http.get(f"{w.base}/auth/login/corp", allow_redirects=False) as resp:
            state_cookie = _cookies(resp)["gw_signin"]
        status, body, resp = await sign_in(w, "alice", http=http)
        assert status == 200
        session_cookie = _cookies(resp)["gw_session"]
    for cookie in (state_cookie, session_cookie):
        parsed = SimpleCookie(cookie)
        morsel = next(iter(parsed.values()))
        assert morsel["httponly"] and morsel["samesite"] == "Lax" and not morsel["secure"], cookie
    assert next(iter(SimpleCookie(state_cookie).values()))["path"] == "/auth/callback/corp"
    assert next(iter(SimpleCookie(session_cookie).values()))["path"] == "/"
    # Behind https (corp-tls): Secure as well. The provider sends the browser to the https URL,
    # which the test then delivers to the gateway itself.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{w.base}/auth/login/corp-tls", allow_redirects=False) as resp:
            state_cookie = _cookies(resp)["gw_signin"]
            to_provider = resp.headers["Location"]
        async with http.get(to_provider, allow_redirects=False) as resp:
            back = urlsplit(resp.headers["Location"])
        assert f"{back.scheme}://{back.netloc}" == TLS_BASE
        state = parse_qs(back.query)["state"][0]
        async with http.get(f"{w.base}{back.path}?{back.query}", headers={"Cookie": f"gw_signin={state}"}) as resp:
            assert resp.status == 200, await resp.text()
            session_cookie = _cookies(resp)["gw_session"]
    for cookie in (state_cookie, session_cookie):
        morsel = next(iter(SimpleCookie(cookie).values()))
        assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Lax", cookie


async def test_no_token_code_or_secret_reaches_the_log(world, caplog):
    w = world
    caplog.set_level(logging.DEBUG)
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.next_user = "alice"
    async with browser() as http:
        callback = await step_to_callback(w, http)
        async with http.get(callback) as resp:
            token = (await resp.json())["token"]
        replayed = callback  # refused: its state is spent
        async with http.get(replayed) as resp:
            assert resp.status == 400
    query = parse_qs(urlsplit(callback).query)
    secrets_seen = [token, query["code"][0], query["state"][0], w.oidc.client_secret]
    assert "sign-in with corp" in caplog.text  # the gateway did log the sign-in
    for secret in secrets_seen:
        assert secret not in caplog.text


async def test_the_flow_on_sqlite(sqlite_url, tmp_path):
    """The embedded default: the same flow, sessions and revocation on a SQLite file."""
    w = await make_world(sqlite_url, tmp_path)
    try:
        w.oidc.add_user("alice", "alice@acme.test")
        w.github.add_user("bob", "bob@acme.test")
        status, alice, _ = await sign_in(w, "alice")
        assert status == 200, alice
        status, bob, _ = await sign_in(w, "bob", "github")
        assert status == 200, bob
        status, listed = await admin(w, "GET", "/sessions", alice["token"])
        assert status == 200 and {s["id"] for s in listed["items"]} == {alice["id"], bob["id"]}
        status, _ = await admin(w, "DELETE", f"/sessions/{bob['id']}", alice["token"])
        assert status == 200
        status, body = await admin(w, "GET", "/users", bob["token"])
        assert status == 401 and "revoked" in body["error"]["message"]
        async with aiohttp.ClientSession() as http:
            async with http.get(w.oidc.authorize_requests[-1]["redirect_uri"] + "?state=x&code=y",
                                headers={"Cookie": "gw_signin=x"}) as resp:
                assert resp.status == 400
    finally:
        await w.gw.gateway.stop()
        await w.oidc.stop()
        await w.github.stop()


async def test_an_unknown_provider_is_404(world):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{world.base}/auth/login/nope", allow_redirects=False) as resp:
            body = await resp.json()
    assert resp.status == 404 and "corp" in body["error"]["message"]


# -- configuration ------------------------------------------------------------------------------
def _load(tmp_path, text: str, env: dict | None = None):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path, env=env or {})


GOOD = """
[signin]
redirect_base_url = "https://admin.example.com"
[[signin.providers]]
name = "corp"
kind = "oidc"
client_id = "id"
client_secret = "secret"
issuer = "https://login.example.com"
"""


def test_signin_configuration(tmp_path):
    cfg = _load(tmp_path, GOOD + '\n[[signin.providers]]\nname = "gh"\nkind = "github"\nclient_id = "a"\n'
                               'client_secret = "b"\n', {"GATEWAY_SIGNIN_SESSION_TTL": "7200"})
    assert [p.name for p in cfg.signin.providers] == ["corp", "gh"]
    assert cfg.signin.session_ttl == 7200 and cfg.signin.state_ttl == 600


@pytest.mark.parametrize(("change", "message"), [
    (("issuer = \"https://login.example.com\"", ""), "an oidc provider needs `issuer`"),
    (("issuer = \"https://login.example.com\"", "issuer = \"http://login.example.com\""), "must be an https:// URL"),
    (("name = \"corp\"", "name = \"Corp/x\""), "URL segment"),
    (("client_secret = \"secret\"", "client_secret = \"\""), "client_id and client_secret are required"),
    (("redirect_base_url = \"https://admin.example.com\"", ""), "set redirect_base_url"),
    (("kind = \"oidc\"", "kind = \"saml\""), "signin.providers[0].kind"),
    (("issuer = \"https://login.example.com\"",
      "issuer = \"https://login.example.com\"\ncreate_users_tenant = \"acme\""), "needs create_users_domains"),
])
def test_signin_configuration_errors(tmp_path, change, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _load(tmp_path, GOOD.replace(*change))


def test_providers_cannot_come_from_the_environment_and_names_are_unique(tmp_path):
    with pytest.raises(config.ConfigError, match=r"set it in the TOML file as \[\[signin.providers\]\]"):
        config.load(None, env={"GATEWAY_SIGNIN_PROVIDERS": "corp"})
    twice = GOOD + GOOD.split("[signin]")[1].split("\n", 2)[2]
    with pytest.raises(config.ConfigError, match="configured twice"):
        _load(tmp_path, twice)
    with pytest.raises(config.ConfigError, match="signin.session_ttl"):
        config.load(None, env={"GATEWAY_SIGNIN_SESSION_TTL": "5"})
