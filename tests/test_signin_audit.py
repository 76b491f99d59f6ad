"""Sign-in and sign-out in the audit trail (controlplane/signin_api.py), on PostgreSQL and SQLite.

The flow is test_signin.py's: real local providers (tests/oauth_provider.py), a
browser with a cookie jar, a gateway with its real writer. What is checked:
a sign-in is one `auth.login` entry and a sign-out one `auth.logout` entry with
who, what, when, how long and how it ended; a sign-in refused to a known user
is an error entry for that user; a callback refused before anyone is
identified, and a sign-out without a working session, are no entry at all;
nothing secret (session token, code, state, PKCE verifier, nonce, ID or access
token) reaches the table or the `gateway.audit` log; the chains verify; with
`[audit] enabled = false` nothing is written.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import sqlalchemy as sa
from test_signin import World, browser, make_world, sign_in, step_to_callback

from gateway.db.engine import create_engine
from gateway.db.tables import audit_logs, signin_states
from gateway.records import chain


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
async def audited(database_url, tmp_path):
    """A sign-in world with the audit trail on, on each database."""
    w = await make_world(database_url, tmp_path, writer={"spill_dir": tmp_path / "spill"})
    try:
        yield w
    finally:
        await w.gw.gateway.stop()
        await w.oidc.stop()
        await w.github.stop()


async def _table(w: World) -> tuple[list[dict], list[chain.ChainReport]]:
    """Every audit entry the writer has taken so far (oldest first), and what `gateway audit verify` finds."""
    await w.gw.gateway.writer.flush()
    engine = create_engine(w.db)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(audit_logs).order_by(audit_logs.c.created_at, audit_logs.c.chain_seq)
            )).mappings().all()
        reports = await chain.verify(engine)
    finally:
        await engine.dispose()
    return [dict(row) for row in rows], reports


async def _signin_entries(w: World) -> list[dict]:
    rows, reports = await _table(w)
    assert reports and all(report.ok for report in reports), reports
    return [row for row in rows if row["action"].startswith("auth.")]


async def _pending_signin(w: World) -> tuple[str, str | None]:
    """The verifier and nonce of the one sign-in waiting for its callback (read to search for them later)."""
    engine = create_engine(w.db)
    try:
        async with engine.connect() as conn:
            (row,) = (await conn.execute(sa.select(signin_states.c.code_verifier, signin_states.c.nonce))).all()
    finally:
        await engine.dispose()
    return row.code_verifier, row.nonce


def _audit_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "gateway.audit"]


async def test_a_sign_in_and_a_sign_out_are_one_entry_each_without_secrets(audited, caplog):
    w = audited
    caplog.set_level(logging.DEBUG)  # every gateway log line, not only the audit's, is searched below
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.next_user = "alice"
    async with browser() as http:
        callback = await step_to_callback(w, http)
        verifier, nonce = await _pending_signin(w)
        async with http.get(callback) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        token, session_id = body["token"], body["id"]
        # Sign-out in the browser: the cookie, from the gateway's own pages.
        async with http.post(f"{w.base}/auth/logout", headers={"Origin": w.base}) as resp:
            assert resp.status == 200, await resp.text()
    # Sign-outs with no working session name nobody: no entry (as the admin API's 401s).
    async with aiohttp.ClientSession() as http:
        for headers, status in (({"Authorization": f"Bearer {token}"}, 401),  # already ended
                                ({}, 401),  # nothing at all
                                ({"Authorization": f"Bearer {w.gw.admin_key}"}, 400)):  # an API key
            async with http.post(f"{w.base}/auth/logout", headers=headers) as resp:
                assert resp.status == status, await resp.text()

    login, logout = await _signin_entries(w)
    for entry in (login, logout):
        assert str(entry["tenant_id"]) == w.acme and str(entry["user_id"]) == w.users["alice"]
        assert entry["role"] == "ADMIN" and entry["api_key_id"] is None
        assert entry["client_ip"] == "127.0.0.1"
        assert entry["outcome"] == "success" and entry["error_code"] is None
        assert entry["duration_ms"] > 0 and entry["created_at"] is not None
        assert entry["resource_type"] == "sessions" and entry["resource_id"] == session_id
    assert login["action"] == "auth.login" and logout["action"] == "auth.logout"
    assert login["details"] == {"method": "GET", "path": "/auth/callback/corp", "status": 200, "provider": "corp",
                                "session_id": session_id}
    assert logout["details"] == {"method": "POST", "path": "/auth/logout", "status": 200, "session_id": session_id}
    assert login["chain_seq"] < logout["chain_seq"]  # in the tenant's chain, in order

    # Nothing secret in the whole table or in any log line, the audit's included.
    query = parse_qs(urlsplit(callback).query)
    secrets_seen = [token, query["code"][0], query["state"][0], verifier, nonce, w.oidc.client_secret,
                    *w.oidc.access_tokens, "eyJ"]  # "eyJ": how every JWT (the ID token) begins
    table_text = repr(await _table(w))
    lines = _audit_lines(caplog)
    logged = [line for line in lines if str(login["id"]) in line or str(logout["id"]) in line]
    assert len(logged) == 2 and '"action":"auth.login"' in logged[0] and '"action":"auth.logout"' in logged[1]
    # (the gateway's own loggers: aiosqlite's DEBUG lines print every SQL parameter, the pending
    # sign-in's verifier among them, whatever the gateway does)
    gateway_text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
    assert "sign-in with corp" in gateway_text
    for secret in secrets_seen:
        assert secret and secret not in table_text, secret
        assert not any(secret in line for line in lines), secret
        assert secret not in gateway_text, secret


async def test_a_bearer_sign_out_names_the_sessions_user(audited):
    w = audited
    w.github.add_user("bob", "bob@acme.test")
    status, body, _ = await sign_in(w, "bob", "github")
    assert status == 200, body
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{w.base}/auth/logout", headers={"Authorization": f"Bearer {body['token']}"}) as resp:
            assert resp.status == 200
    login, logout = await _signin_entries(w)
    assert [login["action"], logout["action"]] == ["auth.login", "auth.logout"]
    assert login["details"]["provider"] == "github"
    for entry in (login, logout):
        assert (str(entry["user_id"]), entry["role"], entry["resource_id"]) == (w.users["bob"], "USER", body["id"])


async def test_a_sign_in_refused_to_a_known_user_is_an_error_entry(audited):
    w = audited
    w.oidc.add_user("alice", "alice@acme.test")
    status, _ = await w.gw.admin("PATCH", f"/users/{w.users['alice']}", {"is_active": False})
    assert status == 200
    status, body, _ = await sign_in(w, "alice")
    assert status == 403 and body["error"]["code"] == "user_inactive", body
    status, _ = await w.gw.admin("PATCH", f"/users/{w.users['alice']}", {"is_active": True})
    assert status == 200
    status, _ = await w.gw.admin("PATCH", f"/tenants/{w.acme}", {"status": "suspended"})
    assert status == 200
    status, body, _ = await sign_in(w, "alice")
    assert status == 403 and body["error"]["code"] == "tenant_suspended", body

    inactive, suspended = await _signin_entries(w)
    for entry, code in ((inactive, "user_inactive"), (suspended, "tenant_suspended")):
        assert entry["action"] == "auth.login" and entry["outcome"] == "error" and entry["error_code"] == 403
        assert str(entry["tenant_id"]) == w.acme and str(entry["user_id"]) == w.users["alice"]
        assert entry["role"] == "ADMIN" and entry["api_key_id"] is None and entry["client_ip"] == "127.0.0.1"
        assert entry["resource_type"] == "sessions" and entry["resource_id"] is None  # no session was opened
        details = entry["details"]
        assert details["provider"] == "corp" and details["status"] == 403 and "session_id" not in details
        assert details["error"]["code"] == code and details["error"]["message"]


async def test_a_callback_refused_before_anyone_is_identified_has_no_entry(audited, caplog):
    w = audited
    caplog.set_level(logging.INFO, logger="gateway.controlplane.signin")
    w.oidc.add_user("alice", "alice@acme.test")
    w.oidc.add_user("stranger", "stranger@elsewhere.test")
    w.oidc.next_user = "alice"
    async with browser() as http:
        callback = await step_to_callback(w, http)
        state = parse_qs(urlsplit(callback).query)["state"][0]
        async with browser() as other:  # no state cookie: login CSRF
            async with other.get(callback) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_state"
        async with http.get(callback.replace(state, state[:-4] + "AAAA")) as resp:  # not this browser's state
            assert resp.status == 400
    async with aiohttp.ClientSession() as http:  # made up, state and cookie alike
        async with http.get(f"{w.base}/auth/callback/corp?code=abc&state={'x' * 43}",
                            headers={"Cookie": f"gw_signin={'x' * 43}"}) as resp:
            assert resp.status == 400
    w.oidc.deny = True  # the person declines at the provider
    status, body, _ = await sign_in(w, "alice")
    assert status == 400 and body["error"]["code"] == "provider_refused", body
    w.oidc.deny, w.oidc.id_token_nonce = False, "from-another-sign-in"  # an ID token not made for this sign-in
    status, body, _ = await sign_in(w, "alice")
    assert status == 400, body
    w.oidc.id_token_nonce = None
    status, body, _ = await sign_in(w, "stranger")  # identified by the provider, but no gateway user
    assert status == 403 and body["error"]["code"] == "unknown_user", body
    assert await _signin_entries(w) == []
    assert "sign-in with corp refused: invalid_state" in caplog.text  # logged as before
    assert "sign-in with corp refused: unknown_user" in caplog.text
    # The same gateway audits a sign-in that works (the refusals above were not merely unseen).
    status, body, _ = await sign_in(w, "alice")
    assert status == 200, body
    (entry,) = await _signin_entries(w)
    assert entry["action"] == "auth.login" and entry["resource_id"] == body["id"]



async def test_a_sign_in_or_out_the_database_would_not_complete_is_an_error_entry(pg_url, tmp_path):
    """A session that cannot be stored (500), a sign-out that finds its session ended meanwhile (401):
    the user was known both times, so both are error entries. Triggers stand in for the failures."""
    w = await make_world(pg_url, tmp_path, writer={"spill_dir": tmp_path / "spill"})
    try:
        w.oidc.add_user("alice", "alice@acme.test")
        await w.sql("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'sessions are refused'; END $$")
        await w.sql("CREATE TRIGGER refuse BEFORE INSERT ON sessions FOR EACH ROW EXECUTE FUNCTION refuse()")
        w.oidc.next_user = "alice"
        async with browser() as http:
            async with http.get(await step_to_callback(w, http)) as resp:
                assert resp.status == 500
        await w.sql("DROP TRIGGER refuse ON sessions")
        status, body, _ = await sign_in(w, "alice")
        assert status == 200, body
        # The sign-out's UPDATE finds nothing to end, as if a revocation had come in between.
        await w.sql("CREATE FUNCTION skip() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
        await w.sql("CREATE TRIGGER skip BEFORE UPDATE ON sessions FOR EACH ROW "
                    "WHEN (NEW.is_active = false) EXECUTE FUNCTION skip()")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{w.base}/auth/logout", headers={"Authorization": f"Bearer {body['token']}"}) as resp:
                assert resp.status == 401
        failed, login, logout = await _signin_entries(w)
        assert (failed["action"], failed["outcome"], failed["error_code"]) == ("auth.login", "error", 500)
        assert str(failed["user_id"]) == w.users["alice"] and failed["resource_id"] is None
        assert failed["details"]["error"] == {"code": "internal_error"}
        assert (login["action"], login["outcome"]) == ("auth.login", "success")
        assert (logout["action"], logout["outcome"], logout["error_code"]) == ("auth.logout", "error", 401)
        assert str(logout["user_id"]) == w.users["alice"] and logout["resource_id"] == body["id"]
        assert logout["details"]["error"]["code"] == "unauthenticated"
    finally:
        await w.gw.gateway.stop()
        await w.oidc.stop()
        await w.github.stop()

async def test_nothing_is_written_with_the_audit_off(pg_url, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.audit")
    w = await make_world(pg_url, tmp_path, audit={"enabled": False})
    try:
        w.oidc.add_user("alice", "alice@acme.test")
        status, body, _ = await sign_in(w, "alice")
        assert status == 200, body
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{w.base}/auth/logout", headers={"Authorization": f"Bearer {body['token']}"}) as resp:
                assert resp.status == 200
        status, _ = await w.gw.admin("PATCH", f"/users/{w.users['alice']}", {"is_active": False})
        assert status == 200
        status, body, _ = await sign_in(w, "alice")
        assert status == 403, body
        rows, _ = await _table(w)
        assert rows == [] and _audit_lines(caplog) == []
    finally:
        await w.gw.gateway.stop()
        await w.oidc.stop()
        await w.github.stop()

