"""System configuration through the admin API and the CLI, and into every process's snapshot.

Real gateways on PostgreSQL (two on one Redis for the change signal): settings
are set, read as the value in force for a tenant (its override, else the
deployment's), overridden, deleted, and every change is in the history with
its version; a sensitive value is stored sealed (the raw rows are read) and no
answer of any route or of the CLI carries it; every invalid write is one 422
naming its fields with nothing written; another tenant's override is not
found exactly like a key nobody set, and a tenant admin cannot write the
deployment's value; a runtime setting written through one process is in
another's `Snapshot.setting` within a second with polling at 60 s, so only the
change signal can carry it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import sqlalchemy as sa

from gateway.auth.sealing import SealError
from gateway.controlplane.system_config import open_value
from gateway.db.tables import system_config, system_config_history
from gateway.snapshot import read_version


async def _tenant(gw, name: str) -> tuple[str, str]:
    """A tenant and an all-scopes key of an ADMIN of it: (tenant id, key)."""
    status, tenant = await gw.admin("POST", "/tenants", {"name": name})
    assert status == 201, tenant
    status, user = await gw.admin("POST", "/users", {"tenant_id": tenant["id"], "username": f"{name}-admin",
                                                     "email": f"{name}-admin@example.com", "role": "ADMIN"})
    assert status == 201, user
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": f"{name}-admin",
                                                       "scopes": ["admin", "read"]})
    assert status == 201, key
    return tenant["id"], key["key"]


def _ours(items) -> list:
    """Leave out the rows the gateway's own jobs keep (records/retention.py), should one have run meanwhile."""
    return [item for item in items if not item["key"].startswith("records.")]


async def _rows(gw, table: sa.Table = system_config) -> list[dict]:
    async with gw.gateway.engine.connect() as conn:
        return _ours(dict(r) for r in (await conn.execute(sa.select(table))).mappings())


