"""Analytics: SQL functions over the records, and the operator's monitoring views (PostgreSQL; nothing on SQLite).

records/analytics.py calls the functions on PostgreSQL and computes the same
answers in Python on SQLite; the two must agree to the last bit on the same
rows, so the definitions here are the reference for that module.

- `server_health_summary(tenant, as_of)`: per server its tenant, name, health
  status and last check, `avg_response_time`, and the requests and errors of
  the hour before `as_of` from request_logs.
- `request_performance_summary(hours, tenant, as_of)`: per tenant, server and
  method over (as_of - hours, as_of]: requests, errors, error rate, average and
  `percentile_cont` p50/p95/p99 of duration_ms.
- `tenant_usage_summary(tenant, hours, as_of)`: one row: requests, errors,
  error rate, distinct tools called, distinct users, the top tools by calls
  (JSON) and each active API key's use of its hourly and daily quota (JSON):
  its requests in the hour and the 24 hours before `as_of` that the limits
  let through (every status but 429), against rate_limit_per_hour/per_day.

An error is a request with `status_code >= 400` or a JSON-RPC `error_code`.
A NULL tenant means every tenant the caller can see. Text is ordered with
COLLATE "C" (code points, as Python orders str) so both databases list rows
alike; averages add durations in ascending order, as the Python side does.

The functions are SECURITY INVOKER (the default): run by `gateway_tenant`
(controlplane/service.py `scoped`), row-level security (migration 0006) still
shows them only that tenant's rows, whatever tenant they are asked about.
EXECUTE goes to `gateway_tenant` and not to PUBLIC. The views
(`gateway_database_size`, `gateway_table_activity`, `gateway_index_usage`)
read the statistics collector and are granted to nobody: the operator's
(owner's) alone.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

ROLE = "gateway_tenant"
# An error, as every summary counts it.
_ERROR = "(status_code >= 400 OR error_code IS NOT NULL)"

SERVER_HEALTH = f"""
CREATE FUNCTION server_health_summary(tenant uuid DEFAULT NULL, as_of timestamptz DEFAULT now())
RETURNS TABLE (
    server_id uuid, tenant_id uuid, name text, health_status text, health_checked_at timestamptz,
    avg_response_time double precision, requests bigint, errors bigint, error_rate double precision
)
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$
    SELECT s.id, s.tenant_id, s.name::text, s.health_status::text, s.health_checked_at, s.avg_response_time,
           COALESCE(r.requests, 0), COALESCE(r.errors, 0),
           CASE WHEN COALESCE(r.requests, 0) = 0 THEN 0::float8 ELSE r.errors::float8 / r.requests END
    FROM mcp_servers s
    LEFT JOIN (
        SELECT l.server_id, count(*) AS requests, count(*) FILTER (WHERE {_ERROR}) AS errors
        FROM request_logs l
        WHERE l.server_id IS NOT NULL
          AND l.created_at > as_of - interval '1 hour' AND l.created_at <= as_of
          AND (tenant IS NULL OR l.tenant_id = tenant)
        GROUP BY l.server_id
    ) r ON r.server_id = s.id
    WHERE tenant IS NULL OR s.tenant_id = tenant
    ORDER BY s.name COLLATE "C", s.id
$$
"""

REQUEST_PERFORMANCE = f"""
CREATE FUNCTION request_performance_summary(
    hours integer, tenant uuid DEFAULT NULL, as_of timestamptz DEFAULT now()
)
RETURNS TABLE (
    tenant_id uuid, server_id uuid, server_name text, method text, requests bigint, errors bigint,
    error_rate double precision, avg_ms double precision, p50_ms double precision, p95_ms double precision,
    p99_ms double precision
)
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$
    SELECT l.tenant_id, l.server_id, l.server_name::text, l.method::text, count(*),
           count(*) FILTER (WHERE {_ERROR}),
           (count(*) FILTER (WHERE {_ERROR}))::float8 / count(*),
           avg(l.duration_ms ORDER BY l.duration_ms),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY l.duration_ms),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY l.duration_ms),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY l.duration_ms)
    FROM request_logs l
    WHERE l.created_at > as_of - make_interval(hours => hours) AND l.created_at <= as_of
      AND (tenant IS NULL OR l.tenant_id = tenant)
    GROUP BY l.tenant_id, l.server_id, l.server_name, l.method
    ORDER BY l.server_name COLLATE "C" NULLS LAST, l.method COLLATE "C" NULLS LAST,
             l.tenant_id NULLS LAST, l.server_id NULLS LAST
