"""Analytics: the same figures from PostgreSQL's SQL functions and from SQLite, each checked by hand.

A known set of rows (`seed`) goes into both databases; every figure the three
summaries give is compared with the one worked out here, and the two databases
must agree exactly, to the bit. Percentiles are also compared with
PostgreSQL's own `percentile_cont` on random data and with `statistics`.
Then: tenant isolation (through the admin API, and through the SQL functions
as `gateway_tenant` under row-level security), the `hours` parameter, the
operator's database report, and real traffic through a gateway.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import uuid
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from gateway.controlplane import service
from gateway.db import tables
from gateway.db.engine import create_engine
from gateway.records import analytics

AS_OF = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def _id(name: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"analytics-test/{name}")


ACME, GLOBEX = _id("acme"), _id("globex")
ALPHA, BETA, IDLE, GLOBEX_ALPHA = _id("alpha"), _id("beta"), _id("idle"), _id("globex-alpha")
U1, U2, UB = _id("u1"), _id("u2"), _id("ub")
KEY1, KEY2, KEY_REVOKED, KEY_B = _id("key1"), _id("key2"), _id("key-revoked"), _id("key-b")

# acme / alpha / tools/call, within the last hour: (duration ms, tool, status, JSON-RPC error, minutes ago).
ALPHA_CALLS = [
    (12.5, "search", 200, None, 1),
    (3.0, "search", 200, None, 5),
    (7.25, "fetch", 200, None, 10),
    (100.0, "search", 500, None, 15),  # an error: HTTP status
    (41.0, "fetch", 200, -32603, 20),  # an error: a JSON-RPC error in a 200 answer
    (8.0, "search", 200, None, 25),
    (15.5, "write", 200, None, 30),
    (22.0, "search", 200, None, 35),
    (5.0, "fetch", 200, None, 40),
    (60.0, "search", 200, None, 50),
]


def _log(n: int, *, tenant, server, server_name, method, duration, at, status=200, error_code=None, tool=None,
         key=None, user=None) -> dict:
    return {
        "id": _id(f"log-{n}"), "tenant_id": tenant, "user_id": user, "api_key_id": key, "server_id": server,
        "server_name": server_name, "method": method, "tool_name": tool, "status_code": status,
        "error_code": error_code, "error": None, "duration_ms": duration, "request_bytes": 100,
        "response_bytes": 200, "client_ip": "127.0.0.1", "created_at": at,
    }


def seed_rows() -> dict[str, list[dict]]:
    ago = lambda minutes: AS_OF - timedelta(minutes=minutes)  # noqa: E731
    stamps = {"created_at": AS_OF - timedelta(days=3), "updated_at": AS_OF - timedelta(days=3)}
    rows: dict[str, list[dict]] = {
        "tenants": [
            {"id": ACME, "name": "acme", "status": "active", "settings": {}, "is_platform": False, "weight": 100,
             **stamps},
            {"id": GLOBEX, "name": "globex", "status": "active", "settings": {}, "is_platform": False,
             "weight": 100, **stamps},
        ],
        "users": [
            {"id": uid, "tenant_id": tenant, "username": name, "email": f"{name}@example.com", "role": "USER",
             "is_active": True, **stamps}
            for uid, tenant, name in ((U1, ACME, "u1"), (U2, ACME, "u2"), (UB, GLOBEX, "ub"))
        ],
        "mcp_servers": [
            {"id": sid, "tenant_id": tenant, "name": name, "endpoint_url": "http://127.0.0.1:9/mcp",
             "transport_type": "http", "health_status": status, "avg_response_time": avg,
             "health_checked_at": checked, "tags": [], "capabilities": {}, "is_active": True, "settings": {},
             "auth_kind": "none", **stamps}
            for sid, tenant, name, status, avg, checked in (
                (ALPHA, ACME, "alpha", "HEALTHY", 12.5, ago(5)),
                (BETA, ACME, "beta", "DEGRADED", 250.0, ago(2)),
                (IDLE, ACME, "zeta-idle", "UNKNOWN", None, None),
                (GLOBEX_ALPHA, GLOBEX, "alpha", "HEALTHY", 3.0, ago(1)),
            )
        ],
        "enhanced_api_keys": [
            {"id": kid, "tenant_id": tenant, "user_id": user, "name": name, "key_prefix": name,
             "key_hash": "x", "salt": "x", "scopes": ["proxy"], "rate_limit_per_hour": per_hour,
             "rate_limit_per_day": per_day, "is_active": active, **stamps}
            for kid, tenant, user, name, per_hour, per_day, active in (
                (KEY1, ACME, U1, "key1", 100, 1000, True),
                (KEY2, ACME, U2, "key2", 10, 50, True),
                (KEY_REVOKED, ACME, U2, "key-revoked", 10, 50, False),
                (KEY_B, GLOBEX, UB, "key-b", 1000, 10000, True),
            )
        ],
    }
    logs = []
    acme_alpha = {"tenant": ACME, "server": ALPHA, "server_name": "alpha"}
    for duration, tool, status, code, minutes in ALPHA_CALLS:
        logs.append(dict(method="tools/call", duration=duration, tool=tool, status=status, error_code=code,
                         at=ago(minutes), key=KEY1, user=U1, **acme_alpha))
    # Exactly an hour before: outside the last hour (the windows are (as_of - N h, as_of]), inside the day.
    logs.append(dict(method="ping", duration=0.5, at=AS_OF - timedelta(hours=1), key=KEY1, user=U1, **acme_alpha))
    for duration in (4.0, 2.0, 1.0, 3.0):
        logs.append(dict(method="tools/list", duration=duration, at=ago(120), key=KEY2, user=U2, **acme_alpha))
    # 30 hours ago: only in a 48-hour window; not in the daily quota.
    logs.append(dict(method="tools/call", duration=200.0, tool="search", at=ago(30 * 60), key=KEY1, user=U1,
                     **acme_alpha))
    # Exactly as_of: inside every window.
    for duration, status, minutes in ((10.0, 200, 0), (20.0, 429, 31), (30.0, 200, 32)):
        logs.append(dict(tenant=ACME, server=BETA, server_name="beta", method="tools/call", duration=duration,
                         tool="search", status=status, at=ago(minutes), key=KEY2, user=U2))
    # Refused before authentication: no tenant, no server (the operator's figures only).
    logs.append(dict(tenant=None, server=None, server_name=None, method=None, duration=0.25, status=401,
                     error_code=-32001, at=ago(10)))
    for i, duration in enumerate((1.0, 1.0, 1000.0, 1.0, 1.0)):
        logs.append(dict(tenant=GLOBEX, server=GLOBEX_ALPHA, server_name="alpha", method="tools/call",
                         duration=duration, tool="secret_tool", status=500 if i == 2 else 200, at=ago(3 + i),
                         key=KEY_B, user=UB))
    rows["request_logs"] = [_log(n, **fields) for n, fields in enumerate(logs)]
    return rows


async def seed(engine) -> None:
    async with engine.begin() as conn:
        for table, values in seed_rows().items():
            await conn.execute(sa.insert(tables.metadata.tables[table]), values)


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
async def seeded(database_url):
    engine = create_engine(database_url)
    await seed(engine)
    yield engine
    await engine.dispose()


async def _all(engine, *, tenant=None):
    async with engine.connect() as conn:
        return {
            "health": await analytics.server_health(conn, tenant_id=tenant, as_of=AS_OF),
            **{f"performance_{h}": await analytics.request_performance(conn, hours=h, tenant_id=tenant, as_of=AS_OF)
               for h in (1, 24, 48)},
            **({f"usage_{h}": await analytics.tenant_usage(conn, tenant_id=tenant, hours=h, as_of=AS_OF)
                for h in (1, 24, 48)} if tenant is not None else {}),
        }


# -- the figures, worked out by hand ----------------------------------------------------------------------
async def test_server_health(seeded):
    async with seeded.connect() as conn:
        acme = await analytics.server_health(conn, tenant_id=ACME, as_of=AS_OF)
        everyone = await analytics.server_health(conn, as_of=AS_OF)
    # alpha: the ten calls of the last hour (the ping exactly an hour ago is out), two of them errors.
    assert [(r["name"], r["server_id"], r["tenant_id"], r["health_status"], r["avg_response_time"], r["requests"],
             r["errors"], r["error_rate"]) for r in acme] == [
        ("alpha", ALPHA, ACME, "HEALTHY", 12.5, 10, 2, 0.2),
        ("beta", BETA, ACME, "DEGRADED", 250.0, 3, 1, 1 / 3),
        ("zeta-idle", IDLE, ACME, "UNKNOWN", None, 0, 0, 0.0),
    ]
    assert acme[0]["health_checked_at"] == AS_OF - timedelta(minutes=5)
    assert acme[2]["health_checked_at"] is None
    # The operator: every tenant's servers, by name then id.
    assert [(r["name"], r["server_id"], r["requests"], r["errors"]) for r in everyone] == sorted(
        [("alpha", ALPHA, 10, 2), ("alpha", GLOBEX_ALPHA, 5, 1), ("beta", BETA, 3, 1), ("zeta-idle", IDLE, 0, 0)]
    )


def _figures(row: dict) -> tuple:
    return (row["server_name"], row["method"], row["requests"], row["errors"], row["error_rate"], row["avg_ms"],
            row["p50_ms"], row["p95_ms"], row["p99_ms"])


async def test_request_performance(seeded):
    async with seeded.connect() as conn:
        day = await analytics.request_performance(conn, hours=24, tenant_id=ACME, as_of=AS_OF)
        hour = await analytics.request_performance(conn, hours=1, tenant_id=ACME, as_of=AS_OF)
        two_days = await analytics.request_performance(conn, hours=48, tenant_id=ACME, as_of=AS_OF)
        everyone = await analytics.request_performance(conn, hours=24, as_of=AS_OF)
    assert {(r["tenant_id"], r["server_id"]) for r in day} == {(ACME, ALPHA), (ACME, BETA)}
    # alpha tools/call sorted: 3, 5, 7.25, 8, 12.5, 15.5, 22, 41, 60, 100 (sum 274.25). percentile_cont at
    # q * (n - 1): p50 at 4.5 -> 12.5 + 0.5 * 3 = 14; p95 at 8.55 -> 60 + 0.55 * 40 = 82; p99 at 8.91 -> 96.4.
    # tools/list 1, 2, 3, 4: p50 at 1.5 -> 2.5; p95 at 2.85 -> 3.85; p99 at 2.97 -> 3.97.
    # beta 10, 20, 30: p50 20; p95 at 1.9 -> 29; p99 at 1.98 -> 29.8. A single value is every percentile.
    expected = [
        ("alpha", "ping", 1, 0, 0.0, 0.5, 0.5, 0.5, 0.5),
        ("alpha", "tools/call", 10, 2, 0.2, 27.425, 14.0, 82.0, 96.4),
        ("alpha", "tools/list", 4, 0, 0.0, 2.5, 2.5, 3.85, 3.97),
        ("beta", "tools/call", 3, 1, 1 / 3, 20.0, 20.0, 29.0, 29.8),
    ]
    assert [_figures(r)[:5] for r in day] == [e[:5] for e in expected]
    for got, want in zip(day, expected, strict=True):
        assert _figures(got)[5:] == pytest.approx(want[5:], rel=1e-12, abs=0), got
    # Exactly what percentile_cont computes in floating point (q * (n - 1) is 8.549999999999999 here).
    assert day[1]["p95_ms"] == 60.0 + (0.95 * 9 - 8) * 40.0
    assert day[1]["p50_ms"] == 14.0 and day[3]["p50_ms"] == 20.0
    # And what `statistics` says (exact arithmetic on the positions): equal to rounding.
    for row, durations in ((day[1], [d for d, *_ in ALPHA_CALLS]), (day[2], [1.0, 2.0, 3.0, 4.0])):
        cuts = statistics.quantiles(durations, n=100, method="inclusive")
        assert (row["p50_ms"], row["p95_ms"], row["p99_ms"]) == pytest.approx((cuts[49], cuts[94], cuts[98]),
                                                                              rel=1e-12)
    assert [_figures(r)[:4] for r in hour] == [("alpha", "tools/call", 10, 2), ("beta", "tools/call", 3, 1)]
    assert [_figures(r)[:4] for r in two_days] == [
        ("alpha", "ping", 1, 0), ("alpha", "tools/call", 11, 2), ("alpha", "tools/list", 4, 0),
        ("beta", "tools/call", 3, 1),
    ]
    assert two_days[1]["p99_ms"] == pytest.approx(100.0 + 0.9 * 100.0, rel=1e-12)  # at 9.9, between 100 and 200
    # The operator: globex's alpha apart from acme's, and the refused request with no server last.
    assert [(r["tenant_id"], r["server_name"], r["method"], r["requests"], r["errors"]) for r in everyone] == [
        (ACME, "alpha", "ping", 1, 0),
        *sorted([(ACME, "alpha", "tools/call", 10, 2), (GLOBEX, "alpha", "tools/call", 5, 1)],
                key=lambda r: r[0].int),
        (ACME, "alpha", "tools/list", 4, 0),
        (ACME, "beta", "tools/call", 3, 1),
        (None, None, None, 1, 1),
    ]
    globex = next(r for r in everyone if r["tenant_id"] == GLOBEX)
    assert (globex["p50_ms"], globex["avg_ms"]) == (1.0, 200.8)


async def test_tenant_usage(seeded):
    async with seeded.connect() as conn:
        day = await analytics.tenant_usage(conn, tenant_id=ACME, hours=24, as_of=AS_OF)
        short = await analytics.tenant_usage(conn, tenant_id=ACME, hours=24, as_of=AS_OF, top=2)
        hour = await analytics.tenant_usage(conn, tenant_id=ACME, hours=1, as_of=AS_OF)
        globex = await analytics.tenant_usage(conn, tenant_id=GLOBEX, hours=24, as_of=AS_OF)
        nobody = await analytics.tenant_usage(conn, tenant_id=uuid.uuid4(), hours=24, as_of=AS_OF)
    # 24 h: alpha 10 calls + ping + 4 lists, beta 3 calls = 18 requests; errors: 2 on alpha, 1 (a 429) on beta.
    assert {k: day[k] for k in ("tenant_id", "hours", "as_of", "requests", "errors", "error_rate", "tools_used",
                                "users")} == {
        "tenant_id": ACME, "hours": 24, "as_of": AS_OF, "requests": 18, "errors": 3, "error_rate": 3 / 18,
        "tools_used": 3, "users": 2,
    }
    assert day["top_tools"] == [
        {"tool_name": "search", "calls": 9, "errors": 2},  # 6 on alpha (one 500), 3 on beta (one 429)
        {"tool_name": "fetch", "calls": 3, "errors": 1},
        {"tool_name": "write", "calls": 1, "errors": 0},
    ]
    assert short["top_tools"] == day["top_tools"][:2] and short["tools_used"] == 3
    # Quota: key1 has 10 requests in the hour (the ping exactly an hour ago is out) and 11 in the day (the
    # one 30 hours ago is out); key2 3 in the hour of which the 429 consumed nothing, so 2, and 2 + 4 in the
    # day. The revoked key is not listed. Most used (of its day) first.
    assert day["api_keys"] == [
        {"api_key_id": KEY2, "name": "key2", "requests_last_hour": 2, "rate_limit_per_hour": 10,
         "hour_used": 0.2, "requests_last_day": 6, "rate_limit_per_day": 50, "day_used": 6 / 50},
        {"api_key_id": KEY1, "name": "key1", "requests_last_hour": 10, "rate_limit_per_hour": 100,
         "hour_used": 0.1, "requests_last_day": 11, "rate_limit_per_day": 1000, "day_used": 11 / 1000},
    ]
    assert (hour["requests"], hour["errors"], hour["tools_used"], hour["users"]) == (13, 3, 3, 2)
    assert hour["api_keys"] == day["api_keys"]  # quota windows do not depend on `hours`
    assert (globex["requests"], globex["errors"], globex["error_rate"], globex["tools_used"]) == (5, 1, 0.2, 1)
    assert globex["top_tools"] == [{"tool_name": "secret_tool", "calls": 5, "errors": 1}]
    assert [k["api_key_id"] for k in globex["api_keys"]] == [KEY_B]
    assert (nobody["requests"], nobody["top_tools"], nobody["api_keys"], nobody["error_rate"]) == (0, [], [], 0.0)


async def test_both_databases_give_the_same_answers(pg_url, sqlite_url):
    engines = [create_engine(pg_url), create_engine(sqlite_url)]
    try:
        answers = []
        for engine in engines:
            await seed(engine)
            answers.append([await _all(engine), await _all(engine, tenant=ACME), await _all(engine, tenant=GLOBEX)])
        # Equal as values and as types (uuid.UUID, aware datetimes, int, float), to the bit.
        assert answers[0] == answers[1]
        assert repr(answers[0]) == repr(answers[1])
    finally:
        for engine in engines:
            await engine.dispose()


async def test_percentiles_match_postgresql_bit_for_bit(pg_url):
    """percentile_cont and avg(... ORDER BY ...) in PostgreSQL against the Python twins, on random data."""
    import asyncpg

    rng = random.Random(7)
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(300):
            values = [rng.choice((rng.uniform(0, 5000), rng.expovariate(0.01), float(rng.randrange(100))))
                      for _ in range(rng.randrange(1, 60))]
            q = rng.choice((0.5, 0.95, 0.99, 0.9, 0.25, rng.random()))
            got, mean = await conn.fetchrow(
                "SELECT percentile_cont($2::float8) WITHIN GROUP (ORDER BY v), avg(v ORDER BY v) "
                "FROM unnest($1::float8[]) v", values, q)
            ordered = sorted(values)
            assert analytics.percentile_cont(ordered, q) == got, (values, q)
            assert analytics._ascending_mean(ordered) == mean, values
    finally:
        await conn.close()
    assert analytics.percentile_cont([], 0.5) is None


# -- tenant isolation -------------------------------------------------------------------------------------
def _tenant_actor(tenant: uuid.UUID) -> service.Actor:
    return service.Actor(user_id=uuid.uuid4(), tenant_id=tenant, api_key_id=None, role="ADMIN", is_operator=False,
                         scopes=frozenset({"read"}), reach="tenant")


async def test_row_level_security_confines_the_functions(pg_url):
    """As gateway_tenant (service.scoped), the SQL functions see only the tenant's rows, whatever they are asked."""
    engine = create_engine(pg_url)
    try:
        await seed(engine)
        async with service.scoped(engine, _tenant_actor(ACME)) as conn:
            assert (await conn.execute(sa.text("SELECT current_user"))).scalar_one() == "gateway_tenant"
            # Asked for every tenant: acme's rows only.
            health = await analytics.server_health(conn, as_of=AS_OF)
            performance = await analytics.request_performance(conn, hours=24, as_of=AS_OF)
            # Asked for globex outright: nothing.
            their_health = await analytics.server_health(conn, tenant_id=GLOBEX, as_of=AS_OF)
            their_usage = await analytics.tenant_usage(conn, tenant_id=GLOBEX, hours=24, as_of=AS_OF)
        assert {r["server_id"] for r in health} == {ALPHA, BETA, IDLE}
        assert {r["tenant_id"] for r in performance} == {ACME}
        assert next(r for r in performance if r["method"] == "tools/call" and r["server_id"] == ALPHA)["requests"] == 10
        assert their_health == []
        assert (their_usage["requests"], their_usage["top_tools"], their_usage["api_keys"]) == (0, [], [])
        async with service.scoped(engine, _tenant_actor(ACME)) as conn:
            mine = await analytics.tenant_usage(conn, tenant_id=ACME, hours=24, as_of=AS_OF)
        async with engine.connect() as conn:
            assert mine == await analytics.tenant_usage(conn, tenant_id=ACME, hours=24, as_of=AS_OF)
        # The monitoring views are the operator's: gateway_tenant may not read them.
        for view in ("gateway_database_size", "gateway_table_activity", "gateway_index_usage"):
            with pytest.raises(DBAPIError, match="permission denied"):
                async with service.scoped(engine, _tenant_actor(ACME)) as conn:
                    await conn.execute(sa.text(f"SELECT * FROM {view}"))
        # Nobody but the gateway's roles executes the functions.
        async with engine.connect() as conn:
            granted = (await conn.execute(sa.text(
                "SELECT p.proname, r.rolname FROM pg_proc p "
                "CROSS JOIN LATERAL aclexplode(p.proacl) a JOIN pg_roles r ON r.oid = a.grantee "
                "WHERE p.proname LIKE '%\\_summary' AND p.pronamespace = current_schema()::regnamespace"
            ))).all()
            public = (await conn.execute(sa.text(
                "SELECT count(*) FROM pg_proc p CROSS JOIN LATERAL aclexplode(p.proacl) a "
                "WHERE a.grantee = 0 AND p.proname LIKE '%\\_summary' "
                "AND p.pronamespace = current_schema()::regnamespace"
            ))).scalar_one()
        assert {name for name, role in granted if role == "gateway_tenant"} == {
            "server_health_summary", "request_performance_summary", "tenant_usage_summary"}
        assert public == 0
    finally:
        await engine.dispose()


