"""The local admin commands' audit entries (cli.py `_admin`, records/cli_audit.py), on real databases.

- Each invocation of `gateway keys|servers|tenants|users|access|routes|config ...` and `bootstrap`
  writes exactly one entry, whatever its outcome, as the operator, under the action the admin API
  records for the same operation, chained with the rest (`gateway audit verify` passes), and logged
  on `gateway.audit` (the command's stderr); on SQLite and on PostgreSQL.
- Secrets read from stdin (`keys import`, `config set --sensitive`), given by mistake on the command
  line, or minted (`keys create`, `bootstrap`) are in neither the table nor the log.
- A tenant's `audit_redact_keys` apply to the entries of commands that name it.
- When the database refuses the entry (the login role may not INSERT into audit_logs), it goes to the
  audit spill, and a RecordWriter using that spill writes it into the chain, exactly once; when the
  spill cannot be written either, the command says so and exits 3.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import sqlalchemy as sa

from gateway import cli
from gateway.controlplane.api import ControlPlane
from gateway.db.engine import create_engine
from gateway.db.tables import audit_logs, users
from gateway.records.sinks import sink_for
from gateway.records.spill import Spill
from gateway.records.writer import RecordWriter

IMPORTED = "legacy-import-Secret-4f1c2a"  # a legacy key read by `keys import` from stdin
SENSITIVE = "smtp-Sensitive-Value-83b1e0"  # a `config set --sensitive` value read from stdin
ON_THE_LINE = "typed-by-Mistake-5d9e77"  # a sensitive value given on the command line: refused
UNKNOWN_KEY = "00000000-0000-4000-8000-00000000dead"


def _run(url: str, spill_dir: Path, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_DATABASE_URL=url, GATEWAY_WRITER_SPILL_DIR=str(spill_dir))
    return subprocess.run([sys.executable, "-m", "gateway", *argv], env=env, capture_output=True, text=True,
                          input=stdin, timeout=60)


def _emitted(done: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def _logged(stderr: str) -> list[dict]:
    """The `gateway.audit` lines of a command's stderr (text format: "<time> INFO gateway.audit: {...}")."""
    return [json.loads(line.split("INFO gateway.audit: ", 1)[1]) for line in stderr.splitlines()
            if "INFO gateway.audit: " in line]


async def _entries(url: str) -> list[dict]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(audit_logs).order_by(audit_logs.c.chain_seq))
            return [dict(row._mapping) for row in rows]
    finally:
        await engine.dispose()