$$
"""

TENANT_USAGE = f"""
CREATE FUNCTION tenant_usage_summary(
    tenant uuid, hours integer, as_of timestamptz DEFAULT now(), top integer DEFAULT 10
)
RETURNS TABLE (
    tenant_id uuid, requests bigint, errors bigint, error_rate double precision, tools_used bigint,
    users bigint, top_tools jsonb, api_keys jsonb
)
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$
    WITH window_rows AS (
        SELECT l.* FROM request_logs l
        WHERE l.tenant_id = tenant
          AND l.created_at > as_of - make_interval(hours => hours) AND l.created_at <= as_of
    ), tools AS (
        SELECT w.tool_name, count(*) AS calls, count(*) FILTER (WHERE {_ERROR}) AS errors
        FROM window_rows w
        WHERE w.method = 'tools/call' AND w.tool_name IS NOT NULL
        GROUP BY w.tool_name
    ), quota AS (
        SELECT k.id, k.name, k.rate_limit_per_hour, k.rate_limit_per_day,
               count(l.id) FILTER (WHERE l.created_at > as_of - interval '1 hour') AS last_hour,
               count(l.id) AS last_day
        FROM enhanced_api_keys k
        LEFT JOIN request_logs l
          ON l.api_key_id = k.id AND l.tenant_id = tenant AND l.status_code <> 429
         AND l.created_at > as_of - interval '24 hours' AND l.created_at <= as_of
        WHERE k.tenant_id = tenant AND k.is_active
        GROUP BY k.id, k.name, k.rate_limit_per_hour, k.rate_limit_per_day
    )
    SELECT tenant,
           (SELECT count(*) FROM window_rows),
           (SELECT count(*) FROM window_rows w WHERE {_ERROR}),
           (SELECT CASE WHEN count(*) = 0 THEN 0::float8
                        ELSE (count(*) FILTER (WHERE {_ERROR}))::float8 / count(*) END FROM window_rows),
           (SELECT count(*) FROM tools),
           (SELECT count(DISTINCT w.user_id) FROM window_rows w),
           COALESCE((
               SELECT jsonb_agg(jsonb_build_object('tool_name', t.tool_name, 'calls', t.calls, 'errors', t.errors)
                                ORDER BY t.calls DESC, t.tool_name COLLATE "C")
               FROM (SELECT * FROM tools ORDER BY calls DESC, tool_name COLLATE "C" LIMIT top) t
           ), '[]'::jsonb),
           COALESCE((
               SELECT jsonb_agg(jsonb_build_object(
                          'api_key_id', q.id, 'name', q.name,
                          'requests_last_hour', q.last_hour, 'rate_limit_per_hour', q.rate_limit_per_hour,
                          'hour_used', q.last_hour::float8 / q.rate_limit_per_hour,
                          'requests_last_day', q.last_day, 'rate_limit_per_day', q.rate_limit_per_day,
                          'day_used', q.last_day::float8 / q.rate_limit_per_day)
                        ORDER BY q.last_day::float8 / q.rate_limit_per_day DESC, q.name COLLATE "C", q.id)
               FROM quota q
           ), '[]'::jsonb)
$$
"""

DATABASE_SIZE = """
CREATE VIEW gateway_database_size AS
    SELECT current_database()::text AS database,
           pg_database_size(current_database()) AS size_bytes,
           pg_size_pretty(pg_database_size(current_database())) AS size_pretty
"""

TABLE_ACTIVITY = """
CREATE VIEW gateway_table_activity AS
    SELECT t.relname::text AS table_name,
           t.n_live_tup AS live_rows, t.n_dead_tup AS dead_rows,
           pg_total_relation_size(t.relid) AS total_bytes,
           pg_relation_size(t.relid) AS table_bytes,
           pg_indexes_size(t.relid) AS index_bytes,
           t.seq_scan, t.seq_tup_read, t.idx_scan, t.idx_tup_fetch,
           t.n_tup_ins AS inserted, t.n_tup_upd AS updated, t.n_tup_del AS deleted,
           t.last_vacuum, t.last_autovacuum, t.last_analyze, t.last_autoanalyze
    FROM pg_stat_user_tables t
    WHERE t.schemaname = current_schema()
"""

INDEX_USAGE = """
CREATE VIEW gateway_index_usage AS
    SELECT i.relname::text AS table_name, i.indexrelname::text AS index_name,
           i.idx_scan, i.idx_tup_read, i.idx_tup_fetch,
           pg_relation_size(i.indexrelid) AS size_bytes
    FROM pg_stat_user_indexes i
    WHERE i.schemaname = current_schema()
"""

FUNCTIONS = {
    "server_health_summary": "uuid, timestamptz",
    "request_performance_summary": "integer, uuid, timestamptz",
    "tenant_usage_summary": "uuid, integer, timestamptz, integer",
}
VIEWS = ("gateway_database_size", "gateway_table_activity", "gateway_index_usage")


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _postgresql():
        return  # SQLite: records/analytics.py computes the same answers in Python
    for statement in (SERVER_HEALTH, REQUEST_PERFORMANCE, TENANT_USAGE, DATABASE_SIZE, TABLE_ACTIVITY, INDEX_USAGE):
        op.execute(statement)
    for name, arguments in FUNCTIONS.items():
        # Functions are executable by PUBLIC unless revoked: only the gateway's roles call these.
        op.execute(f"REVOKE EXECUTE ON FUNCTION {name}({arguments}) FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {name}({arguments}) TO {ROLE}")
    for view in VIEWS:
        op.execute(f"REVOKE ALL ON {view} FROM PUBLIC")


def downgrade() -> None:
    if not _postgresql():
        return
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for name, arguments in FUNCTIONS.items():
        op.execute(f"DROP FUNCTION IF EXISTS {name}({arguments})")