# -- the admin API ----------------------------------------------------------------------------------------
class Api:
    def __init__(self, gw) -> None:
        self.gw = gw

    async def get(self, path: str, key: str | None = None) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.gw.admin_url + path,
                                headers={"Authorization": f"Bearer {key or self.gw.admin_key}"}) as resp:
                return resp.status, await resp.json()


async def _admin_key(gw, tenant_id: str, name: str, role: str = "ADMIN", scopes=("read",)) -> str:
    status, user = await gw.admin("POST", "/users", {"tenant_id": tenant_id, "username": name,
                                                     "email": f"{name}@example.com", "role": role})
    assert status == 201, user
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": name, "scopes": list(scopes)})
    assert status == 201, key
    return key["key"]


async def _insert_logs(gw, rows: list[dict]) -> None:
    async with gw.gateway.engine.begin() as conn:
        await conn.execute(sa.insert(tables.request_logs), rows)


async def test_the_admin_api(database_url, make_gateway, mcp_upstream):
    gw = await make_gateway(database_url)
    api = Api(gw)
    acme = await gw.tenancy("acme", mcp_upstream, server_name="acme-files")
    globex = await gw.tenancy("globex", mcp_upstream, server_name="globex-files")
    acme_admin = await _admin_key(gw, acme.tenant_id, "acme-admin")
    acme_user = await _admin_key(gw, acme.tenant_id, "acme-reader", role="USER")
    now = datetime.now(timezone.utc)
    logs = []
    for t, durations in ((acme, (5.0, 7.0, 9.0)), (globex, (100.0, 300.0))):
        for i, duration in enumerate(durations):
            logs.append(_log(len(logs), tenant=uuid.UUID(t.tenant_id), server=uuid.UUID(t.server_id),
                             server_name=t.server_name, method="tools/call", tool=f"{t.server_name}-tool",
                             duration=duration, status=500 if i == 0 else 200, at=now - timedelta(minutes=5 + i),
                             key=uuid.UUID(t.api_key_id), user=uuid.UUID(t.user_id)))
    await _insert_logs(gw, logs)

    # A tenant admin: its own tenant's figures only, nothing of globex's anywhere.
    status, health = await api.get("/analytics/server-health", acme_admin)
    assert status == 200, health
    assert [(s["name"], s["requests"], s["errors"]) for s in health["items"]] == [("acme-files", 3, 1)]
    assert health["next_cursor"] is None and health["window_hours"] == 1
    status, performance = await api.get("/analytics/request-performance", acme_admin)
    assert status == 200 and performance["hours"] == 24, performance
    [row] = performance["items"]
    assert (row["server_name"], row["requests"], row["errors"], row["p50_ms"], row["avg_ms"]) == (
        "acme-files", 3, 1, 7.0, 7.0)
    status, usage = await api.get(f"/analytics/tenant-usage/{acme.tenant_id}?hours=2", acme_admin)
    assert status == 200, usage
    assert (usage["tenant_id"], usage["hours"], usage["requests"], usage["errors"], usage["tools_used"]) == (
        acme.tenant_id, 2, 3, 1, 1)
    # Every active key of the tenant, the one with traffic first (3 of its default 1000 an hour).
    assert [(k["api_key_id"], k["requests_last_hour"]) for k in usage["api_keys"]][0] == (acme.api_key_id, 3)
    assert len(usage["api_keys"]) == 3 and {k["requests_last_day"] for k in usage["api_keys"][1:]} == {0}
    for text in (health, performance, usage):
        assert globex.tenant_id not in str(text) and "globex" not in str(text)
    # ...asking for globex by filter matches nothing; by path it is "not found", exactly like a made-up id.
    status, filtered = await api.get(f"/analytics/server-health?tenant_id={globex.tenant_id}", acme_admin)
    assert (status, filtered["items"]) == (200, [])
    status, filtered = await api.get(f"/analytics/request-performance?tenant_id={globex.tenant_id}", acme_admin)
    assert (status, filtered["items"]) == (200, [])
    theirs = await api.get(f"/analytics/tenant-usage/{globex.tenant_id}", acme_admin)
    missing = await api.get(f"/analytics/tenant-usage/{uuid.uuid4()}", acme_admin)
    assert theirs == missing == (404, {"error": {"code": "not_found", "message": "tenant not found"}})
    assert (await api.get("/analytics/tenant-usage/not-a-uuid", acme_admin))[0] == 404
    # Not a tenant ADMIN: refused. The database: the operator's.
    for path in ("/analytics/server-health", "/analytics/request-performance",
                 f"/analytics/tenant-usage/{acme.tenant_id}"):
        assert (await api.get(path, acme_user))[0] == 403
    status, refused = await api.get("/analytics/database", acme_admin)
    assert status == 403 and "operator" in refused["error"]["message"]

    # The operator: every tenant, or one by filter, and any tenant's usage.
    status, health = await api.get("/analytics/server-health")
    assert status == 200
    assert sorted((s["name"], s["requests"]) for s in health["items"]) == [("acme-files", 3), ("globex-files", 2)]
    status, health = await api.get(f"/analytics/server-health?tenant_id={globex.tenant_id}")
    assert [(s["name"], s["requests"], s["errors"], s["error_rate"]) for s in health["items"]] == [
        ("globex-files", 2, 1, 0.5)]
    status, performance = await api.get(f"/analytics/request-performance?hours=1&tenant_id={globex.tenant_id}")
    [row] = performance["items"]
    assert row["requests"] == 2
    assert (row["p50_ms"], row["p95_ms"], row["p99_ms"]) == pytest.approx((200.0, 290.0, 298.0), rel=1e-12)
    status, usage = await api.get(f"/analytics/tenant-usage/{globex.tenant_id}?hours=720")
    assert status == 200 and usage["top_tools"] == [{"tool_name": "globex-files-tool", "calls": 2, "errors": 1}]
    assert (await api.get(f"/analytics/tenant-usage/{uuid.uuid4()}"))[0] == 404
    status, database = await api.get("/analytics/database")
    assert status == 200, database
    rows = {t["table_name"]: t for t in database["tables"]}
    assert database["size_bytes"] > 0 and "request_logs" in rows
    if database["dialect"] == "sqlite":
        assert rows["request_logs"]["rows"] == 5 and rows["tenants"]["rows"] == 3  # acme, globex, the platform
        assert database["indexes"] == []
    else:
        assert database["dialect"] == "postgresql" and database["database"] in database_url
        assert {"live_rows", "seq_scan", "idx_scan", "total_bytes", "inserted"} <= set(rows["request_logs"])
        assert "ix_request_logs_tenant_id_created_at" in {i["index_name"] for i in database["indexes"]}


