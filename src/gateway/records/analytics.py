"""Analytics over the records: server health, request performance, tenant usage, and the database itself.

On PostgreSQL the answers come from the SQL functions and views of migration
0010 (`server_health_summary`, `request_performance_summary`,
`tenant_usage_summary`, `gateway_*`); on SQLite this module computes the same
answers in Python from the same rows. Both give identical numbers on
identical rows, to the bit: percentiles interpolate exactly as PostgreSQL's
`percentile_cont` does (`percentile_cont` below), averages add durations in
ascending order on both sides, and rows are ordered by code point (COLLATE
"C" there, str order here). Each function returns the same shape whichever
database answers.

Scoping: every function runs on a connection its caller opened, for the
control plane through `service.scoped`, so on PostgreSQL a tenant's actor
runs the functions as `gateway_tenant` and row-level security confines them
to its rows whatever `tenant_id` says; `tenant_id` (None: every tenant the
connection can see) is the filter on both databases, and on SQLite the only
wall. Nothing here is on the request path.

An error is a request with `status_code >= 400` or a JSON-RPC `error_code`
(a refusal, an upstream failure, or an error answer the gateway read).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.db.tables import enhanced_api_keys, mcp_servers, metadata, request_logs

TOP_TOOLS = 10
QUANTILES = (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99))
_HOUR = timedelta(hours=1)
_DAY = timedelta(hours=24)  # 24 hours, not a calendar day (the SQL side says interval '24 hours')


def percentile_cont(ordered: Sequence[float], q: float) -> float | None:
    """The q-th quantile (0..1) of sorted values by linear interpolation, as PostgreSQL's `percentile_cont`.

    The same operations in the same order as its C code (orderedsetaggs.c,
    `float8_lerp`), so the result is the same double: the value at position
    q * (n - 1), interpolated between the two rows around it.
    """
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    first, second = math.floor(position), math.ceil(position)
    low = ordered[first]
    if first == second:
        return low
    return low + ((position - first) * (ordered[second] - low))


def _ascending_mean(ordered: Sequence[float]) -> float | None:
    # Left to right in ascending order, as `avg(x ORDER BY x)` adds them (not math.fsum, not sum()).
    if not ordered:
        return None
    total = 0.0
    for value in ordered:
        total += value
    return total / len(ordered)


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _is_error(table: sa.Table = request_logs) -> sa.ColumnElement[bool]:
    return sa.or_(table.c.status_code >= 400, table.c.error_code.is_not(None))


def _error_count(table: sa.Table = request_logs) -> sa.ColumnElement[int]:
    return sa.func.coalesce(sa.func.sum(sa.case((_is_error(table), 1), else_=0)), 0)


def _uuid(value: Any) -> uuid.UUID | None:
    # asyncpg hands out its own UUID subclass, JSON a string: callers get plain uuid.UUID.
    if value is None or type(value) is uuid.UUID:
        return value
    return uuid.UUID(str(value))


def _aware(value: datetime | None) -> datetime | None:
    # SQLite keeps the UTC wall-clock time without its offset.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _utc(as_of: datetime | None) -> datetime:
    if as_of is None:
        return datetime.now(timezone.utc)
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware")
    return as_of.astimezone(timezone.utc)


def _check_hours(hours: int) -> None:
    if not isinstance(hours, int) or isinstance(hours, bool) or hours < 1:
        raise ValueError(f"hours must be a positive integer, not {hours!r}")


def _postgresql(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"


def _window(since: datetime, until: datetime) -> sa.ColumnElement[bool]:
    """(since, until]: what the SQL functions call the last N hours before `as_of`."""
    return sa.and_(request_logs.c.created_at > since, request_logs.c.created_at <= until)


# -- server health ------------------------------------------------------------------------------
async def server_health(
    conn: AsyncConnection, *, tenant_id: uuid.UUID | None = None, as_of: datetime | None = None
) -> list[dict[str, Any]]:
    """Per server: tenant, name, health status and last check, avg_response_time, and the requests,
    errors and error rate of the hour before `as_of`. Ordered by name, then id."""
    until = _utc(as_of)
    if _postgresql(conn):
        result = await conn.execute(
            sa.text("SELECT * FROM server_health_summary(:tenant, :as_of)"), {"tenant": tenant_id, "as_of": until}
        )
        return [_server_health_row(row) for row in result.mappings()]

    servers = sa.select(
        mcp_servers.c.id.label("server_id"), mcp_servers.c.tenant_id, mcp_servers.c.name, mcp_servers.c.health_status,
        mcp_servers.c.health_checked_at, mcp_servers.c.avg_response_time,
    )
    counts = (
        sa.select(request_logs.c.server_id, sa.func.count().label("requests"), _error_count().label("errors"))
        .where(request_logs.c.server_id.is_not(None), _window(until - _HOUR, until))
        .group_by(request_logs.c.server_id)
    )
    if tenant_id is not None:
        servers = servers.where(mcp_servers.c.tenant_id == tenant_id)
        counts = counts.where(request_logs.c.tenant_id == tenant_id)
    seen = {row.server_id: (row.requests, row.errors) for row in await conn.execute(counts)}
    rows = []
    for server in (await conn.execute(servers)).mappings():
        requests, errors = seen.get(server["server_id"], (0, 0))
        rows.append(_server_health_row({**server, "requests": requests, "errors": errors,
                                        "error_rate": _rate(errors, requests)}))
    rows.sort(key=lambda r: (r["name"], r["server_id"]))
    return rows


def _server_health_row(row) -> dict[str, Any]:
    return {
        "server_id": _uuid(row["server_id"]),
        "tenant_id": _uuid(row["tenant_id"]),
        "name": row["name"],
        "health_status": row["health_status"],
        "health_checked_at": _aware(row["health_checked_at"]),
        "avg_response_time": row["avg_response_time"],
        "requests": int(row["requests"]),
        "errors": int(row["errors"]),
        "error_rate": float(row["error_rate"]),
    }


# -- request performance ------------------------------------------------------------------------
async def request_performance(
    conn: AsyncConnection, *, hours: int, tenant_id: uuid.UUID | None = None, as_of: datetime | None = None
) -> list[dict[str, Any]]:
    """Per tenant, server and method over the `hours` before `as_of`: requests, errors, error rate,
    average and p50/p95/p99 duration (ms). Ordered by server name, method (missing ones last), tenant, server."""
    _check_hours(hours)
    until = _utc(as_of)
    if _postgresql(conn):
        result = await conn.execute(
            sa.text("SELECT * FROM request_performance_summary(:hours, :tenant, :as_of)"),
            {"hours": hours, "tenant": tenant_id, "as_of": until},
        )
        return [_performance_row(row) for row in result.mappings()]

    c = request_logs.c
    query = sa.select(c.tenant_id, c.server_id, c.server_name, c.method, c.status_code, c.error_code,
                      c.duration_ms).where(_window(until - timedelta(hours=hours), until))
    if tenant_id is not None:
        query = query.where(c.tenant_id == tenant_id)
    groups: dict[tuple, tuple[list[float], list[int]]] = {}
    for row in await conn.execute(query):
        durations, errors = groups.setdefault((row.tenant_id, row.server_id, row.server_name, row.method), ([], [0]))
        durations.append(row.duration_ms)
        if row.status_code >= 400 or row.error_code is not None:
            errors[0] += 1
    rows = []
    for (tenant, server, server_name, method), (durations, (errors,)) in groups.items():
        durations.sort()
        requests = len(durations)
        rows.append(_performance_row({
            "tenant_id": tenant, "server_id": server, "server_name": server_name, "method": method,
            "requests": requests, "errors": errors, "error_rate": _rate(errors, requests),
            "avg_ms": _ascending_mean(durations),
            **{name: percentile_cont(durations, q) for name, q in QUANTILES},
        }))
    rows.sort(key=_performance_order)
    return rows


def _performance_order(row: dict[str, Any]) -> tuple:
    # NULLS LAST on every key, as the SQL function orders them.
    return tuple((row[k] is None, row[k] if row[k] is not None else "")
                 for k in ("server_name", "method")) + tuple(
        (row[k] is None, row[k].int if row[k] is not None else 0) for k in ("tenant_id", "server_id"))


def _performance_row(row) -> dict[str, Any]:
    return {
        "tenant_id": _uuid(row["tenant_id"]),
        "server_id": _uuid(row["server_id"]),
        "server_name": row["server_name"],
        "method": row["method"],
        "requests": int(row["requests"]),
        "errors": int(row["errors"]),
        "error_rate": float(row["error_rate"]),
        "avg_ms": row["avg_ms"],
        **{name: row[name] for name, _ in QUANTILES},
    }


# -- tenant usage -------------------------------------------------------------------------------
async def tenant_usage(
    conn: AsyncConnection, *, tenant_id: uuid.UUID, hours: int, as_of: datetime | None = None, top: int = TOP_TOOLS
) -> dict[str, Any]:
    """One tenant over the `hours` before `as_of`: requests, errors, error rate, distinct tools called
    and users, the `top` tools by calls, and each active API key's use of its hourly and daily quota.

    Quota use counts the key's requests in the hour and the 24 hours before
    `as_of` that the limits let through (any status but 429: a refused request
    consumed nothing), against rate_limit_per_hour/per_day. A window count, not
    the limiter's bucket: it says how close a key runs to its limits.
    """
    _check_hours(hours)
    until = _utc(as_of)
    if _postgresql(conn):
        result = await conn.execute(
            sa.text("SELECT * FROM tenant_usage_summary(:tenant, :hours, :as_of, :top)"),
            {"tenant": tenant_id, "hours": hours, "as_of": until, "top": top},
        )
        row = result.mappings().one()
        return _usage(row, top_tools=row["top_tools"], api_keys=row["api_keys"], hours=hours, as_of=until)

    c = request_logs.c
    in_window = sa.and_(c.tenant_id == tenant_id, _window(until - timedelta(hours=hours), until))
    totals = (await conn.execute(
        sa.select(sa.func.count().label("requests"), _error_count().label("errors"),
                  sa.func.count(sa.distinct(c.user_id)).label("users")).where(in_window)
    )).one()
    tools = [
        {"tool_name": row.tool_name, "calls": row.calls, "errors": row.errors}
        for row in await conn.execute(
            sa.select(c.tool_name, sa.func.count().label("calls"), _error_count().label("errors"))
            .where(in_window, c.method == "tools/call", c.tool_name.is_not(None))
            .group_by(c.tool_name)
        )
    ]
    tools.sort(key=lambda t: (-t["calls"], t["tool_name"]))

    k = enhanced_api_keys.c
    keys = (await conn.execute(
        sa.select(k.id, k.name, k.rate_limit_per_hour, k.rate_limit_per_day)
        .where(k.tenant_id == tenant_id, k.is_active.is_(True))
    )).all()
    used: dict[uuid.UUID, tuple[int, int]] = {}
    if keys:
        hour = sa.func.coalesce(sa.func.sum(sa.case((c.created_at > until - _HOUR, 1), else_=0)), 0)
        for row in await conn.execute(
            sa.select(c.api_key_id, hour.label("last_hour"), sa.func.count().label("last_day"))
            .where(c.tenant_id == tenant_id, c.api_key_id.in_([key.id for key in keys]), c.status_code != 429,
                   _window(until - _DAY, until))
            .group_by(c.api_key_id)
        ):
            used[row.api_key_id] = (row.last_hour, row.last_day)
    api_keys = []
    for key in keys:
        last_hour, last_day = used.get(key.id, (0, 0))
        api_keys.append({
            "api_key_id": key.id, "name": key.name,
            "requests_last_hour": last_hour, "rate_limit_per_hour": key.rate_limit_per_hour,
            "hour_used": last_hour / key.rate_limit_per_hour,
            "requests_last_day": last_day, "rate_limit_per_day": key.rate_limit_per_day,
            "day_used": last_day / key.rate_limit_per_day,
        })
    api_keys.sort(key=lambda q: (-q["day_used"], q["name"], q["api_key_id"].int))
    return _usage({
        "tenant_id": tenant_id, "requests": totals.requests, "errors": totals.errors,
        "error_rate": _rate(totals.errors, totals.requests), "tools_used": len(tools), "users": totals.users,
    }, top_tools=tools[:top], api_keys=api_keys, hours=hours, as_of=until)


def _usage(row, *, top_tools: list[dict], api_keys: list[dict], hours: int, as_of: datetime) -> dict[str, Any]:
    return {
        "tenant_id": _uuid(row["tenant_id"]),
        "hours": hours,
        "as_of": as_of,
        "requests": int(row["requests"]),
        "errors": int(row["errors"]),
        "error_rate": float(row["error_rate"]),
        "tools_used": int(row["tools_used"]),
        "users": int(row["users"]),
        # Rebuilt in one key order: jsonb keeps object keys in an order of its own.
        "top_tools": [{"tool_name": t["tool_name"], "calls": int(t["calls"]), "errors": int(t["errors"])}
                      for t in top_tools],
        "api_keys": [{"api_key_id": _uuid(k["api_key_id"]), "name": k["name"],
                      "requests_last_hour": int(k["requests_last_hour"]),
                      "rate_limit_per_hour": int(k["rate_limit_per_hour"]), "hour_used": float(k["hour_used"]),
                      "requests_last_day": int(k["requests_last_day"]),
                      "rate_limit_per_day": int(k["rate_limit_per_day"]), "day_used": float(k["day_used"])}
                     for k in api_keys],
    }


# -- the database itself (the operator's) -------------------------------------------------------
async def database_report(conn: AsyncConnection) -> dict[str, Any]:
    """What can be known of the database: its size, and per table its rows and activity, per index its use.

    PostgreSQL: the `gateway_*` views (statistics collector: row counts are its
    live-row estimates, scans and changes since the statistics were reset).
    SQLite: the file's size in pages and exact row counts; it keeps no index statistics.
    """
    if _postgresql(conn):
        size = (await conn.execute(sa.text("SELECT * FROM gateway_database_size"))).mappings().one()
        tables = await conn.execute(sa.text("SELECT * FROM gateway_table_activity ORDER BY table_name COLLATE \"C\""))
        indexes = await conn.execute(
            sa.text("SELECT * FROM gateway_index_usage ORDER BY table_name COLLATE \"C\", index_name COLLATE \"C\"")
        )
        return {
            "dialect": "postgresql",
            "database": size["database"],
            "size_bytes": int(size["size_bytes"]),
            "tables": [dict(row) for row in tables.mappings()],
            "indexes": [dict(row) for row in indexes.mappings()],
        }

    pages = (await conn.execute(sa.text("PRAGMA page_count"))).scalar_one()
    page_size = (await conn.execute(sa.text("PRAGMA page_size"))).scalar_one()
    free = (await conn.execute(sa.text("PRAGMA freelist_count"))).scalar_one()
    files = (await conn.execute(sa.text("PRAGMA database_list"))).all()
    present = set(await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()))
    tables = []
    for name in sorted(present & set(metadata.tables)):
        rows = (await conn.execute(sa.select(sa.func.count()).select_from(metadata.tables[name]))).scalar_one()
        tables.append({"table_name": name, "rows": rows})
    return {
        "dialect": "sqlite",
        "database": next((f[2] for f in files if f[1] == "main"), None),
        "size_bytes": pages * page_size,
        "free_bytes": free * page_size,
        "tables": tables,
        "indexes": [],
    }
