"""The retention job against real PostgreSQL and SQLite: what is deleted and kept, batches, audit chains, one run
at a time.

Rows are inserted directly with the ages a test needs; the job runs as the gateway runs it
(`RetentionJob.run_now`, `run_if_due`, `start`). Batches are counted by the job's own counter and,
independently, by watching every DELETE the engine executes.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from gateway.config import RetentionConfig
from gateway.db.engine import create_engine
from gateway.db.tables import (
    alert_events,
    alert_rules,
    audit_logs,
    mcp_servers,
    request_logs,
    retention_policies,
    server_metrics,
    system_config,
    tenants,
    utcnow,
)
from gateway.records.joblock import JobLock
from gateway.records.retention import ANCHOR_KEY, RUN_KEY, RetentionBusy, RetentionJob, audit_anchor

DAY = timedelta(days=1)


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request):
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
async def engine(db_url):
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


async def _tenant(engine, name: str) -> uuid.UUID:
    tenant_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(sa.insert(tenants).values(id=tenant_id, name=name))
    return tenant_id


async def _server(engine, tenant_id: uuid.UUID, name: str) -> uuid.UUID:
    server_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(sa.insert(mcp_servers).values(id=server_id, tenant_id=tenant_id, name=name,
                                                         endpoint_url="http://127.0.0.1:9/mcp"))
    return server_id


async def _policy(engine, tenant_id, table: str, days: int, enabled: bool = True) -> uuid.UUID:
    policy_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(sa.insert(retention_policies).values(id=policy_id, tenant_id=tenant_id, table_name=table,
                                                                days=days, enabled=enabled))
    return policy_id


async def _request_logs(engine, tenant_id, ages_in_days, server_id=None) -> None:
    now = utcnow()
    rows = [dict(id=uuid.uuid4(), tenant_id=tenant_id, server_id=server_id, status_code=200, duration_ms=1.0,
                 request_bytes=1, response_bytes=1, created_at=now - age * DAY) for age in ages_in_days]
    async with engine.begin() as conn:
        await conn.execute(sa.insert(request_logs), rows)


async def _ages(engine, table, time_column, where) -> list[int]:
    """The ages (whole days, rounded) of the rows left, sorted."""
    now = utcnow()
    async with engine.connect() as conn:
        stamps = (await conn.execute(sa.select(time_column).where(where))).scalars().all()
    return sorted(round((now - (s if s.tzinfo else s.replace(tzinfo=now.tzinfo))) / DAY) for s in stamps)


def _is(column, value):
    return column.is_(None) if value is None else column == value


# -- what is deleted and what is kept ----------------------------------------------------------------
async def test_rows_older_than_the_policy_go_newer_stay_tenant_overrides_default(engine):
    acme, globex, initech = [await _tenant(engine, n) for n in ("acme", "globex", "initech")]
    default = await _policy(engine, None, "request_logs", 20)  # the deployment's
    acme_policy = await _policy(engine, acme, "request_logs", 10)  # acme keeps less
    await _policy(engine, initech, "request_logs", 2, enabled=False)  # off: the deployment's applies
    ages = [5, 15, 25, 40]
    for tenant in (acme, globex, initech, None):
        await _request_logs(engine, tenant, ages)

    job = RetentionJob(engine, RetentionConfig())
    report = await job.run_now()

    rl = request_logs
    assert await _ages(engine, rl, rl.c.created_at, rl.c.tenant_id == acme) == [5]
    for tenant in (globex, initech, None):  # the deployment's 20 days
        assert await _ages(engine, rl, rl.c.created_at, _is(rl.c.tenant_id, tenant)) == [5, 15], tenant
    assert report.deleted["request_logs"] == 3 + 2 + 2 + 2
    by_tenant = {t: counts for t, counts in report.by_tenant.items()}
    assert by_tenant[acme] == {"request_logs": 3} and by_tenant[None] == {"request_logs": 2}
    # Each policy row says when it ran and what it deleted (the default row: every tenant it applied to).
    async with engine.connect() as conn:
        rows = {r.id: r for r in await conn.execute(sa.select(retention_policies))}
    assert rows[acme_policy].last_deleted == 3 and rows[default].last_deleted == 6
    assert rows[acme_policy].last_run_at is not None and rows[default].last_run_at is not None
    # A second run finds nothing more.
    again = await job.run_now()
    assert again.deleted["request_logs"] == 0
    async with engine.connect() as conn:
        assert (await conn.execute(sa.select(retention_policies.c.last_deleted)
                                   .where(retention_policies.c.id == acme_policy))).scalar() == 0


async def test_configuration_days_apply_where_no_policy_exists_and_0_keeps_everything(engine):
    acme = await _tenant(engine, "acme")
    await _request_logs(engine, acme, [1, 29, 31, 400])
    job = RetentionJob(engine, RetentionConfig(request_logs_days=30))
    await job.run_now()
    rl = request_logs
    assert await _ages(engine, rl, rl.c.created_at, rl.c.tenant_id == acme) == [1, 29]

    await _request_logs(engine, acme, [500])
    await RetentionJob(engine, RetentionConfig(request_logs_days=0)).run_now()
    assert await _ages(engine, rl, rl.c.created_at, rl.c.tenant_id == acme) == [1, 29, 500]
    # A disabled deployment policy keeps everything of the tenants without their own.
    await _policy(engine, None, "request_logs", 1, enabled=False)
    await RetentionJob(engine, RetentionConfig(request_logs_days=30)).run_now()
    assert await _ages(engine, rl, rl.c.created_at, rl.c.tenant_id == acme) == [1, 29, 500]


async def test_server_metrics_and_alert_events(engine):
    acme, globex = await _tenant(engine, "acme"), await _tenant(engine, "globex")
    files = await _server(engine, acme, "files")
    gone = uuid.uuid4()  # a server unregistered since: its rows carry globex as their tenant
    await _policy(engine, acme, "server_metrics", 7)
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(sa.insert(server_metrics), [
            dict(id=uuid.uuid4(), tenant_id=tenant, server_id=server, window_start=now - age * DAY,
                 window_seconds=60, request_count=1, error_count=0)
            for tenant, server in ((acme, files), (globex, gone)) for age in (1, 10, 40)
        ])
        rule = uuid.uuid4()
        await conn.execute(sa.insert(alert_rules).values(id=rule, tenant_id=acme, name="r", metric="error_rate",
                                                         threshold=0.5))
        await conn.execute(sa.insert(alert_events), [
            dict(id=uuid.uuid4(), tenant_id=acme, rule_id=rule, state=state, threshold=0.5, fired_at=now - age * DAY,
                 resolved_at=now - age * DAY if state == "resolved" else None)
            for state, age in (("resolved", 100), ("resolved", 10), ("firing", 100))
        ])
    await RetentionJob(engine, RetentionConfig()).run_now()  # server_metrics 30, alert_events 90 by default
    sm = server_metrics
    assert await _ages(engine, sm, sm.c.window_start, sm.c.server_id == files) == [1]  # acme's 7 days
    assert await _ages(engine, sm, sm.c.window_start, sm.c.server_id == gone) == [1, 10]  # the default 30
    async with engine.connect() as conn:
        left = sorted((r.state, round((now - (r.fired_at if r.fired_at.tzinfo else r.fired_at.replace(
            tzinfo=now.tzinfo))) / DAY)) for r in await conn.execute(sa.select(alert_events)))
    assert left == [("firing", 100), ("resolved", 10)]  # an alert still firing is kept, whatever its age


# -- batches -------------------------------------------------------------------------------------------
async def test_deletes_in_batches_each_its_own_statement(engine):
    acme = await _tenant(engine, "acme")
    await _request_logs(engine, acme, [40] * 50 + [1] * 3)
    deletes: list[int] = []

    def watch(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("DELETE FROM REQUEST_LOGS"):
            deletes.append(cursor.rowcount)

    sa.event.listen(engine.sync_engine, "after_cursor_execute", watch)
    job = RetentionJob(engine, RetentionConfig(batch_size=7, batch_pause=0))
    report = await job.run_now()
    sa.event.remove(engine.sync_engine, "after_cursor_execute", watch)

    assert report.deleted["request_logs"] == 50
    # 7 full batches, then one of 1 row: 8 statements, none over the batch size.
    assert job.statements == report.statements == 8
    assert deletes == [7] * 7 + [1]
    rl = request_logs
    assert await _ages(engine, rl, rl.c.created_at, rl.c.tenant_id == acme) == [1, 1, 1]


# -- audit chains ----------------------------------------------------------------------------------------
async def _chain(engine, tenant_id, ages_in_days) -> list[str]:
    """Chained audit entries seq 1.. with these ages; their hashes (made up: retention does not check them)."""
    now = utcnow()
    hashes = [uuid.uuid4().hex + uuid.uuid4().hex for _ in ages_in_days]
    rows = [dict(id=uuid.uuid4(), tenant_id=tenant_id, action="tools/call", outcome="success",
                 created_at=now - age * DAY, chain_seq=seq, prev_hash="0" * 64 if seq == 1 else hashes[seq - 2],
                 entry_hash=hashes[seq - 1])
            for seq, age in enumerate(ages_in_days, start=1)]
    async with engine.begin() as conn:
        await conn.execute(sa.insert(audit_logs), rows)
    return hashes


async def _seqs(engine, tenant_id) -> list[int | None]:
    async with engine.connect() as conn:
        return sorted((await conn.execute(sa.select(audit_logs.c.chain_seq).where(
            _is(audit_logs.c.tenant_id, tenant_id)))).scalars(), key=lambda s: (s is not None, s or 0))


async def test_audit_chains_lose_only_their_oldest_end_and_keep_an_anchor(engine):
    acme, globex = await _tenant(engine, "acme"), await _tenant(engine, "globex")
    # acme: 1..6 old, 7 new, 8 old (written late, e.g. replayed from the spill file), 9 and 10 new.
    acme_hashes = await _chain(engine, acme, [400] * 6 + [1, 400, 1, 1])
    # globex: every entry old; the newest (the chain's head) stays all the same.
    globex_hashes = await _chain(engine, globex, [400] * 5)
    now = utcnow()
    async with engine.begin() as conn:  # an entry outside any chain goes by age alone
        await conn.execute(sa.insert(audit_logs).values(id=uuid.uuid4(), tenant_id=acme, action="x",
                                                        outcome="success", created_at=now - 400 * DAY))

    job = RetentionJob(engine, RetentionConfig(batch_size=4, batch_pause=0))  # audit_logs: 365 days
    report = await job.run_now()

    assert await _seqs(engine, acme) == [7, 8, 9, 10]
    assert await _seqs(engine, globex) == [5]
    assert report.deleted["audit_logs"] == 6 + 1 + 4
    anchor = await audit_anchor(engine, acme)
    assert anchor["chain_seq"] == 6 and anchor["entry_hash"] == acme_hashes[5]
    anchor = await audit_anchor(engine, globex)
    assert anchor["chain_seq"] == 4 and anchor["entry_hash"] == globex_hashes[3]
    # What the verifier checks: the first entry left links to the anchor.
    async with engine.connect() as conn:
        first = (await conn.execute(sa.select(audit_logs.c.prev_hash).where(
            audit_logs.c.tenant_id == acme, audit_logs.c.chain_seq == 7))).scalar()
    assert first == acme_hashes[5]
    # The anchor is a system_config row of the tenant's, not a setting anyone changes.
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(system_config).where(system_config.c.key == ANCHOR_KEY,
                                                                 system_config.c.tenant_id == acme))).one()
    assert row.category == "records" and row.runtime is False and row.sensitive is False

    # Later: the chain grows, entry 7 ages out; the anchor moves forward, never back.
    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_logs).where(audit_logs.c.tenant_id == acme, audit_logs.c.chain_seq == 7)
                           .values(created_at=now - 500 * DAY))
    await job.run_now()
    assert await _seqs(engine, acme) == [9, 10]  # 7 and 8 both old now
    assert (await audit_anchor(engine, acme))["chain_seq"] == 8


# -- one run at a time -----------------------------------------------------------------------------------
async def test_two_jobs_on_one_database_never_run_at_once(db_url):
    engines = [create_engine(db_url), create_engine(db_url)]  # two gateway processes, as far as the lock knows
    try:
        acme = await _tenant(engines[0], "acme")
        await _request_logs(engines[0], acme, [40] * 30)
        settings = RetentionConfig(batch_size=3, batch_pause=0.05, interval=3600)
        first, second = RetentionJob(engines[0], settings), RetentionJob(engines[1], settings)
        running = asyncio.create_task(first.run_now())
        while first.statements == 0:  # the first is mid-run, between batches
            await asyncio.sleep(0.005)
        with pytest.raises(RetentionBusy, match="in progress"):
            await second.run_now()
        with pytest.raises(RetentionBusy):
            await second.run_if_due()
        with pytest.raises(RetentionBusy, match="in this process"):
            await first.run_now()  # and a second run of the same job
        report = await running
        assert report.deleted["request_logs"] == 30 and second.statements == 0
        # Not due: the first ran within the interval (the record every process reads says when).
        skipped, last = await second.run_if_due()
        assert skipped is None and last is not None and second.runs == 0
        async with engines[1].connect() as conn:
            marker = (await conn.execute(sa.select(system_config.c.value).where(
                system_config.c.key == RUN_KEY, system_config.c.tenant_id.is_(None)))).scalar()
        assert marker["deleted"]["request_logs"] == 30 and marker["statements"] == report.statements
        # The lock was given back: the second may run now.
        assert (await second.run_now()).deleted["request_logs"] == 0
    finally:
        for engine in engines:
            await engine.dispose()


async def test_the_lock_ends_with_its_holders_session(pg_url):
    engines = [create_engine(pg_url), create_engine(pg_url)]
    try:
        a, b = JobLock(engines[0], "retention"), JobLock(engines[1], "retention")
        assert await a.try_acquire() and await a.try_acquire()  # held, and still held
        assert not await b.try_acquire()
        async with engines[1].connect() as conn:  # the holder's process dies: its session ends
            await conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"))
            await conn.commit()
        for _ in range(100):
            if await b.try_acquire():
                break
            await asyncio.sleep(0.02)
        assert b.held
        assert not await a.try_acquire()  # a finds its session gone, and the lock another's
        await b.release()
        assert await a.try_acquire()
        async with engines[1].connect() as conn:  # the database goes away under a holder that is stopping
            await conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"))
            await conn.commit()
        await a.release()  # does not raise: a gateway stopping goes on to flush its records
        assert not a.held and await b.try_acquire()
        await b.release()
    finally:
        for engine in engines:
            await engine.dispose()


async def test_the_schedule_runs_the_job_and_stop_ends_it(engine):
    acme = await _tenant(engine, "acme")
    await _request_logs(engine, acme, [40, 1])
    job = RetentionJob(engine, RetentionConfig(interval=0.05))
    await job.start()
    try:
        for _ in range(400):
            if job.runs:
                break
            await asyncio.sleep(0.01)
        assert job.runs >= 1 and job.last_report.deleted["request_logs"] == 1
    finally:
        await job.stop()
    assert not job.lock.held
    disabled = RetentionJob(engine, RetentionConfig(enabled=False))
    await disabled.start()  # the schedule is off; run_now still works
    assert disabled._task is None
    await disabled.stop()