@pytest.mark.parametrize("hours", ["0", "721", "-1", "1.5", "abc", "", "24h", "١٢"])
async def test_hours_out_of_range_is_422(gateway, mcp_upstream, hours):
    acme = await gateway.tenancy("acme", mcp_upstream)
    for path in ("/analytics/request-performance", f"/analytics/tenant-usage/{acme.tenant_id}"):
        status, body = await Api(gateway).get(f"{path}?hours={hours}")
        assert status == 422, (path, hours, body)
        assert body["error"]["details"][0]["field"] == "hours"


async def test_hours_bounds_are_accepted(gateway, mcp_upstream):
    acme = await gateway.tenancy("acme", mcp_upstream)
    api = Api(gateway)
    for hours in ("1", "720"):
        assert (await api.get(f"/analytics/request-performance?hours={hours}"))[1]["hours"] == int(hours)
        assert (await api.get(f"/analytics/tenant-usage/{acme.tenant_id}?hours={hours}"))[1]["hours"] == int(hours)
    assert (await api.get(f"/analytics/tenant-usage/{acme.tenant_id}"))[1]["hours"] == 24


# -- real traffic -----------------------------------------------------------------------------------------
def _call(i: int) -> dict:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "analytics", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hi"}, "_meta": meta}}


async def test_real_traffic(database_url, make_gateway, mcp_upstream_json):
    """Calls through the gateway, five on a key allowed three an hour: three answered, two refused with 429."""
    gw = await make_gateway(database_url)
    t = await gw.tenancy("acme", mcp_upstream_json, rate_limit_per_hour=3)
    headers = {"Authorization": f"Bearer {t.api_key}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
    statuses = []
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            async with http.post(t.endpoint, json=_call(i), headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429, 429]
    await gw.gateway.writer.flush()
    async with gw.gateway.engine.connect() as conn:
        logs = tables.request_logs.c
        durations = sorted(
            (await conn.execute(sa.select(logs.duration_ms).where(logs.tenant_id == uuid.UUID(t.tenant_id)))).scalars()
        )
    assert len(durations) == 5

    api = Api(gw)
    status, usage = await api.get(f"/analytics/tenant-usage/{t.tenant_id}?hours=1")
    assert status == 200, usage
    assert (usage["requests"], usage["errors"], usage["error_rate"], usage["tools_used"], usage["users"]) == (
        5, 2, 0.4, 1, 1)
    assert usage["top_tools"] == [{"tool_name": "echo", "calls": 5, "errors": 2}]
    [key] = usage["api_keys"]
    assert (key["api_key_id"], key["requests_last_hour"], key["rate_limit_per_hour"], key["hour_used"]) == (
        t.api_key_id, 3, 3, 1.0)
    status, performance = await api.get(f"/analytics/request-performance?hours=1&tenant_id={t.tenant_id}")
    [row] = performance["items"]
    assert (row["server_id"], row["server_name"], row["method"], row["requests"], row["errors"]) == (
        t.server_id, "demo", "tools/call", 5, 2)
    cuts = statistics.quantiles(durations, n=100, method="inclusive")
    assert (row["p50_ms"], row["p95_ms"], row["p99_ms"]) == pytest.approx((cuts[49], cuts[94], cuts[98]), rel=1e-9)
    assert row["p50_ms"] == durations[2]  # the middle of five
    status, health = await api.get(f"/analytics/server-health?tenant_id={t.tenant_id}")
    assert [(s["server_id"], s["requests"], s["errors"]) for s in health["items"]] == [(t.server_id, 5, 2)]


async def test_the_migration_is_nothing_on_sqlite(sqlite_url):
    engine = create_engine(sqlite_url)
    try:
        async with engine.connect() as conn:
            views = (await conn.execute(sa.text("SELECT name FROM sqlite_master WHERE type = 'view'"))).all()
        assert views == []
    finally:
        await engine.dispose()


def test_the_migration_goes_down_and_up(empty_pg_url):
    from gateway.db import migrate

    async def objects() -> tuple[set, set]:
        engine = create_engine(empty_pg_url)
        try:
            async with engine.connect() as conn:
                functions = set((await conn.execute(sa.text(
                    "SELECT proname FROM pg_proc WHERE pronamespace = current_schema()::regnamespace"))).scalars())
                views = set((await conn.execute(sa.text(
                    "SELECT viewname FROM pg_views WHERE schemaname = current_schema()"))).scalars())
            return functions, views
        finally:
            await engine.dispose()

    functions = {"server_health_summary", "request_performance_summary", "tenant_usage_summary"}
    views = {"gateway_database_size", "gateway_table_activity", "gateway_index_usage"}
    migrate.upgrade(empty_pg_url)
    found = asyncio.run(objects())
    assert functions <= found[0] and views <= found[1]
    migrate.downgrade(empty_pg_url, "0009")
    found = asyncio.run(objects())
    assert not functions & found[0] and not views & found[1]
    migrate.upgrade(empty_pg_url, "0010")
    found = asyncio.run(objects())
    assert functions <= found[0] and views <= found[1]


def test_the_openapi_document_lists_the_routes():
    from gateway.controlplane.api import openapi_document

    paths = openapi_document()["paths"]
    for route in ("server-health", "request-performance", "tenant-usage/{tenant_id}", "database"):
        assert "get" in paths[f"/api/v1/analytics/{route}"], route
    hours = next(p for p in paths["/api/v1/analytics/request-performance"]["get"]["parameters"] if p["name"] == "hours")
    assert (hours["schema"]["minimum"], hours["schema"]["maximum"]) == (1, 720)