async def _within(predicate, limit: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < limit, "the change never arrived"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# -- set, read, override, delete, history ----------------------------------------------------------------------
async def test_settings_are_set_read_overridden_deleted_and_versioned(gateway):
    gw = gateway
    acme, acme_key = await _tenant(gw, "acme")
    globex, globex_key = await _tenant(gw, "globex")
    before = await read_version(gw.gateway.engine)

    status, made = await gw.admin("PUT", "/config/ui.banner", {"value": {"text": "welcome", "level": 1},
                                                              "category": "ui", "description": "shown on sign-in"})
    assert status == 200, made
    assert made["key"] == "ui.banner" and made["tenant_id"] is None and made["scope"] == "default"
    assert (made["value"], made["category"], made["description"]) == ({"text": "welcome", "level": 1}, "ui",
                                                                      "shown on sign-in")
    assert (made["version"], made["sensitive"], made["set"], made["runtime"], made["applies"]) == (
        1, False, True, True, "at runtime")
    assert await read_version(gw.gateway.engine) > before  # a configuration change like any other

    # Everyone's value in force is the deployment's until a tenant overrides it.
    for key in (acme_key, globex_key, None):
        status, got = await gw.admin("GET", "/config/ui.banner", key=key)
        assert status == 200 and got["source"] == "default" and got["value"]["text"] == "welcome", got
    # The operator overrides it for acme: the override takes category and description from the default.
    status, override = await gw.admin("PUT", "/config/ui.banner", {"value": "acme's banner", "tenant_id": acme})
    assert status == 200, override
    assert (override["tenant_id"], override["scope"], override["version"], override["category"],
            override["description"]) == (acme, "tenant", 1, "ui", "shown on sign-in")
    status, got = await gw.admin("GET", "/config/ui.banner", key=acme_key)
    assert (got["source"], got["value"], got["for_tenant_id"]) == ("tenant", "acme's banner", acme)
    status, got = await gw.admin("GET", "/config/ui.banner", key=globex_key)
    assert (got["source"], got["value"]["text"]) == ("default", "welcome")
    status, got = await gw.admin("GET", f"/config/ui.banner?tenant_id={acme}")
    assert (got["source"], got["value"]) == ("tenant", "acme's banner")
    status, got = await gw.admin("GET", "/config/ui.banner?tenant_id=default")
    assert (got["source"], got["tenant_id"]) == ("default", None)
    # Acme's admin changes its own override (no tenant_id: its own tenant's), never the default.
    status, changed = await gw.admin("PUT", "/config/ui.banner", {"value": "acme v2"}, key=acme_key)
    assert status == 200 and (changed["tenant_id"], changed["version"], changed["value"]) == (acme, 2, "acme v2")

    # The operator changes the default: version 2, kept in the history with who did it.
    status, changed = await gw.admin("PUT", "/config/ui.banner", {"value": {"text": "hello"}, "runtime": False})
    assert status == 200 and changed["version"] == 2 and changed["applies"] == "after a restart", changed
    assert changed["category"] == "ui"  # left out: kept
    status, page = await gw.admin("GET", "/config/ui.banner/history")
    assert status == 200, page
    assert [(h["version"], h["change"], h["value"]) for h in page["items"]] == [
        (2, "set", {"text": "hello"}), (1, "set", {"text": "welcome", "level": 1})]
    assert all(h["tenant_id"] is None and h["changed_by"] for h in page["items"])

    # Deleting acme's override: the default applies to acme again; the history says so and keeps counting.
    status, gone = await gw.admin("DELETE", "/config/ui.banner", key=acme_key)
    assert status == 200 and gone["value"] == "acme v2", gone
    status, got = await gw.admin("GET", "/config/ui.banner", key=acme_key)
    assert (got["source"], got["value"]) == ("default", {"text": "hello"})
    status, again = await gw.admin("DELETE", "/config/ui.banner", key=acme_key)
    assert status == 404 and again["error"]["message"] == "setting 'ui.banner' not found"
    status, made = await gw.admin("PUT", "/config/ui.banner", {"value": "acme v4", "tenant_id": acme})
    assert made["version"] == 4
    status, page = await gw.admin("GET", "/config/ui.banner/history", key=acme_key)
    assert [(h["version"], h["change"], h["set"]) for h in page["items"]] == [
        (4, "set", True), (3, "delete", False), (2, "set", True), (1, "set", True)]
    status, same = await gw.admin("GET", f"/config/ui.banner/history?tenant_id={acme}")
    assert same == page
    # Paged by version, newest first.
    status, first = await gw.admin("GET", "/config/ui.banner/history?limit=3", key=acme_key)
    assert [h["version"] for h in first["items"]] == [4, 3, 2] and first["next_cursor"] == "2"
    status, rest = await gw.admin("GET", "/config/ui.banner/history?limit=3&cursor=2", key=acme_key)
    assert [h["version"] for h in rest["items"]] == [1] and rest["next_cursor"] is None

    # Lists: everything for the operator; filters by tenant (or the defaults) and category; pages by id.
    status, other = await gw.admin("PUT", "/config/gateway.motd", {"value": "maintenance at 5"})
    assert status == 200 and other["category"] == "general"
    status, page = await gw.admin("GET", "/config")
    assert {(s["key"], s["tenant_id"]) for s in _ours(page["items"])} == {
        ("ui.banner", None), ("ui.banner", acme), ("gateway.motd", None)}
    status, page = await gw.admin("GET", "/config?category=ui")
    assert {(s["key"], s["tenant_id"]) for s in _ours(page["items"])} == {("ui.banner", None), ("ui.banner", acme)}
    status, page = await gw.admin("GET", f"/config?tenant_id={acme}")
    assert [(s["key"], s["tenant_id"]) for s in _ours(page["items"])] == [("ui.banner", acme)]
    status, page = await gw.admin("GET", "/config?tenant_id=default")
    assert {s["key"] for s in _ours(page["items"])} == {"ui.banner", "gateway.motd"}
    assert all(s["tenant_id"] is None for s in _ours(page["items"]))
    # Acme's admin: the deployment's values and its own overrides.
    status, page = await gw.admin("GET", "/config", key=acme_key)
    assert {(s["key"], s["tenant_id"]) for s in _ours(page["items"])} == {
        ("ui.banner", None), ("ui.banner", acme), ("gateway.motd", None)}
    seen, cursor = [], None
    while True:
        status, page = await gw.admin("GET", "/config?limit=1" + (f"&cursor={cursor}" if cursor else ""),
                                      key=acme_key)
        assert status == 200 and len(page["items"]) <= 1, page
        seen += [s["id"] for s in _ours(page["items"])]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 3 and seen == sorted(seen)

    # The operator deletes the default: no value anywhere for globex, acme keeps its override.
    status, _ = await gw.admin("DELETE", "/config/ui.banner")
    assert status == 200
    assert (await gw.admin("GET", "/config/ui.banner", key=globex_key))[0] == 404
    assert (await gw.admin("GET", "/config/ui.banner", key=acme_key))[1]["value"] == "acme v4"
    status, page = await gw.admin("GET", "/config/ui.banner/history")
    assert [(h["version"], h["change"]) for h in page["items"]][0] == (3, "delete")


async def test_json_values_of_every_kind_round_trip(gateway):
    for i, value in enumerate([0, -1.5, True, False, None, "", "text", [], [1, "two", None], {"a": {"b": [1]}}]):
        status, made = await gateway.admin("PUT", f"/config/kind.k{i}", {"value": value})
        assert status == 200 and made["value"] == value, (value, made)
        status, got = await gateway.admin("GET", f"/config/kind.k{i}")
        assert got["value"] == value and got["set"] is True, (value, got)


# -- sensitive values ------------------------------------------------------------------------------------------
SECRET = "hunter2-very-secret-value"
TENANT_SECRET = "acme-own-secret-value"


async def test_sensitive_values_are_sealed_and_never_shown(gateway):
    gw = gateway
    acme, acme_key = await _tenant(gw, "acme")
    status, made = await gw.admin("PUT", "/config/smtp.password", {"value": {"password": SECRET}, "sensitive": True,
                                                                  "category": "mail"})
    assert status == 200, made
    assert (made["value"], made["sensitive"], made["set"]) == (None, True, True)
    # Acme's admin overrides it: the override is sensitive too (taken from the default).
    status, override = await gw.admin("PUT", "/config/smtp.password", {"value": TENANT_SECRET}, key=acme_key)
    assert status == 200 and override["sensitive"] is True and override["value"] is None, override
    status, _ = await gw.admin("PUT", "/config/smtp.password", {"value": {"password": SECRET + "-2"}})
    assert status == 200

    # No answer of any route carries either value.
    answers = []
    for key in (None, acme_key):
        for path in ("/config", "/config/smtp.password", "/config/smtp.password?tenant_id=default",
                     "/config/smtp.password/history", "/config?category=mail"):
            status, body = await gw.admin("GET", path, key=key)
            assert status == 200, (path, body)
            answers.append(json.dumps(body))
    status, body = await gw.admin("GET", f"/config/smtp.password/history?tenant_id={acme}")
    answers.append(json.dumps(body))
    assert [h["value"] for h in body["items"]] == [None] and body["items"][0]["sensitive"] is True
    for text in answers:
        assert SECRET not in text and TENANT_SECRET not in text and "gwc1." not in text, text
    status, got = await gw.admin("GET", "/config/smtp.password")
    assert (got["value"], got["sensitive"], got["set"], got["version"]) == (None, True, True, 2)

    # Stored sealed: the value column empty, the sealed text opaque and bound to its row.
    rows = await _rows(gw)
    history = await _rows(gw, system_config_history)
    assert len(rows) == 2 and len(history) == 3
    for row in rows + history:
        assert row["value"] is None and row["value_sealed"].startswith("gwc1."), row
        assert SECRET not in row["value_sealed"] and TENANT_SECRET not in row["value_sealed"]
    secrets = gw.gateway.secrets
    by_tenant = {str(r["tenant_id"]) if r["tenant_id"] else None: r for r in rows}
    assert open_value(by_tenant[None], secrets) == {"password": SECRET + "-2"}
    assert open_value(by_tenant[acme], secrets) == TENANT_SECRET
    with pytest.raises(SealError):  # moved to another row, it does not open
        open_value({**by_tenant[acme], "id": by_tenant[None]["id"]}, secrets)
    # The data plane holds none of it.
    store = gw.gateway.store
    await store.refresh()
    assert store.current.setting("smtp.password", uuid.UUID(acme), "none") == "none"
    assert store.current.setting("smtp.password", None, "none") == "none"
    assert SECRET not in repr(store.current.settings) and TENANT_SECRET not in repr(store.current.settings)

    # Made not sensitive again, by giving a new value in clear.
    status, plain = await gw.admin("PUT", "/config/smtp.password", {"value": "public", "sensitive": False})
    assert status == 200 and (plain["value"], plain["sensitive"]) == ("public", False)
    status, page = await gw.admin("GET", "/config/smtp.password/history")
    assert [(h["version"], h["value"], h["sensitive"]) for h in page["items"]] == [
        (3, "public", False), (2, None, True), (1, None, True)]


# -- validation ------------------------------------------------------------------------------------------------
async def test_invalid_writes_are_422_naming_the_field_and_write_nothing(gateway):
    gw = gateway
    acme, acme_key = await _tenant(gw, "acme")
    version = await read_version(gw.gateway.engine)
    big = "x" * 65_536
    cases = [
        ("Bad.Key", {"value": 1}, {"key"}),
        ("9lives", {"value": 1}, {"key"}),
        ("k" * 129, {"value": 1}, {"key"}),
        ("ok.key", {"value": big}, {"value"}),
        ("ok.key", {}, {"value"}),
        ("ok.key", {"value": 1, "category": "Not OK"}, {"category"}),
        ("ok.key", {"value": 1, "category": ""}, {"category"}),
        ("ok.key", {"value": 1, "sensitive": "yes"}, {"sensitive"}),
        ("ok.key", {"value": 1, "runtime": 1}, {"runtime"}),
        ("ok.key", {"value": 1, "description": "d" * 1001}, {"description"}),
        ("ok.key", {"value": 1, "tenant_id": "acme"}, {"tenant_id"}),
        ("ok.key", {"value": 1, "colour": "red"}, {"colour"}),
        ("ok.key", {"category": "BAD", "sensitive": 3, "extra": 1}, {"value", "category", "sensitive", "extra"}),
    ]
    for key, body, fields in cases:
        for who in (None, acme_key):
            status, answer = await gw.admin("PUT", f"/config/{key}", body, key=who)
            assert status == 422, (key, body, answer)
            assert {e["field"] for e in answer["error"]["details"]} == fields, (key, body, answer)
    # Not a JSON object at all.
    status, answer = await gw.admin("PUT", "/config/ok.key", [1, 2])
    assert status == 422 and answer["error"]["details"][0]["field"] == "$"
    # Reading and deleting name a bad key, a bad filter or a bad cursor the same way.
    for method, path, field in (
        ("GET", "/config/Bad.Key", "key"), ("DELETE", "/config/Bad.Key", "key"),
        ("GET", "/config/Bad.Key/history", "key"), ("GET", "/config?category=Not%20OK", "category"),
        ("GET", "/config?tenant_id=acme", "tenant_id"), ("GET", "/config/ok.key?tenant_id=acme", "tenant_id"),
        ("GET", "/config/ok.key/history?cursor=abc", "cursor"), ("GET", "/config?limit=0", "limit"),
    ):
        status, answer = await gw.admin(method, path)
        assert status == 422 and [e["field"] for e in answer["error"]["details"]] == [field], (path, answer)
    # Just under the cap is fine (the cap is on the JSON text: two quotes).
    status, _ = await gw.admin("PUT", "/config/ok.key", {"value": "x" * (65_536 - 2)})
    assert status == 200
    status, _ = await gw.admin("DELETE", "/config/ok.key")
    assert status == 200
    assert await read_version(gw.gateway.engine) == version + 2  # only the two good writes
    assert [r["key"] for r in await _rows(gw, system_config_history)] == ["ok.key", "ok.key"]
    assert await _rows(gw) == []


# -- tenant isolation ------------------------------------------------------------------------------------------
async def test_another_tenants_override_is_not_found_and_defaults_are_the_operators(gateway):
    gw = gateway
    acme, acme_key = await _tenant(gw, "acme")
    globex, globex_key = await _tenant(gw, "globex")
    status, _ = await gw.admin("PUT", "/config/globex.only", {"value": "globex-private-value"}, key=globex_key)
    assert status == 200
    status, _ = await gw.admin("PUT", "/config/feature.flag", {"value": False})
    assert status == 200
    status, _ = await gw.admin("PUT", "/config/feature.flag", {"value": True}, key=globex_key)
    assert status == 200
    nobody = str(uuid.uuid4())

    async def same(method: str, path: str, other: str, body=None) -> tuple[int, dict]:
        """Acme's admin on globex's thing and on a thing nobody has: the same answer."""
        theirs = await gw.admin(method, path, body, key=acme_key)
        missing = await gw.admin(method, other, body if body is None else {**body, "tenant_id": nobody}
                                 if "tenant_id" in body else body, key=acme_key)
        assert theirs[0] == missing[0] == 404, (path, theirs, missing)
        assert json.dumps(theirs[1]).replace("globex.only", "K") == json.dumps(missing[1]).replace("no.body", "K")
        return theirs

    await same("GET", "/config/globex.only", "/config/no.body")
    await same("GET", "/config/globex.only/history", "/config/no.body/history")
    await same("DELETE", "/config/globex.only", "/config/no.body")
    await same("GET", f"/config/globex.only?tenant_id={globex}", f"/config/globex.only?tenant_id={nobody}")
    await same("GET", f"/config/globex.only/history?tenant_id={globex}",
               f"/config/globex.only/history?tenant_id={nobody}")
    await same("DELETE", f"/config/feature.flag?tenant_id={globex}", f"/config/feature.flag?tenant_id={nobody}")
    await same("PUT", "/config/feature.flag", "/config/feature.flag", {"value": "probe", "tenant_id": globex})
    # Listing: the deployment's values and acme's own; asking for globex's finds nothing.
    status, page = await gw.admin("GET", "/config", key=acme_key)
    assert [(s["key"], s["tenant_id"]) for s in _ours(page["items"])] == [("feature.flag", None)]
    status, page = await gw.admin("GET", f"/config?tenant_id={globex}", key=acme_key)
    assert status == 200 and page["items"] == []
    # Acme's value in force is the default, not globex's override.
    status, got = await gw.admin("GET", "/config/feature.flag", key=acme_key)
    assert (got["source"], got["value"]) == ("default", False)

    # A tenant admin never writes the deployment's value: naming it is 403; leaving tenant_id out writes its own.
    status, answer = await gw.admin("PUT", "/config/feature.flag", {"value": "probe", "tenant_id": None}, key=acme_key)
    assert status == 403 and "operator" in answer["error"]["message"], answer
    for path in ("/config/feature.flag?tenant_id=default", "/config/feature.flag/history?tenant_id=default"):
        status, answer = await gw.admin("DELETE" if "history" not in path else "GET", path, key=acme_key)
        assert status == 403, (path, answer)
    status, own = await gw.admin("PUT", "/config/feature.flag", {"value": "acme's"}, key=acme_key)
    assert status == 200 and own["tenant_id"] == acme

    # Nothing of globex's, and not the default, changed.
    status, got = await gw.admin("GET", f"/config/feature.flag?tenant_id={globex}")
    assert (got["source"], got["value"], got["version"]) == ("tenant", True, 1)
    status, got = await gw.admin("GET", "/config/feature.flag?tenant_id=default")
    assert (got["value"], got["version"]) == (False, 1)
    status, got = await gw.admin("GET", "/config/globex.only", key=globex_key)
    assert got["value"] == "globex-private-value"
    rows = await _rows(gw)
    assert sorted((r["key"], str(r["tenant_id"])) for r in rows) == sorted([
        ("globex.only", globex), ("feature.flag", "None"), ("feature.flag", globex), ("feature.flag", acme)])
    # Keys the gateway's own jobs keep (records/retention.py: the audit anchor) are read-only, to everyone.
    from gateway.records.retention import _put_system_value

    async with gw.gateway.engine.begin() as conn:
        await _put_system_value(conn, uuid.UUID(acme), "records.audit_anchor", {"chain_seq": 7}, "anchor")
    status, got = await gw.admin("GET", "/config/records.audit_anchor", key=acme_key)
    assert status == 200 and got["value"] == {"chain_seq": 7}, got
    for who in (acme_key, None):
        for method, path, body in (("PUT", "/config/records.audit_anchor", {"value": {"chain_seq": 99}}),
                                   ("DELETE", f"/config/records.audit_anchor?tenant_id={acme}", None)):
            status, answer = await gw.admin(method, path, body, key=who)
            assert status == 403 and "kept by the gateway" in answer["error"]["message"], (method, answer)
    status, got = await gw.admin("GET", "/config/records.audit_anchor", key=acme_key)
    assert got["value"] == {"chain_seq": 7}

    # Roles other than ADMIN neither read nor write configuration (tests/test_permissions.py: every role).
    status, user = await gw.admin("POST", "/users", {"tenant_id": acme, "username": "acme-user",
                                                     "email": "acme-user@example.com", "role": "USER"})
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": "u", "scopes": ["read"]})
    assert (await gw.admin("GET", "/config/feature.flag", key=key["key"]))[0] == 403


# -- the change reaches every process --------------------------------------------------------------------------
async def test_a_runtime_setting_reaches_another_gateway_within_a_second(
    pg_url, redis_url, redis_prefix, make_gateway
):
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    # Polling every 60 s: only the change signal can deliver within the test.
    a = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    b = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    await asyncio.sleep(0.2)  # both subscribed
    acme, acme_key = await _tenant(a, "acme")
    tenant = uuid.UUID(acme)
    store = b.gateway.store
    await _within(lambda: tenant in store.current.tenants)

    def seen(key: str, tenant_id=None):
        return store.current.setting(key, tenant_id, "unset")

    assert seen("limits.note") == "unset"
    status, _ = await a.admin("PUT", "/config/limits.note", {"value": {"max": 5}})
    assert status == 200
    took = await _within(lambda: seen("limits.note") == {"max": 5})
    assert took < 1.0
    assert seen("limits.note", tenant) == {"max": 5}  # the deployment's value, for every tenant

    status, _ = await a.admin("PUT", "/config/limits.note", {"value": {"max": 9}}, key=acme_key)
    assert status == 200
    assert await _within(lambda: seen("limits.note", tenant) == {"max": 9}) < 1.0
    assert seen("limits.note") == {"max": 5} and seen("limits.note", uuid.uuid4()) == {"max": 5}

    # Not runtime, or sensitive: stored, signalled, but not in the data plane's snapshot.
    version = store.current.version
    status, _ = await a.admin("PUT", "/config/boot.only", {"value": 1, "runtime": False})
    assert status == 200
    status, _ = await a.admin("PUT", "/config/limits.note", {"value": "s3cret", "sensitive": True}, key=acme_key)
    assert status == 200
    await _within(lambda: store.current.version >= version + 2)
    assert seen("boot.only") == "unset"
    assert seen("limits.note", tenant) == "unset"  # acme's override is sensitive: not the default either
    assert "s3cret" not in repr(store.current.settings)
    # Deleting acme's override: the default is acme's again; deleting that: nothing.
    status, _ = await a.admin("DELETE", "/config/limits.note", key=acme_key)
    assert status == 200
    assert await _within(lambda: seen("limits.note", tenant) == {"max": 5}) < 1.0
    status, _ = await a.admin("DELETE", "/config/limits.note")
    assert status == 200
    assert await _within(lambda: seen("limits.note", tenant) == "unset") < 1.0


# -- the CLI ---------------------------------------------------------------------------------------------------
def _cli(pg_url: str, *argv: str, stdin: str | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_DATABASE_URL=pg_url, **env_extra)
    return subprocess.run([sys.executable, "-m", "gateway", *argv], env=env, capture_output=True, text=True,
                          input=stdin, timeout=60)


async def test_config_on_the_command_line(pg_url, redis_url, redis_prefix, make_gateway):
    # A gateway polling every 60 s: the CLI's own change signal must bring it the change.
    gw = await make_gateway(pg_url, redis={"url": redis_url, "key_prefix": redis_prefix},
                            snapshot={"poll_interval": 60})
    acme, _ = await _tenant(gw, "acme")
    redis_env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_KEY_PREFIX": redis_prefix}
    store = gw.gateway.store

    async def cli(*argv: str, stdin: str | None = None, **env) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(_cli, pg_url, *argv, stdin=stdin, **{**redis_env, **env})

    made = await cli("config", "set", "ui.theme", "dark", "--category", "ui", "--description", "colours")
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines() == ["config_key=ui.theme", "version=1"]
    assert "applies at runtime" in made.stderr
    await _within(lambda: store.current.setting("ui.theme") == "dark", limit=1.0)
    made = await cli("config", "set", "ui.theme", '{"name": "light", "contrast": 2}', "--tenant", acme)
    assert made.returncode == 0, made.stderr
    await _within(lambda: store.current.setting("ui.theme", uuid.UUID(acme)) == {"name": "light", "contrast": 2},
                  limit=1.0)
    made = await cli("config", "set", "boot.workers", "4", "--no-runtime")
    assert made.returncode == 0 and "applies after a restart" in made.stderr, made.stderr
    status, got = await gw.admin("GET", "/config/boot.workers")
    assert (got["value"], got["runtime"]) == (4, False)

    # A sensitive value: from stdin only, stored sealed, never printed.
    refused = await cli("config", "set", "smtp.password", SECRET, "--sensitive")
    assert refused.returncode == 2 and "stdin" in refused.stderr and SECRET not in refused.stderr
    made = await cli("config", "set", "smtp.password", "--sensitive", "--category", "mail", stdin=SECRET + "\n")
    assert made.returncode == 0, made.stderr
    assert SECRET not in made.stdout + made.stderr
    (row,) = [r for r in await _rows(gw) if r["key"] == "smtp.password"]
    assert row["value"] is None and row["value_sealed"].startswith("gwc1.") and SECRET not in row["value_sealed"]
    assert open_value(row, gw.gateway.secrets) == SECRET  # sealed under the gateway's own secret

    listed = await cli("config", "list")
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if not line.startswith("records.")]
    assert len(lines) == 4 and SECRET not in listed.stdout
    assert [line.split()[0] for line in lines] == ["boot.workers", "smtp.password", "ui.theme", "ui.theme"]
    assert "(sensitive, set)" in lines[1] and '"dark"' in lines[2] and acme in lines[3] and "light" in lines[3]
    listed = await cli("config", "list", "--tenant", acme)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["ui.theme"]
    listed = await cli("config", "list", "--category", "mail")
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["smtp.password"]

    shown = await cli("config", "get", "ui.theme", "--tenant", acme)
    assert shown.returncode == 0 and '"light"' in shown.stdout and "stored: tenant" in shown.stdout, shown
    shown = await cli("config", "get", "smtp.password")
    assert shown.returncode == 0 and "(sensitive, set)" in shown.stdout and SECRET not in shown.stdout
    shown = await cli("config", "get", "snapshot.poll_interval")  # the file/env configuration, as before
    assert shown.returncode == 0 and "GATEWAY_SNAPSHOT_POLL_INTERVAL" in shown.stdout

    made = await cli("config", "set", "smtp.password", "--sensitive", stdin="another-secret\n")
    assert made.returncode == 0 and made.stdout.splitlines()[1] == "version=2"
    history = await cli("config", "history", "smtp.password")
    assert history.returncode == 0, history.stderr
    assert [line.split()[0] for line in history.stdout.splitlines()] == ["v2", "v1"]
    assert SECRET not in history.stdout and "another-secret" not in history.stdout

    gone = await cli("config", "delete", "ui.theme", "--tenant", acme)
    assert gone.returncode == 0 and "ui.theme" in gone.stderr, gone.stderr
    await _within(lambda: store.current.setting("ui.theme", uuid.UUID(acme)) == "dark", limit=1.0)
    history = await cli("config", "history", "ui.theme", "--tenant", acme)
    assert [line.split()[2] for line in history.stdout.splitlines()] == ["delete", "set"]

    for argv, said in (
        (("config", "set", "Bad.Key", "1"), "key"),
        (("config", "set", "ok.key", "1", "--category", "Bad Category"), "category"),
        (("config", "set", "ok.key"), "value"),
        (("config", "set", "ok.key", "1", "--tenant", "acme"), "tenant_id"),
        (("config", "delete", "no.such"), "not found"),
        (("config", "history", "no.such"), "not found"),
    ):
        refused = await cli(*argv)
        assert refused.returncode == 2 and said in refused.stderr, (argv, refused.stderr)
    assert not [r for r in await _rows(gw) if r["key"] == "ok.key"]