async def _table_text(url: str) -> str:
    """Every column of every audit entry, as text: where a secret must not be found."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            columns = [sa.cast(c, sa.Text) for c in audit_logs.columns]
            return "\n".join(" ".join(str(v) for v in row) for row in await conn.execute(sa.select(*columns)))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.mark.timeout(300)  # 14 commands, each a Python process of its own (about 2 s each, more on a busy machine)
async def test_every_command_writes_one_entry_without_secrets(database_url, tmp_path):
    spill_dir = tmp_path / "spill"
    runs: list[tuple[tuple[str, ...], subprocess.CompletedProcess]] = []

    async def gateway(*argv: str, stdin: str | None = None, status: int = 0) -> subprocess.CompletedProcess:
        done = await asyncio.to_thread(_run, database_url, spill_dir, *argv, stdin=stdin)
        assert done.returncode == status, (argv, done.stdout, done.stderr)
        runs.append((argv, done))
        return done

    admin_key = _emitted(await gateway("bootstrap"))["admin_key"]
    tenant = _emitted(await gateway("tenants", "create", "acme"))["tenant_id"]
    await gateway("tenants", "create", "acme", status=2)  # a duplicate: 409
    user = _emitted(await gateway("users", "create", "alice", "alice@acme.test", "--tenant", tenant))["user_id"]
    imported = _emitted(await gateway("keys", "import", "--user", user, "--name", "legacy", stdin=IMPORTED + "\n"))
    await gateway("config", "set", "smtp.password", "--sensitive", stdin=SENSITIVE + "\n")
    refused = await gateway("config", "set", "smtp.password", ON_THE_LINE, "--sensitive", status=2)  # 422
    minted = _emitted(await gateway("keys", "create", "--user", user, "--name", "k1"))
    await gateway("keys", "revoke", UNKNOWN_KEY, status=2)  # 404
    await gateway("keys", "list")
    rule = _emitted(await gateway("access", "create", "allow", "--tenant", tenant))["access_rule_id"]
    await gateway("config", "list")
    secrets = (IMPORTED, SENSITIVE, ON_THE_LINE, minted["api_key"], admin_key)
    assert "stdin" in refused.stderr

    entries = await _entries(database_url)
    expected = [
        ("bootstrap", "admin.bootstrap", "success", None, "tenants"),
        ("tenants create", "admin.tenants.create", "success", None, "tenants"),
        ("tenants create", "admin.tenants.create", "error", 409, "tenants"),
        ("users create", "admin.users.write", "success", None, "users"),
        ("keys import", "admin.keys.import", "success", None, "api-keys"),
        ("config set", "admin.config.write", "success", None, "config"),
        ("config set", "admin.config.write", "error", 422, "config"),
        ("keys create", "admin.keys.write", "success", None, "api-keys"),
        ("keys revoke", "admin.keys.write", "error", 404, "api-keys"),
        ("keys list", "admin.keys.read", "success", None, "api-keys"),
        ("access create", "admin.create_access_rule", "success", None, "access-rules"),
        ("config list", "admin.config.read", "success", None, "config"),
    ]
    assert [(e["details"]["command"], e["action"], e["outcome"], e["error_code"], e["resource_type"])
            for e in entries] == expected
    platform = entries[0]["resource_id"]  # what bootstrap made
    async with _connect(database_url) as conn:
        operator = (await conn.execute(sa.select(users.c.id).where(users.c.username == "operator"))).scalar_one()
    for entry in entries:  # who: the operator, from no address
        assert str(entry["tenant_id"]) == platform and entry["user_id"] == operator, entry
        assert (entry["api_key_id"], entry["role"], entry["client_ip"]) == (None, "ADMIN", None)
        assert entry["details"]["via"] == "cli" and entry["duration_ms"] > 0 and entry["created_at"] is not None
    # What: creates name what they made, the rest the object named on the command line.
    assert [e["resource_id"] for e in entries[1:5]] == [tenant, None, user, imported["api_key_id"]]
    assert [e["resource_id"] for e in entries[5:]] == [
        "smtp.password", "smtp.password", minted["api_key_id"], UNKNOWN_KEY, None, rule, None]
    assert entries[2]["details"]["error"]["code"] == "conflict" and entries[2]["details"]["status"] == 409
    assert entries[6]["details"]["error"]["code"] == "validation_failed"
    assert entries[6]["details"]["args"]["value"] == "[REDACTED]"  # the mistyped secret, never kept
    assert entries[8]["details"]["error"] == {"code": "not_found", "message": "API key not found"}
    assert entries[4]["details"]["args"] == {"user": user, "name": "legacy"}
    assert entries[3]["details"]["args"] == {"username": "alice", "email": "alice@acme.test", "tenant": tenant,
                                             "role": "USER"}

    # Dual logging: each command logged its entry once on stderr, the same entry as the row.
    logged = [_logged(done.stderr) for _argv, done in runs]
    assert [len(lines) for lines in logged] == [1] * len(runs)
    assert [line[0]["id"] for line in logged] == [str(e["id"]) for e in entries]
    # No secret anywhere: not in the table (any column), not in the log, not in what was printed on stderr.
    table = await _table_text(database_url)
    stderr = "\n".join(done.stderr for _argv, done in runs)
    for secret in secrets:
        assert secret not in table and secret not in stderr, secret

    verified = await asyncio.to_thread(_run, database_url, spill_dir, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"ok tenant={platform} entries={len(expected)} chain_seq=1..{len(expected)}")
    assert not spill_dir.exists()  # the database took every entry


class _connect:
    """An engine connection for one look at the database."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    async def __aenter__(self):
        self.conn = await self.engine.connect()
        return self.conn

    async def __aexit__(self, *exc) -> None:
        await self.conn.close()
        await self.engine.dispose()


