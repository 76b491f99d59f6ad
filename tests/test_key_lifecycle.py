"""API keys over their life: rotation with a grace period, limits, last use, revocation everywhere, legacy imports.

Real PostgreSQL, Redis, the demo MCP server, and (for revocation) two
`gateway serve` processes serving traffic at the same time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import aiohttp
import asyncpg
import pytest
from harness import GENEROUS_LIMITS, free_port, wait_for_port

from gateway.controlplane import service
from gateway.dataplane import jsonrpc
from gateway.db.engine import create_engine

ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
LEGACY_KEY = "sk-live-4f9a2c1e7b3d8a6f0e5c"


async def call(endpoint: str, key: str) -> tuple[int, dict | None]:
    """initialize on `endpoint` with `key`: the status, and the JSON-RPC error if refused."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            endpoint, json=INIT, headers={"Authorization": f"Bearer {key}", "Accept": ACCEPT}
        ) as resp:
            body = await resp.read()
            if resp.status >= 400 and resp.content_type == "application/json":
                return resp.status, (await resp.json())["error"]
            return resp.status, None


async def _rows(pg_url: str, sql: str, *args):
    conn = await asyncpg.connect(pg_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


# -- rotation ------------------------------------------------------------------------------------------------
async def test_rotation_keeps_the_old_key_for_its_grace_period(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream, scopes=["proxy", "read"], rate_limit_per_hour=77,
                              rate_limit_per_day=777)
    before = datetime.now(timezone.utc)
    status, new = await gateway.admin("POST", f"/api-keys/{t.api_key_id}/rotate", {"grace_seconds": 2})
    assert status == 201, new
    assert new["key"].startswith("gw_") and new["key"] != t.api_key
    assert new["id"] != t.api_key_id and new["replaces"]["id"] == t.api_key_id
    for field, value in (("user_id", t.user_id), ("tenant_id", t.tenant_id), ("name", "acme-key"),
                         ("scopes", ["proxy", "read"]), ("rate_limit_per_hour", 77), ("rate_limit_per_day", 777)):
        assert new[field] == value, field
    until = datetime.fromisoformat(new["replaces"]["valid_until"])
    assert before + timedelta(seconds=1.5) < until < before + timedelta(seconds=4)

    # Both work during the grace period.
    assert (await call(t.endpoint, new["key"]))[0] == 200
    assert (await call(t.endpoint, t.api_key))[0] == 200
    _, page = await gateway.admin("GET", "/api-keys")
    (old,) = [k for k in page["items"] if k["id"] == t.api_key_id]
    assert old["replaced_by"] == new["id"] and old["is_active"] is True

    await asyncio.sleep(max(0.0, (until - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    status, error = await call(t.endpoint, t.api_key)
    assert status == 401 and "rotated" in error["message"] and "replacement" in error["message"]
    assert (await call(t.endpoint, new["key"]))[0] == 200


async def test_rotation_default_grace_and_bounds(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, keys={"rotation_grace": 600, "rotation_grace_max": 3600})
    t = await gw.tenancy("acme", mcp_upstream)
    status, body = await gw.admin("POST", f"/api-keys/{t.api_key_id}/rotate", {"grace_seconds": 3601})
    assert status == 422 and body["error"]["details"][0]["field"] == "grace_seconds"
    status, body = await gw.admin("POST", f"/api-keys/{t.api_key_id}/rotate", {"grace_seconds": -1})
    assert status == 422

    before = datetime.now(timezone.utc)
    status, new = await gw.admin("POST", f"/api-keys/{t.api_key_id}/rotate")  # no body: keys.rotation_grace
    assert status == 201
    until = datetime.fromisoformat(new["replaces"]["valid_until"])
    assert before + timedelta(seconds=590) < until < before + timedelta(seconds=610)
    # A key is rotated once; its replacement is what gets rotated next.
    status, body = await gw.admin("POST", f"/api-keys/{t.api_key_id}/rotate")
    assert status == 409 and new["id"] in body["error"]["message"]
    status, newer = await gw.admin("POST", f"/api-keys/{new['id']}/rotate", {"grace_seconds": 0})
    assert status == 201
    # Grace 0: the replaced key stops at once.
    status, error = await call(t.endpoint, new["key"])
    assert status == 401 and "rotated" in error["message"]
    assert (await call(t.endpoint, newer["key"]))[0] == 200
    # A revoked key cannot be rotated back to life.
    await gw.admin("DELETE", f"/api-keys/{newer['id']}")
    status, body = await gw.admin("POST", f"/api-keys/{newer['id']}/rotate")
    assert status == 409 and "revoked" in body["error"]["message"]


async def test_gateway_keys_rotate_on_the_command_line(pg_url, gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    env = {**os.environ, "GATEWAY_DATABASE_URL": pg_url}
    env = {k: v for k, v in env.items() if not k.startswith("GATEWAY_") or k == "GATEWAY_DATABASE_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "keys", "rotate", t.api_key_id, "--grace", "60",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = dict(line.split("=", 1) for line in out.decode().splitlines())
    assert set(lines) == {"api_key_id", "api_key", "old_key_valid_until"}
    await gateway.gateway.store.refresh()  # the CLI wrote to the database; the poll would catch it within 0.2 s
    assert (await call(t.endpoint, lines["api_key"]))[0] == 200
    assert (await call(t.endpoint, t.api_key))[0] == 200  # in its grace period


# -- limits --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hour", "day", "bad"),
    [(1, 1, set()), (100_000, 1_000_000, set()), (0, 1, {"rate_limit_per_hour"}),
     (100_001, 1_000_001, {"rate_limit_per_hour", "rate_limit_per_day"}), (5, 0, {"rate_limit_per_day"})],
)
async def test_key_limits_are_bounded(gateway, hour, day, bad):
    _, tenant = await gateway.admin("POST", "/tenants", {"name": "acme"})
    _, user = await gateway.admin("POST", "/users", {"tenant_id": tenant["id"], "username": "u",
                                                     "email": "u@acme.test"})
    status, body = await gateway.admin("POST", "/api-keys", {"user_id": user["id"], "name": "k",
                                                             "rate_limit_per_hour": hour, "rate_limit_per_day": day})
    if bad:
        assert status == 422 and {d["field"] for d in body["error"]["details"]} == bad
    else:
        assert status == 201 and (body["rate_limit_per_hour"], body["rate_limit_per_day"]) == (hour, day)


async def test_the_database_refuses_limits_out_of_bounds_too(gateway, pg_url, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    for column, value in (("rate_limit_per_hour", 0), ("rate_limit_per_hour", 100_001),
                          ("rate_limit_per_day", 1_000_001)):
        with pytest.raises(asyncpg.CheckViolationError):
            await _rows(pg_url, f"UPDATE enhanced_api_keys SET {column} = $1 WHERE id = $2", value,
                        uuid.UUID(t.api_key_id))


# -- last use --------------------------------------------------------------------------------------------------
async def test_last_used_at_is_written_in_one_update_per_flush(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, keys={"last_used_flush_interval": 3600})  # flushed by hand below
    usage = gw.gateway.key_usage
    a = await gw.tenancy("acme", mcp_upstream)
    b = await gw.tenancy("globex", mcp_upstream)
    idle = await gw.tenancy("initech", mcp_upstream)
    await usage.flush()  # the operator's admin calls above
    flushes = usage.flushes
    (version_before,) = await _rows(pg_url, "SELECT version FROM config_state")
    stamps = {r["id"]: r["updated_at"] for r in await _rows(pg_url, "SELECT id, updated_at FROM enhanced_api_keys")}

    for _ in range(10):
        for t in (a, b):
            assert (await call(t.endpoint, t.api_key))[0] == 200
    assert usage.flushes == flushes  # twenty requests, no database write yet
    before = datetime.now(timezone.utc)
    await usage.flush()
    assert usage.flushes == flushes + 1  # one statement for both keys

    _, page = await gw.admin("GET", "/api-keys")
    used = {k["id"]: k["last_used_at"] for k in page["items"]}
    for t in (a, b):
        assert before - timedelta(seconds=1) <= datetime.fromisoformat(used[t.api_key_id]) <= before + timedelta(5)
    assert used[idle.api_key_id] is None
    # Not a configuration change: no version bump, updated_at untouched.
    assert (await _rows(pg_url, "SELECT version FROM config_state"))[0] == version_before
    for row in await _rows(pg_url, "SELECT id, updated_at FROM enhanced_api_keys"):
        if str(row["id"]) in (a.api_key_id, b.api_key_id):
            assert row["updated_at"] == stamps[row["id"]]


async def test_last_used_at_is_flushed_in_the_background(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, keys={"last_used_flush_interval": 0.2})
    t = await gw.tenancy("acme", mcp_upstream)
    assert (await call(t.endpoint, t.api_key))[0] == 200
    deadline = time.monotonic() + 5
    while True:
        _, page = await gw.admin("GET", "/api-keys")
        if next(k for k in page["items"] if k["id"] == t.api_key_id)["last_used_at"] is not None:
            break
        assert time.monotonic() < deadline, "last_used_at was never written"
        await asyncio.sleep(0.1)


# -- revocation across processes ------------------------------------------------------------------------------
class ServeProcess:
    """`gateway serve` in its own process, on ports chosen here."""

    def __init__(self, pg_url: str, redis_url: str, prefix: str, log_path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({
            "GATEWAY_DATABASE_URL": pg_url, "GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_KEY_PREFIX": prefix,
            "GATEWAY_DATAPLANE_PORT": str(self.port), "GATEWAY_CONTROLPLANE_PORT": str(self.admin_port),
            # Only the Redis signal can bring the change within the test's bound.
            "GATEWAY_SNAPSHOT_POLL_INTERVAL": "60",
            **GENEROUS_LIMITS,
            # Every call of the traffic below is an `initialize` that opens a session it never ends: on a fast
            # machine they pass the default cap of 100 a key within the test's first second.
            "GATEWAY_SESSIONS_MAX_PER_KEY": "0",
        })
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}/api/v1"

    def wait(self) -> None:
        wait_for_port(self.port, self.process)
        wait_for_port(self.admin_port, self.process)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def two_processes(pg_url, redis_url, redis_prefix, tmp_path):
    engine = create_engine(pg_url)
    admin_key = asyncio.run(service.bootstrap(engine))
    asyncio.run(engine.dispose())
    processes = [ServeProcess(pg_url, redis_url, redis_prefix, tmp_path / f"serve-{i}.log") for i in range(2)]
    try:
        for p in processes:
            p.wait()
        yield processes, admin_key
    finally:
        for p in processes:
            p.stop()


async def _admin(http: aiohttp.ClientSession, url: str, key: str, method: str, path: str, json=None):
    async with http.request(method, url + path, json=json, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def test_a_revoked_key_is_refused_by_two_serving_processes_within_a_second(two_processes, mcp_upstream):
    (a, b), admin_key = two_processes
    async with aiohttp.ClientSession() as http:
        _, tenant = await _admin(http, a.admin_url, admin_key, "POST", "/tenants", {"name": "acme"})
        _, user = await _admin(http, a.admin_url, admin_key, "POST", "/users",
                               {"tenant_id": tenant["id"], "username": "u", "email": "u@acme.test"})
        # A quota far above this test's traffic (the default, 1000 an hour, is about what two seconds of it
        # from two processes send on a fast machine): what is measured is the revocation, never a 429.
        _, key = await _admin(http, a.admin_url, admin_key, "POST", "/api-keys",
                              {"user_id": user["id"], "name": "k", "scopes": ["proxy"],
                               "rate_limit_per_hour": 100_000})
        _, _ = await _admin(http, a.admin_url, admin_key, "POST", "/servers",
                            {"tenant_id": tenant["id"], "name": "demo", "endpoint_url": mcp_upstream})
        endpoints = [f"{p.url}/servers/demo/mcp" for p in (a, b)]
        deadline = time.monotonic() + 10
        while [(await call(e, key["key"]))[0] for e in endpoints] != [200, 200]:
            assert time.monotonic() < deadline, "the new key never worked on both processes"
            await asyncio.sleep(0.05)

        # Traffic on both processes, every request's start time and status recorded.
        seen: dict[str, list[tuple[float, int]]] = {e: [] for e in endpoints}
        stop = asyncio.Event()

        async def traffic(endpoint: str) -> None:
            while not stop.is_set():
                started = time.monotonic()
                status, _ = await call(endpoint, key["key"])
                seen[endpoint].append((started, status))

        loops = [asyncio.create_task(traffic(e)) for e in endpoints]
        await asyncio.sleep(0.3)
        revoked_at = time.monotonic()
        status, _ = await _admin(http, a.admin_url, admin_key, "DELETE", f"/api-keys/{key['id']}")
        assert status == 200
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*loops)

    for endpoint, calls in seen.items():
        assert {s for t, s in calls if t < revoked_at} == {200}, "the key worked before the revocation"
        admitted = [t for t, s in calls if s == 200]
        refused = [t for t, s in calls if s == 401]
        assert refused, f"{endpoint} never refused the revoked key"
        # From the first refusal on, nothing was admitted; and it came within the bound.
        assert max(admitted) < min(refused)
        took = min(refused) - revoked_at
        print(f"{endpoint}: revoked key refused {took * 1000:.0f} ms after the DELETE was sent "
              f"({len(calls)} requests)")
        assert took < 1.0, f"{endpoint} took {took:.3f}s to refuse the revoked key"
        assert {s for _, s in calls} <= {200, 401}


# -- legacy keys -------------------------------------------------------------------------------------------------
async def test_an_imported_legacy_key_maps_to_its_user_with_its_own_scopes(gateway, pg_url, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, imported = await gateway.admin(
        "POST", "/api-keys/import",
        {"user_id": t.user_id, "name": "from the old gateway", "key": LEGACY_KEY, "scopes": ["proxy"],
         "rate_limit_per_hour": 50},
    )
    assert status == 201, imported
    assert imported["legacy"] is True and "key" not in imported
    assert imported["key_prefix"].startswith("legacy.") and LEGACY_KEY[:6] not in imported["key_prefix"]
    assert (imported["user_id"], imported["tenant_id"], imported["rate_limit_per_hour"]) == (t.user_id, t.tenant_id, 50)

    assert (await call(t.endpoint, LEGACY_KEY))[0] == 200
    for near_miss in (LEGACY_KEY[:-1] + "0", LEGACY_KEY + "x", LEGACY_KEY.upper()):
        status, error = await call(t.endpoint, near_miss)
        assert status == 401 and error["message"] == "Invalid API key"

    # Stored as a salted hash and a keyed digest, never in clear (nor as a plain hash).
    (row,) = await _rows(pg_url, "SELECT * FROM enhanced_api_keys WHERE id = $1", uuid.UUID(imported["id"]))
    stored = " ".join(str(v) for v in row.values())
    assert LEGACY_KEY not in stored
    assert hashlib.sha256(LEGACY_KEY.encode()).hexdigest() not in stored
    assert row["lookup_digest"] and len(row["lookup_digest"]) == 64 and row["key_hash"] != row["lookup_digest"]

    # Its own scopes: a read-only legacy key cannot proxy.
    status, body = await gateway.admin("POST", "/api-keys/import", {"user_id": t.user_id, "name": "ro",
                                                                   "key": LEGACY_KEY + "-ro", "scopes": ["read"]})
    assert status == 201, body
    status, error = await call(t.endpoint, LEGACY_KEY + "-ro")
    assert status == 403 and error["code"] == jsonrpc.FORBIDDEN and "proxy" in error["message"]

    # Revocation and rotation work as for any key; rotation mints a gateway key.
    status, rotated = await gateway.admin("POST", f"/api-keys/{imported['id']}/rotate", {"grace_seconds": 0})
    assert status == 201 and rotated["key"].startswith("gw_") and rotated["legacy"] is False
    assert (await call(t.endpoint, rotated["key"]))[0] == 200
    assert (await call(t.endpoint, LEGACY_KEY))[0] == 401


async def test_legacy_import_refusals(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    base = {"user_id": t.user_id, "name": "old"}
    status, _ = await gateway.admin("POST", "/api-keys/import", {**base, "key": LEGACY_KEY})
    assert status == 201
    status, body = await gateway.admin("POST", "/api-keys/import", {**base, "key": LEGACY_KEY})
    assert status == 409 and "already imported" in body["error"]["message"]
    for bad in ("short-key", "has a space in it ok", t.api_key, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"):
        status, body = await gateway.admin("POST", "/api-keys/import", {**base, "key": bad})
        assert status == 422 and body["error"]["details"][0]["field"] == "key", bad


async def test_a_legacy_admin_key_works_on_the_admin_api(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    _, admin_user = await gateway.admin("POST", "/users", {"tenant_id": t.tenant_id, "username": "adm",
                                                           "email": "adm@acme.test", "role": "ADMIN"})
    status, _ = await gateway.admin("POST", "/api-keys/import", {"user_id": admin_user["id"], "name": "old admin",
                                                                 "key": LEGACY_KEY, "scopes": ["admin"]})
    assert status == 201
    status, page = await gateway.admin("GET", "/servers", key=LEGACY_KEY)
    assert status == 200 and [s["id"] for s in page["items"]] == [t.server_id]
    status, _ = await gateway.admin("GET", "/servers", key=LEGACY_KEY[:-1] + "0")
    assert status == 401


# -- the embedded default --------------------------------------------------------------------------------------
async def test_the_lifecycle_on_sqlite(sqlite_url, make_gateway, mcp_upstream):
    """Rotation, legacy import, last use and a sealed credential on the SQLite schema (naive timestamps, IN lists)."""
    gw = await make_gateway(sqlite_url)
    t = await gw.tenancy("acme", mcp_upstream)
    status, new = await gw.admin("POST", f"/api-keys/{t.api_key_id}/rotate", {"grace_seconds": 0})
    assert status == 201, new
    assert (await call(t.endpoint, t.api_key))[0] == 401
    assert (await call(t.endpoint, new["key"]))[0] == 200
    status, _ = await gw.admin("POST", "/api-keys/import", {"user_id": t.user_id, "name": "old", "key": LEGACY_KEY})
    assert status == 201
    assert (await call(t.endpoint, LEGACY_KEY))[0] == 200
    await gw.gateway.key_usage.flush()
    _, page = await gw.admin("GET", "/api-keys")
    # By id: the rotated key and its successor share a name (only the successor was used).
    used = {k["id"]: k["last_used_at"] for k in page["items"] if k["user_id"] == t.user_id}
    assert used[next(k["id"] for k in page["items"] if k["name"] == "old")] is not None
    assert used[new["id"]] is not None and used[t.api_key_id] is None
    status, server = await gw.admin("PUT", f"/servers/{t.server_id}/auth",
                                    {"auth": {"kind": "header", "header_name": "X-Key", "header_value": "v"}})
    assert status == 200 and server["auth"] == {"kind": "header", "header_name": "X-Key"}
    assert (await call(t.endpoint, new["key"]))[0] == 200  # the demo server ignores the extra header
