"""Retention policies and alert rules through the admin API of a real gateway on PostgreSQL.

Who may set what (the operator the deployment's policies and any tenant's, a tenant ADMIN its own tenant's
overrides, never shorter audit retention than the deployment's), validation (every bad field one 422 naming
it, nothing written), tenant isolation (another tenant's policy, rule, server or events are refused exactly
like ones that do not exist), running the job now, and a rule's events as the evaluator leaves them.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from gateway.db.tables import alert_rules, request_logs, retention_policies, utcnow
from gateway.records.joblock import JobLock
from gateway.snapshot import read_version


async def _admin_key(gw, tenant_id: str, name: str) -> str:
    status, user = await gw.admin("POST", "/users", {"tenant_id": tenant_id, "username": name,
                                                     "email": f"{name}@example.com", "role": "ADMIN"})
    assert status == 201, user
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": name,
                                                       "scopes": ["admin", "read"]})
    assert status == 201, key
    return key["key"]


@pytest.fixture
async def two(gateway, mcp_upstream):
    acme = await gateway.tenancy("acme", mcp_upstream, server_name="files")
    globex = await gateway.tenancy("globex", mcp_upstream, server_name="files")
    return gateway, acme, globex, await _admin_key(gateway, acme.tenant_id, "acme-admin")


async def _count(gw, table) -> int:
    async with gw.gateway.engine.connect() as conn:
        return (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar()


def _fields(answer) -> set[str]:
    assert answer["error"]["code"] == "validation_failed", answer
    return {d["field"] for d in answer["error"]["details"]}


# -- retention policies --------------------------------------------------------------------------------------
async def test_the_operator_sets_defaults_and_overrides_a_tenant_admin_its_own(two):
    gw, acme, globex, acme_admin = two
    version = await read_version(gw.gateway.engine)
    status, default = await gw.admin("POST", "/retention-policies", {"table_name": "request_logs", "days": 14})
    assert status == 201 and default["tenant_id"] is None and default["scope"] == "deployment", default
    assert default["days"] == 14 and default["enabled"] is True and default["last_run_at"] is None
    status, again = await gw.admin("POST", "/retention-policies", {"table_name": "request_logs", "days": 7})
    assert status == 409 and "the deployment" in again["error"]["message"]
    status, theirs = await gw.admin("POST", "/retention-policies", {"tenant_id": globex.tenant_id,
                                                                    "table_name": "request_logs", "days": 60})
    assert status == 201 and theirs["scope"] == "tenant" and theirs["tenant_id"] == globex.tenant_id

    # A tenant ADMIN: its own tenant, whether it names it or not.
    status, mine = await gw.admin("POST", "/retention-policies", {"table_name": "request_logs", "days": 3},
                                  key=acme_admin)
    assert status == 201 and mine["tenant_id"] == acme.tenant_id, mine
    status, page = await gw.admin("GET", "/retention-policies", key=acme_admin)
    assert status == 200 and [p["id"] for p in page["items"]] == [mine["id"]]  # not globex's, not the defaults
    assert page["in_force"]["request_logs"] == {"days": 3, "source": "tenant policy"}
    assert page["in_force"]["audit_logs"] == {"days": 365, "source": "configuration"}
    status, page = await gw.admin("GET", "/retention-policies")
    assert status == 200 and {p["id"] for p in page["items"]} == {default["id"], theirs["id"], mine["id"]}
    assert page["in_force"]["request_logs"] == {"days": 14, "source": "deployment policy"}
    status, page = await gw.admin("GET", f"/retention-policies?tenant_id={globex.tenant_id}")
    assert [p["id"] for p in page["items"]] == [theirs["id"]] and page["in_force"]["request_logs"]["days"] == 60

    # Changing and deleting: its own only; the deployment's and another tenant's are "not found".
    status, changed = await gw.admin("PATCH", f"/retention-policies/{mine['id']}", {"days": 5, "enabled": False},
                                     key=acme_admin)
    assert status == 200 and changed["days"] == 5 and changed["enabled"] is False
    status, page = await gw.admin("GET", "/retention-policies", key=acme_admin)
    assert page["in_force"]["request_logs"] == {"days": 14, "source": "deployment policy"}  # disabled: the default
    missing = str(uuid.uuid4())
    for target in (default["id"], theirs["id"], missing):
        for method, body in (("PATCH", {"days": 1}), ("DELETE", None)):
            status, answer = await gw.admin(method, f"/retention-policies/{target}", body, key=acme_admin)
            assert status == 404 and answer["error"]["message"] == "retention policy not found", (target, answer)
    status, answer = await gw.admin("POST", "/retention-policies", {"tenant_id": globex.tenant_id,
                                                                    "table_name": "audit_logs", "days": 400},
                                    key=acme_admin)
    assert status == 404 and answer["error"]["message"] == "tenant not found"
    status, answer = await gw.admin("POST", "/retention-policies", {"tenant_id": missing,
                                                                    "table_name": "audit_logs", "days": 400},
                                    key=acme_admin)
    assert status == 404 and answer["error"]["message"] == "tenant not found"
    status, gone = await gw.admin("DELETE", f"/retention-policies/{mine['id']}", key=acme_admin)
    assert status == 200 and gone["id"] == mine["id"]
    async with gw.gateway.engine.connect() as conn:
        left = (await conn.execute(sa.select(retention_policies.c.id))).scalars().all()
    assert {str(i) for i in left} == {default["id"], theirs["id"]}
    # The data plane does not read policies: no configuration version was spent on them.
    assert await read_version(gw.gateway.engine) == version


async def test_a_tenant_admin_keeps_its_audit_trail_at_least_as_long_as_the_deployment(two):
    gw, acme, _, acme_admin = two
    status, answer = await gw.admin("POST", "/retention-policies", {"table_name": "audit_logs", "days": 30},
                                    key=acme_admin)
    assert status == 422 and _fields(answer) == {"days"} and "365" in answer["error"]["details"][0]["message"]
    status, kept = await gw.admin("POST", "/retention-policies", {"table_name": "audit_logs", "days": 400},
                                  key=acme_admin)
    assert status == 201, kept
    status, answer = await gw.admin("PATCH", f"/retention-policies/{kept['id']}", {"days": 364}, key=acme_admin)
    assert status == 422 and _fields(answer) == {"days"}
    # The operator decides the deployment's, and may shorten a tenant's.
    status, short = await gw.admin("PATCH", f"/retention-policies/{kept['id']}", {"days": 90})
    assert status == 200 and short["days"] == 90
    status, _ = await gw.admin("POST", "/retention-policies", {"table_name": "audit_logs", "days": 60})
    assert status == 201
    status, ok = await gw.admin("PATCH", f"/retention-policies/{kept['id']}", {"days": 61}, key=acme_admin)
    assert status == 200 and ok["days"] == 61


async def test_retention_validation_names_every_field_and_writes_nothing(two):
    gw, acme, _, acme_admin = two
    before = await _count(gw, retention_policies)
    for body, fields in (
        ({"table_name": "users", "days": 0, "colour": "red"}, {"table_name", "days", "colour"}),
        ({"days": 36_501}, {"table_name", "days"}),
        ({"table_name": "request_logs", "days": 5, "tenant_id": "nope", "enabled": "yes"}, {"tenant_id", "enabled"}),
    ):
        status, answer = await gw.admin("POST", "/retention-policies", body, key=acme_admin)
        assert status == 422 and _fields(answer) == fields, (body, answer)
    status, made = await gw.admin("POST", "/retention-policies", {"table_name": "server_metrics", "days": 9},
                                  key=acme_admin)
    assert status == 201
    for body, fields in (({}, {"$"}), ({"days": 0}, {"days"}), ({"table_name": "audit_logs"}, {"table_name"})):
        status, answer = await gw.admin("PATCH", f"/retention-policies/{made['id']}", body, key=acme_admin)
        assert status == 422 and _fields(answer) == fields, (body, answer)
    assert await _count(gw, retention_policies) == before + 1
    status, page = await gw.admin("GET", "/retention-policies", key=acme_admin)
    assert [p["days"] for p in page["items"]] == [9]


async def test_run_now_answers_what_was_deleted(two):
    gw, acme, globex, _ = two
    now = utcnow()
    async with gw.gateway.engine.begin() as conn:
        await conn.execute(sa.insert(request_logs), [
            dict(id=uuid.uuid4(), tenant_id=uuid.UUID(t.tenant_id), status_code=200, duration_ms=1.0,
                 request_bytes=1, response_bytes=1, created_at=now - timedelta(days=age))
            for t in (acme, globex) for age in (1, 20, 50)
        ])
    status, policy = await gw.admin("POST", "/retention-policies", {"tenant_id": acme.tenant_id,
                                                                    "table_name": "request_logs", "days": 10})
    assert status == 201
    status, report = await gw.admin("POST", "/retention-policies/run")
    assert status == 200, report
    assert report["deleted"]["request_logs"] == 3 and report["total"] == 3 and report["statements"] >= 2
    assert {(r["tenant_id"], r["deleted"]["request_logs"]) for r in report["by_tenant"]} == {
        (acme.tenant_id, 2), (globex.tenant_id, 1)}
    status, page = await gw.admin("GET", "/retention-policies")
    [row] = page["items"]
    assert row["id"] == policy["id"] and row["last_deleted"] == 2 and row["last_run_at"] is not None

    # While another process runs the job: 409, and nothing is deleted twice.
    other = JobLock(gw.gateway.engine, "retention")
    assert await other.try_acquire()
    try:
        status, answer = await gw.admin("POST", "/retention-policies/run")
        assert status == 409 and "another gateway process" in answer["error"]["message"], answer
    finally:
        await other.release()


# -- alert rules --------------------------------------------------------------------------------------------
async def test_alert_rules_are_created_listed_read_changed_and_deleted(two):
    gw, acme, globex, acme_admin = two
    version = await read_version(gw.gateway.engine)
    status, rule = await gw.admin("POST", "/alerts", {
        "name": "files-errors", "server_id": acme.server_id, "metric": "error_rate", "threshold": 0.05,
        "window_minutes": 10, "webhook_url": "https://hooks.example.com/alerts", "description": "page me",
    }, key=acme_admin)
    assert status == 201, rule
    assert rule["tenant_id"] == acme.tenant_id and rule["server_id"] == acme.server_id and rule["enabled"] is True
    assert rule["threshold"] == 0.05 and rule["window_minutes"] == 10 and rule["firing"] == 0
    status, health = await gw.admin("POST", "/alerts", {"name": "down", "metric": "health"}, key=acme_admin)
    assert status == 201 and health["threshold"] == 0 and health["server_id"] is None
    status, answer = await gw.admin("POST", "/alerts", {"name": "down", "metric": "health"}, key=acme_admin)
    assert status == 409 and "down" in answer["error"]["message"]
    status, _ = await gw.admin("POST", "/alerts", {"tenant_id": globex.tenant_id, "name": "down",
                                                   "metric": "health"})  # another tenant may use the name
    assert status == 201

    status, page = await gw.admin("GET", "/alerts?limit=1", key=acme_admin)
    assert status == 200 and len(page["items"]) == 1 and page["next_cursor"]
    status, rest = await gw.admin("GET", f"/alerts?limit=10&cursor={page['next_cursor']}", key=acme_admin)
    assert {r["id"] for r in page["items"] + rest["items"]} == {rule["id"], health["id"]}
    status, page = await gw.admin("GET", f"/alerts?server_id={acme.server_id}", key=acme_admin)
    assert [r["id"] for r in page["items"]] == [rule["id"]]
    status, got = await gw.admin("GET", f"/alerts/{rule['id']}", key=acme_admin)
    assert status == 200 and got == rule

    status, changed = await gw.admin("PATCH", f"/alerts/{rule['id']}", {
        "metric": "latency_p95", "threshold": 250, "webhook_url": None, "server_id": None}, key=acme_admin)
    assert status == 200, changed
    assert changed["metric"] == "latency_p95" and changed["threshold"] == 250 and changed["webhook_url"] is None
    assert changed["server_id"] is None and changed["name"] == "files-errors"
    status, answer = await gw.admin("PATCH", f"/alerts/{rule['id']}", {"name": "down"}, key=acme_admin)
    assert status == 409
    status, gone = await gw.admin("DELETE", f"/alerts/{rule['id']}", key=acme_admin)
    assert status == 200 and gone["id"] == rule["id"]
    status, answer = await gw.admin("GET", f"/alerts/{rule['id']}", key=acme_admin)
    assert status == 404 and answer["error"]["message"] == "alert rule not found"
    assert await read_version(gw.gateway.engine) == version


async def test_alert_validation_names_every_field_and_writes_nothing(two):
    gw, acme, globex, acme_admin = two
    before = await _count(gw, alert_rules)
    for body, fields in (
        ({}, {"name", "metric"}),
        ({"name": "x", "metric": "cpu", "window_minutes": 0}, {"metric", "window_minutes"}),
        ({"name": "x", "metric": "error_rate"}, {"threshold"}),
        ({"name": "x", "metric": "error_rate", "threshold": 5}, {"threshold"}),
        ({"name": "x", "metric": "latency_p99", "threshold": -1, "webhook_url": "ftp://example.com/x"},
         {"threshold", "webhook_url"}),
        ({"name": " ", "metric": "health", "webhook_url": "http:///nohost", "enabled": 1}, {"name", "webhook_url",
                                                                                             "enabled"}),
        ({"name": "x", "metric": "health", "window_minutes": 10_081, "extra": True}, {"window_minutes", "extra"}),
    ):
        status, answer = await gw.admin("POST", "/alerts", body, key=acme_admin)
        assert status == 422 and _fields(answer) == fields, (body, answer)
    # A server of another tenant is refused exactly like one that does not exist.
    answers = []
    for server in (globex.server_id, str(uuid.uuid4())):
        status, answer = await gw.admin("POST", "/alerts", {"name": "x", "metric": "health", "server_id": server},
                                        key=acme_admin)
        assert status == 422 and _fields(answer) == {"server_id"}
        answers.append(answer)
    assert answers[0] == answers[1]
    assert await _count(gw, alert_rules) == before

    status, rule = await gw.admin("POST", "/alerts", {"name": "slow", "metric": "latency_p95", "threshold": 300,
                                                      "server_id": acme.server_id}, key=acme_admin)
    assert status == 201
    for body, fields in (
        ({}, {"$"}),
        ({"metric": "error_rate"}, {"threshold"}),  # 300 is no error rate: say a new threshold
        ({"server_id": globex.server_id}, {"server_id"}),
        ({"threshold": None, "window_minutes": "5"}, {"threshold", "window_minutes"}),
        ({"tenant_id": globex.tenant_id}, {"tenant_id"}),
    ):
        status, answer = await gw.admin("PATCH", f"/alerts/{rule['id']}", body, key=acme_admin)
        assert status == 422 and _fields(answer) == fields, (body, answer)
    status, same = await gw.admin("GET", f"/alerts/{rule['id']}", key=acme_admin)
    assert same == rule
    status, ok = await gw.admin("PATCH", f"/alerts/{rule['id']}", {"metric": "error_rate", "threshold": 0.5},
                                key=acme_admin)
    assert status == 200 and ok["metric"] == "error_rate"


async def test_another_tenants_rules_and_events_are_not_found(two):
    gw, acme, globex, acme_admin = two
    status, theirs = await gw.admin("POST", "/alerts", {"tenant_id": globex.tenant_id, "name": "globex-secret",
                                                        "metric": "health"})
    assert status == 201
    status, page = await gw.admin("GET", "/alerts", key=acme_admin)
    assert status == 200 and page["items"] == []
    status, page = await gw.admin("GET", f"/alerts?tenant_id={globex.tenant_id}", key=acme_admin)
    assert status == 200 and page["items"] == []
    missing = str(uuid.uuid4())
    for method, suffix, body in (("GET", "", None), ("PATCH", "", {"enabled": False}), ("DELETE", "", None),
                                 ("GET", "/events", None)):
        answers = []
        for target in (theirs["id"], missing):
            status, answer = await gw.admin(method, f"/alerts/{target}{suffix}", body, key=acme_admin)
            answers.append((status, answer))
        assert answers[0] == answers[1] == (404, {"error": {"code": "not_found", "message": "alert rule not found"}})
    status, answer = await gw.admin("POST", "/alerts", {"tenant_id": globex.tenant_id, "name": "probe",
                                                        "metric": "health"}, key=acme_admin)
    assert status == 404 and answer["error"]["message"] == "tenant not found"
    status, still = await gw.admin("GET", f"/alerts/{theirs['id']}")
    assert still["enabled"] is True and still["name"] == "globex-secret"


async def test_a_rules_events_as_the_evaluator_leaves_them(two):
    gw, acme, _, acme_admin = two
    status, rule = await gw.admin("POST", "/alerts", {"name": "errors", "metric": "error_rate", "threshold": 0.5,
                                                      "server_id": acme.server_id}, key=acme_admin)
    assert status == 201
    evaluator = gw.gateway.alerts  # the gateway's own (the only process here: it holds the job)

    async def traffic(status_code: int, n: int) -> None:
        async with gw.gateway.engine.begin() as conn:
            await conn.execute(sa.insert(request_logs), [
                dict(id=uuid.uuid4(), tenant_id=uuid.UUID(acme.tenant_id), server_id=uuid.UUID(acme.server_id),
                     status_code=status_code, duration_ms=3.0, request_bytes=1, response_bytes=1, created_at=utcnow())
                for _ in range(n)])

    await traffic(503, 4)  # fires
    assert len((await evaluator.evaluate_once()).fired) == 1
    status, got = await gw.admin("GET", f"/alerts/{rule['id']}", key=acme_admin)
    assert got["firing"] == 1
    await traffic(200, 10)  # 4 of 14: resolves
    assert len((await evaluator.evaluate_once()).resolved) == 1
    await traffic(503, 20)  # 24 of 34: fires again, a second event
    assert len((await evaluator.evaluate_once()).fired) == 1

    status, page = await gw.admin("GET", f"/alerts/{rule['id']}/events", key=acme_admin)
    assert status == 200 and [e["state"] for e in page["items"]] == ["firing", "resolved"]  # newest first
    newest, oldest = page["items"]
    assert newest["value"] == pytest.approx(24 / 34) and newest["resolved_at"] is None
    assert oldest["value"] == pytest.approx(4 / 14) and oldest["resolved_at"] and "at or below 0.5" in oldest["message"]
    status, page = await gw.admin("GET", f"/alerts/{rule['id']}/events?state=resolved", key=acme_admin)
    assert [e["id"] for e in page["items"]] == [oldest["id"]]
    status, first = await gw.admin("GET", f"/alerts/{rule['id']}/events?limit=1", key=acme_admin)
    assert [e["id"] for e in first["items"]] == [newest["id"]] and first["next_cursor"] == newest["id"]
    status, second = await gw.admin("GET", f"/alerts/{rule['id']}/events?limit=1&cursor={first['next_cursor']}",
                                    key=acme_admin)
    assert [e["id"] for e in second["items"]] == [oldest["id"]]
    status, answer = await gw.admin("GET", f"/alerts/{rule['id']}/events?state=open", key=acme_admin)
    assert status == 422 and _fields(answer) == {"state"}
    status, answer = await gw.admin("GET", f"/alerts/{rule['id']}/events?cursor={uuid.uuid4()}", key=acme_admin)
    assert status == 422 and _fields(answer) == {"cursor"}
    # Deleting the rule deletes its events.
    status, _ = await gw.admin("DELETE", f"/alerts/{rule['id']}", key=acme_admin)
    assert status == 200
    status, _ = await gw.admin("GET", f"/alerts/{rule['id']}/events", key=acme_admin)
    assert status == 404


async def test_the_openapi_document_lists_every_route(gateway):
    status, document = await gateway.admin("GET", "/openapi.json")
    assert status == 200
    paths = document["paths"]
    for path, methods in (("/api/v1/retention-policies", {"get", "post"}),
                          ("/api/v1/retention-policies/{id}", {"patch", "delete"}),
                          ("/api/v1/retention-policies/run", {"post"}), ("/api/v1/alerts", {"get", "post"}),
                          ("/api/v1/alerts/{id}", {"get", "patch", "delete"}), ("/api/v1/alerts/{id}/events", {"get"})):
        assert methods <= set(paths[path]), path
    schema = paths["/api/v1/alerts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "AlertRuleCreate" in str(schema)