async def test_a_named_tenants_redaction_names_apply(sqlite_url, tmp_path):
    spill_dir = tmp_path / "spill"

    async def gateway(*argv: str) -> subprocess.CompletedProcess:
        done = await asyncio.to_thread(_run, sqlite_url, spill_dir, *argv)
        assert done.returncode == 0, (argv, done.stderr)
        return done

    await gateway("bootstrap")
    tenant = _emitted(await gateway("tenants", "create", "acme"))["tenant_id"]
    # The names apply to the very command that sets them (they are read after it).
    await gateway("tenants", "update", tenant, "--settings", '{"audit_redact_keys": ["motto"], "motto": "carpe"}')
    await gateway("config", "set", "acme.motto", '"per aspera"', "--tenant", tenant)  # acme's: redacted
    await gateway("config", "set", "acme.motto", '"ad astra"')  # the deployment's: acme's names do not apply
    entries = await _entries(sqlite_url)
    assert [e["action"] for e in entries[2:]] == ["admin.tenants.update", "admin.config.write", "admin.config.write"]
    assert entries[2]["details"]["args"]["settings"] == {"audit_redact_keys": ["motto"], "motto": "[REDACTED]"}
    assert entries[3]["details"]["args"]["value"] == "[REDACTED]"
    assert entries[4]["details"]["args"]["value"] == "ad astra"
    text = await _table_text(sqlite_url)
    assert "carpe" not in text and "per aspera" not in text


def test_each_command_is_recorded_as_the_admin_api_records_it():
    """The trail reads the same whichever door was used: each CLI command's action and collection are
    those of the admin API route doing the same."""
    same = {
        ("servers", "register"): ("POST", "/api/v1/servers"),
        ("servers", "list"): ("GET", "/api/v1/servers"),
        ("servers", "show"): ("GET", "/api/v1/servers/{id}"),
        ("servers", "update"): ("PATCH", "/api/v1/servers/{id}"),
        ("servers", "unregister"): ("DELETE", "/api/v1/servers/{id}"),
        ("servers", "discover"): ("POST", "/api/v1/servers/{id}/discover"),
        ("servers", "tools"): ("GET", "/api/v1/servers/{id}/tools"),
        ("servers", "approve"): ("POST", "/api/v1/servers/{id}/tools/{name}/approve"),
        ("keys", "create"): ("POST", "/api/v1/api-keys"),
        ("keys", "list"): ("GET", "/api/v1/api-keys"),
        ("keys", "revoke"): ("DELETE", "/api/v1/api-keys/{id}"),
        ("keys", "rotate"): ("POST", "/api/v1/api-keys/{id}/rotate"),
        ("keys", "import"): ("POST", "/api/v1/api-keys/import"),
        ("tenants", "create"): ("POST", "/api/v1/tenants"),
        ("tenants", "list"): ("GET", "/api/v1/tenants"),
        ("tenants", "update"): ("PATCH", "/api/v1/tenants/{id}"),
        ("users", "create"): ("POST", "/api/v1/users"),
        ("users", "update"): ("PATCH", "/api/v1/users/{id}"),
        ("access", "create"): ("POST", "/api/v1/access-rules"),
        ("access", "list"): ("GET", "/api/v1/access-rules"),
        ("access", "delete"): ("DELETE", "/api/v1/access-rules/{id}"),
        ("routes", "create"): ("POST", "/api/v1/routing-rules"),
        ("routes", "list"): ("GET", "/api/v1/routing-rules"),
        ("routes", "delete"): ("DELETE", "/api/v1/routing-rules/{id}"),
        ("config", "set"): ("PUT", "/api/v1/config/{key}"),
        ("config", "delete"): ("DELETE", "/api/v1/config/{key}"),
        ("config", "list"): ("GET", "/api/v1/config"),
        ("config", "history"): ("GET", "/api/v1/config/{key}/history"),
    }
    app = ControlPlane(None, None).build_app()  # type: ignore[arg-type]
    recorded = {}
    for route in app.router.routes():
        if route.method != "HEAD" and hasattr(route.handler, "permission"):
            # What ControlPlane._admin records: admin.<permission>, or admin.<handler> for a route naming none.
            action = "admin." + (route.handler.permission or route.handler.__name__)
            collection = route.resource.canonical.removeprefix("/api/v1/").split("/", 1)[0]
            recorded[(route.method, route.resource.canonical)] = (action, collection)
    parser = cli.build_parser()
    commands = {}
    for group, group_parser in _subparsers(parser).items():
        if group in ("serve", "migrate", "demo", "bootstrap", "audit"):
            continue
        for name, command_parser in _subparsers(group_parser).items():
            if (group, name) == ("config", "get"):
                continue  # the file's settings, or one stored setting (checked below)
            func = command_parser.get_default("func")
            commands[(group, name)] = (func.audit_action, func.audit_resource_type)
    assert set(commands) == set(same), "a CLI admin command without its admin API route in this test"
    for command, route in same.items():
        assert commands[command] == recorded[route], (command, route)
    bootstrap = _subparsers(parser)["bootstrap"].get_default("func")
    assert (bootstrap.audit_action, bootstrap.audit_resource_type) == ("admin.bootstrap", "tenants")


def _subparsers(parser) -> dict:
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


# -- when the database does not take the entry ----------------------------------------------------------
@pytest.fixture
def no_audit_insert(pg_url):
    """A login role that may do everything the operator does but INSERT into audit_logs; its URL."""
    role = f"gwcli_{uuid.uuid4().hex[:10]}"

    async def setup() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f"CREATE ROLE {role} LOGIN BYPASSRLS")
            await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
            await conn.execute(f"REVOKE INSERT ON audit_logs FROM {role}")
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
        finally:
            await conn.close()

    asyncio.run(setup())
    parts = urlsplit(pg_url)
    yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
    asyncio.run(teardown())


def _segments(spill_dir: Path) -> list[Path]:
    return sorted(spill_dir.glob("audit-*.spill")) if spill_dir.exists() else []


async def test_an_entry_the_database_refuses_is_spilled_and_replayed_once(pg_url, no_audit_insert, tmp_path):
    spill_dir = tmp_path / "spill"
    done = await asyncio.to_thread(_run, pg_url, spill_dir, "bootstrap")
    assert done.returncode == 0, done.stderr
    assert not _segments(spill_dir)

    done = await asyncio.to_thread(_run, no_audit_insert, spill_dir, "tenants", "create", "acme")
    assert done.returncode == 0, done.stderr  # the command succeeded, and its entry is durable on disk
    assert "audit spill" in done.stderr and str(spill_dir) in done.stderr
    tenant = _emitted(done)["tenant_id"]
    (logged,) = _logged(done.stderr)
    assert [e["action"] for e in await _entries(pg_url)] == ["admin.bootstrap"]
    (segment,) = _segments(spill_dir)
    assert logged["id"] in segment.read_text()

    # A gateway's writer on that database and spill directory adopts the segment and writes it into the chain.
    for _ in range(2):  # twice: the second finds nothing left to replay
        sink = await sink_for(pg_url)
        writer = RecordWriter(sink, flush_interval=0.05, spill=Spill(spill_dir, pg_url))
        await writer.start()
        try:
            await writer.flush()
        finally:
            await writer.stop()
            await sink.close()
    entries = await _entries(pg_url)
    assert [(e["action"], e["outcome"], e["resource_id"], e["details"]["via"]) for e in entries] == [
        ("admin.bootstrap", "success", entries[0]["resource_id"], "cli"),
        ("admin.tenants.create", "success", tenant, "cli"),
    ]
    assert str(entries[1]["id"]) == logged["id"] and entries[1]["chain_seq"] == 2
    assert not _segments(spill_dir)
    verified = await asyncio.to_thread(_run, pg_url, spill_dir, "audit", "verify")
    assert verified.returncode == 0 and "entries=2 " in verified.stdout, verified.stdout + verified.stderr


async def test_an_entry_stored_nowhere_fails_the_command(pg_url, no_audit_insert, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    spill_dir = blocker / "spill"  # cannot be created: its parent is a file
    done = await asyncio.to_thread(_run, pg_url, tmp_path / "spill", "bootstrap")
    assert done.returncode == 0, done.stderr

    done = await asyncio.to_thread(_run, no_audit_insert, spill_dir, "tenants", "create", "acme")
    assert done.returncode == cli.AUDIT_NOT_STORED, done.stderr
    assert "audit entry of this command was NOT stored" in done.stderr and "command itself succeeded" in done.stderr
    assert "tenant_id=" in done.stdout  # the change itself was made (and said)
    done = await asyncio.to_thread(_run, no_audit_insert, spill_dir, "tenants", "create", "acme")
    assert done.returncode == cli.AUDIT_NOT_STORED and "command itself failed" in done.stderr, done.stderr
    assert "already exists" in done.stderr
    assert [e["action"] for e in await _entries(pg_url)] == ["admin.bootstrap"]
