"""The `gateway` command: serve, migrate, bootstrap, demo, and local admin tools.

Local admin commands (`keys`, `servers`, `tenants`, `users`, `config set`) act on the
configured database directly as the operator, for the machine that runs the
gateway; remote administration goes through the admin API. Each invocation of
one (and `bootstrap`) writes an audit entry, as the admin API would for the
same operation (`_admin`, records/cli_audit.py). Lines meant for machines are
`name=value` on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import uuid

from gateway import config as config_module
from gateway.config import Config, ConfigError
from gateway.records.audit import AuditLogHandler

log = logging.getLogger("gateway.cli")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import orjson

        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        audit = getattr(record, "audit", None)
        if audit is not None:  # an audit entry (records/audit.py): the object itself, not its text
            entry["message"] = "audit entry"
            entry["audit"] = audit
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z).decode()
        return orjson.dumps(entry).decode()


def _formatter(cfg: Config) -> logging.Formatter:
    if cfg.log.format == "json":
        return _JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


# Libraries that log SQL statements with their parameters, and the lowest level each may log at whatever
# [log] level says: parameters are row values, among them a pending sign-in's PKCE verifier and nonce
# (controlplane/sessions.py). aiosqlite logs every call it runs in its thread at DEBUG ("executing
# functools.partial(<execute>, 'INSERT ...', (<parameters>))"); SQLAlchemy's engine logs statements and
# their parameters at INFO and result rows at DEBUG (it sets "sqlalchemy" to WARNING when imported; this
# keeps it there). asyncpg logs no statements.
_SQL_LOGGER_FLOORS = {"aiosqlite": logging.INFO, "sqlalchemy.engine": logging.WARNING}


def configure_logging(cfg: Config) -> None:
    formatter = _formatter(cfg)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log.level)
    for name, floor in _SQL_LOGGER_FLOORS.items():
        logging.getLogger(name).setLevel(max(floor, root.level))
    configure_audit_log(cfg, formatter)


def configure_audit_log(cfg: Config, formatter: logging.Formatter | None = None) -> None:
    """The `gateway.audit` logger alone (the local admin commands leave the rest of the log as it was)."""
    formatter = formatter or _formatter(cfg)
    # The audit trail's JSON lines ([audit] log) are a copy of the trail, not diagnostics: they are
    # written whatever the level of the rest of the log, to the same stream, a batch at a time.
    audit = logging.getLogger("gateway.audit")
    audit.setLevel(logging.INFO if cfg.audit.log else logging.WARNING)
    batched = AuditLogHandler(sys.stderr, json_lines=cfg.log.format == "json")
    batched.setFormatter(formatter)
    audit.handlers[:] = [batched]
    audit.propagate = False


def _load(args: argparse.Namespace) -> Config:
    return config_module.load(args.config)


def _emit(**values: str) -> None:
    for name, value in values.items():
        print(f"{name}={value}", flush=True)


# -- commands -------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import workers
    from gateway.app import Gateway, run, serve_until_signalled
    from gateway.db import migrate

    cfg = _load(args)
    configure_logging(cfg)
    if args.worker_index is not None:
        return _serve_worker(args, cfg)
    count = workers.parse_workers(args.workers)
    workers.check_config(cfg, count)
    try:
        if args.migrate:  # once, here: never in each worker
            migrate.upgrade(cfg.database.url)
        if count == 1:
            run(serve_until_signalled(Gateway(cfg)))
            return 0
        asyncio.run(migrate.check_current(cfg.database.url))  # once for every worker
    except migrate.SchemaNotCurrent as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    supervisor = workers.Supervisor(
        count, workers.worker_command(args.config, count), stop_timeout=cfg.writer.shutdown_timeout + 30.0
    )
    return supervisor.run()


def _serve_worker(args: argparse.Namespace, cfg: Config) -> int:
    """One worker of `serve --workers N`, started by the supervisor (workers.py)."""
    import errno

    from gateway import workers
    from gateway.app import run

    identity = workers.WorkerIdentity(args.worker_index, args.worker_count, args.worker_dir, args.worker_restarts)
    workers.name_worker_logs(identity.index)
    try:
        run(workers.serve_worker(cfg, identity))
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            # Another program holds the port (or it is not ours to bind): starting again will not help.
            print(f"gateway: worker {identity.index}: {exc}", file=sys.stderr)
            return workers.FATAL_STATUS
        raise
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from gateway.db import migrate

    cfg = _load(args)
    configure_logging(cfg)
    migrate.upgrade(cfg.database.url, args.revision)
    print(f"database {migrate.redact_url(cfg.database.url)} is at revision {migrate.head_revision()}", file=sys.stderr)
    return 0


async def _bootstrap(args, engine, _actor) -> dict:
    from gateway.controlplane import service
    from gateway.records.cli_audit import note_secret

    key = note_secret(args, await service.bootstrap(engine))  # cut out of the audit entry wherever it would appear
    print("Operator key created. It is shown once; store it now.", file=sys.stderr)
    _emit(admin_key=key)
    return {"id": (await service.operator_actor(engine)).tenant_id}  # what was made: the platform tenant


def cmd_config_get(args: argparse.Namespace) -> int:
    import msgspec

    cfg = _load(args)
    values = msgspec.to_builtins(cfg)
    if args.key and args.key not in {key for key, _env, _default in config_module.describe()}:
        return _admin(_config_show, "config.read", "config", "key")(args)  # not a file/env key: a stored system setting
    for key, env, _default in config_module.describe():
        section, name = key.split(".", 1)
        if args.key and key != args.key:
            continue
        value = values[section][name]
        if key in ("sessions.secret", "secrets.key"):
            value = "(set)" if value else "(generated, kept in the database)"
        if key == "database.url" or key == "redis.url":
            from gateway.db.migrate import redact_url

            value = redact_url(value) if value else value
        print(f"{key} = {value!r}    ({env})")
    return 0


# Exit status when a command's audit entry could be stored neither in the database nor in the spill.
AUDIT_NOT_STORED = 3


def _admin(coro_fn, action: str, resource_type: str | None, id_arg: str | None = None, *,
           bootstraps: bool = False):
    """Run `coro_fn(args, engine, operator_actor)` against the configured database, with its audit entry.

    Each invocation writes one audit entry (records/cli_audit.py), whatever
    its outcome, as the operator: `action` is what the admin API records for
    the same operation (a row of `permissions.PERMISSIONS`, or the API
    handler's name for the routes that name none), `resource_type` the API's
    collection, `id_arg` the argument naming the object acted on (None: a
    create's entry names what `coro_fn` returned, a list's nothing).
    `bootstraps`: the command makes the operator, so it runs first and the
    operator is looked up for the entry after it. No entry without an
    operator (not bootstrapped) or a current schema: there is no one to name.
    Exit status 2 for the failures the API answers 4xx, AUDIT_NOT_STORED if
    the entry was lost (said on stderr), whatever the command's own outcome.
    """
    from gateway.controlplane import service
    from gateway.db import migrate
    from gateway.db.engine import create_engine
    from gateway.records.cli_audit import CommandAudit

    def command(args: argparse.Namespace) -> int:
        cfg = _load(args)
        configure_audit_log(cfg)  # the entry's `gateway.audit` line goes to stderr, as with `serve`
        lost = False

        async def go():
            nonlocal lost
            audit = CommandAudit(cfg, args, action, resource_type, id_arg) if cfg.audit.enabled else None
            await migrate.check_current(cfg.database.url)
            engine = create_engine(cfg.database.url)
            failure: BaseException | None = None
            try:
                actor = None if bootstraps else await service.operator_actor(engine)
                try:
                    result = await coro_fn(args, engine, actor)
                except BaseException as exc:  # noqa: BLE001 - recorded, then raised again below
                    failure, result = exc, None
                if bootstraps:
                    try:
                        actor = await service.operator_actor(engine)
                    except Exception:  # noqa: BLE001 - no operator was made: no one to name in an entry
                        audit = None
                if audit is not None:
                    audit.ended(actor, result, failure)
                    await audit.read_redact_names(engine)
            finally:
                await engine.dispose()
            if audit is not None:
                lost = not await audit.store()
            if failure is not None:
                raise failure

        status = 0
        try:
            asyncio.run(go())
        except (service.NotFound, service.Conflict, service.Forbidden, migrate.SchemaNotCurrent) as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            status = 2
        except Exception as exc:  # validation errors carry their own message
            from gateway.controlplane.schemas import ValidationFailed

            if not isinstance(exc, ValidationFailed):
                raise
            print(f"gateway: invalid input: {exc}", file=sys.stderr)
            status = 2
        return AUDIT_NOT_STORED if lost else status

    # What its entries are recorded as (read by tests/test_cli_audit.py against the admin API's route table).
    command.audit_action, command.audit_resource_type = "admin." + action, resource_type  # type: ignore[attr-defined]
    return command


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Recompute every tenant's audit chain (or one's); print one line per chain; 1 if any is broken."""
    from gateway.db import migrate
    from gateway.db.engine import create_engine
    from gateway.records import chain

    cfg = _load(args)
    try:
        tenant = uuid.UUID(args.tenant) if args.tenant else None
    except ValueError:
        print(f"gateway: --tenant {args.tenant!r} is not a tenant id", file=sys.stderr)
        return 2

    async def go():
        await migrate.check_current(cfg.database.url)
        engine = create_engine(cfg.database.url)
        try:
            return await chain.verify(engine, tenant)
        finally:
            await engine.dispose()

    try:
        reports = asyncio.run(go())
    except migrate.SchemaNotCurrent as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if not reports:
        print("gateway: no audit entries", file=sys.stderr)
    broken = 0
    for report in reports:
        who = report.tenant_id if report.tenant_id is not None else "none"
        if report.ok:
            span = f"{report.first_seq}..{report.last_seq}" if report.entries else "-"
            print(f"ok tenant={who} entries={report.entries} chain_seq={span} head={report.head or '-'}")
        else:
            broken += 1
            print(f"broken tenant={who} chain_seq={report.broken_seq if report.broken_seq is not None else '-'} "
                  f"entry={report.broken_entry} checked={report.entries} reason={report.reason}")
    if broken:
        print(f"gateway: {broken} of {len(reports)} audit chains are broken", file=sys.stderr)
    return 1 if broken else 0


def _convert(cls, **fields):
    import msgspec

    from gateway.controlplane.schemas import validate

    return validate(cls, msgspec.json.encode({k: v for k, v in fields.items() if v is not None}))


async def _servers_register(args, engine, actor):
    from gateway.controlplane import schemas, service

    body = _convert(
        schemas.ServerCreate, name=args.name, endpoint_url=args.url, tenant_id=args.tenant,
        transport_type=args.transport, tags=args.tag or None,
    )
    server = await service.create_server(engine, actor, body)
    _emit(server_id=str(server["id"]))
    return server


async def _servers_list(args, engine, actor):
    from gateway.controlplane import service

    tenant = uuid.UUID(args.tenant) if args.tenant else None
    found = await service.list_servers(
        engine, actor, limit=500, after=None, tenant_id=tenant, name=args.name, tags=args.tag or (),
        transport_type=args.transport, health_status=args.health, tool=args.tool,
    )
    for s in found:
        print(f"{s['id']}  {s['name']:<24} {s['transport_type']:<9} {s['health_status']:<10} {s['endpoint_url']}")


# -- the registry: one server, its changes, what discovery found (registry/discovery.py) ---------------
async def _servers_show(args, engine, actor):
    import orjson

    from gateway.controlplane import service

    server = await service.get_server(engine, actor, _server_id(args))
    print(orjson.dumps(server, default=str, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z).decode())


async def _servers_update(args, engine, actor):
    import orjson

    from gateway.controlplane import schemas, service

    settings: dict = {}
    for assignment in args.set or ():
        key, sep, text = assignment.partition("=")
        if not sep:
            raise schemas.ValidationFailed([{"field": "set", "message": f"{assignment!r} is not KEY=VALUE"}])
        try:
            settings[key] = orjson.loads(text)  # 60, true, "auto" ...
        except orjson.JSONDecodeError:
            settings[key] = text  # a bare word: the text itself
    settings.update({key: None for key in args.unset or ()})
    fields = {"description": args.description, "endpoint_url": args.url, "transport_type": args.transport,
              "tags": args.tag, "settings": settings or None, "is_active": args.active}
    body = schemas.validate(schemas.ServerUpdate, orjson.dumps({k: v for k, v in fields.items() if v is not None}))
    server = await service.update_server(engine, actor, _server_id(args), body, _load(args).upstreams)
    await _signal_change(args, engine)
    state = "active" if server["is_active"] else "inactive"
    print(f"server {server['name']}: {server['transport_type']} {server['endpoint_url']}, {state}, "
          f"settings {orjson.dumps(server['settings']).decode()}", file=sys.stderr)
    return server


async def _servers_unregister(args, engine, actor):
    from gateway.controlplane import service

    server = await service.delete_server(engine, actor, _server_id(args))
    await _signal_change(args, engine)
    print(f"unregistered server {server['name']} ({server['id']})", file=sys.stderr)
    return server


async def _servers_discover(args, engine, actor):
    """Discover one server from this process (no gateway needs to run); running gateways get the result."""
    from gateway.auth.sealing import load_secrets
    from gateway.controlplane import service
    from gateway.registry.discovery import Discoverer, NotServed, OneShotClients
    from gateway.snapshot import SnapshotStore

    cfg = _load(args)
    server_id = _server_id(args)
    await service.get_server(engine, actor, server_id)  # "server not found" before anything starts
    redis_client = None
    if cfg.redis.url:
        import redis.asyncio as redis

        redis_client = redis.from_url(cfg.redis.url)
    store = SnapshotStore(engine, redis=redis_client, channel=f"{cfg.redis.key_prefix}config-changed",
                          upstream_defaults=cfg.upstreams)
    clients = OneShotClients(await load_secrets(engine, cfg.secrets.key), timeout=cfg.dataplane.upstream_timeout,
                             connect_timeout=cfg.dataplane.upstream_connect_timeout)
    discoverer = Discoverer(engine, store, clients.client_for, on_change=store.publish_change, redis=redis_client,
                            key_prefix=cfg.redis.key_prefix, defaults=cfg.upstreams)
    try:
        await store.refresh()
        try:
            outcome = await discoverer.discover(server_id)
        except NotServed as exc:
            raise service.Conflict(f"server {server_id} cannot be discovered: {exc}") from None
    finally:
        await discoverer.stop()
        await clients.close()
        if redis_client is not None:
            await redis_client.aclose()
    if not outcome.ok:
        raise service.Conflict(f"discovering server {server_id} failed: {outcome.error}")
    _emit(**{kind: str(count) for kind, count in outcome.counts.items()})
    for kind in outcome.counts:
        for what, names in (("added", outcome.added[kind]), ("updated", outcome.updated[kind]),
                            ("removed", outcome.removed[kind])):
            if names:
                print(f"{what} {kind.replace('_', ' ')}: {', '.join(names)}", file=sys.stderr)
    for name in outcome.flagged:
        print(f"tool {name!r} changed its definition since it was approved: review it "
              f"(`gateway servers tools {server_id} --changed`), then `gateway servers approve {server_id} {name}`",
              file=sys.stderr)
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)


async def _servers_tools(args, engine, actor):
    from gateway.registry import catalog

    after = None
    while True:
        page = await catalog.list_items(engine, actor, _server_id(args), "tools", limit=500, after=after,
                                        pin_status="changed" if args.changed else None)
        for tool in page:
            summary = (tool["title"] or tool["description"] or "").strip().splitlines()
            print(f"{tool['name']:<32} {tool['pin_status']:<8} {tool['definition_hash'][:12]}  "
                  f"{summary[0][:80] if summary else ''}")
        if len(page) < 500:
            return
        after = page[-1]["id"]


async def _servers_approve(args, engine, actor):
    from gateway.registry import catalog

    tool = await catalog.approve_tool(engine, actor, _server_id(args), args.tool, expected_hash=args.hash)
    await _signal_change(args, engine)
    print(f"approved definition {tool['definition_hash'][:12]} of tool {tool['name']!r}", file=sys.stderr)
    return tool


def _server_id(args) -> uuid.UUID:
    from gateway.controlplane import service

    try:
        return uuid.UUID(args.server_id)
    except ValueError:
        raise service.NotFound(f"{args.server_id!r} is not a server id") from None


async def _keys_create(args, engine, actor):
    from gateway.controlplane import schemas, service
    from gateway.records.cli_audit import note_secret

    body = _convert(
        schemas.ApiKeyCreate, user_id=args.user, name=args.name, scopes=args.scope or None,
        rate_limit_per_hour=args.per_hour, rate_limit_per_day=args.per_day,
    )
    key = await service.create_api_key(engine, actor, body)
    note_secret(args, key["key"])  # cut out of the audit entry wherever it would appear
    print("API key created. It is shown once; store it now.", file=sys.stderr)
    _emit(api_key_id=str(key["id"]), api_key=key["key"])
    return key


async def _keys_list(args, engine, actor):
    from gateway.controlplane import service

    for k in await service.list_api_keys(engine, actor, limit=500, after=None):
        state = "active" if k["is_active"] else "revoked"
        if k["is_active"] and k.get("replaced_by"):
            state = "rotated"
        shown = k["key_prefix"] if k["legacy"] else f"gw_{k['key_prefix']}_…"
        used = k["last_used_at"].isoformat(timespec="seconds") if k["last_used_at"] else "never used"
        print(f"{k['id']}  {shown:<24} {k['name']:<20} {state:<8} {','.join(k['scopes']):<24} {used}")


async def _keys_revoke(args, engine, actor):
    from gateway.controlplane import service

    key = await service.revoke_api_key(engine, actor, uuid.UUID(args.key_id))
    print(f"revoked {args.key_id}", file=sys.stderr)
    return key


async def _keys_rotate(args, engine, actor):
    from gateway.controlplane import schemas, service
    from gateway.records.cli_audit import note_secret

    cfg = _load(args)
    body = _convert(schemas.ApiKeyRotate, grace_seconds=args.grace)
    key = await service.rotate_api_key(
        engine, actor, uuid.UUID(args.key_id), body, default_grace=cfg.keys.rotation_grace,
        max_grace=cfg.keys.rotation_grace_max,
    )
    note_secret(args, key["key"])  # cut out of the audit entry wherever it would appear
    print("API key rotated. The new key is shown once; store it now.", file=sys.stderr)
    _emit(api_key_id=str(key["id"]), api_key=key["key"],
          old_key_valid_until=key["replaces"]["valid_until"].isoformat(timespec="seconds"))
    return key


async def _keys_import(args, engine, actor):
    from gateway.auth.sealing import load_secrets
    from gateway.controlplane import schemas, service
    from gateway.records.cli_audit import note_secret

    cfg = _load(args)
    # Read from stdin, never from the command line (process listings and shell history show arguments).
    plaintext = note_secret(args, sys.stdin.readline().strip())
    body = _convert(
        schemas.ApiKeyImport, user_id=args.user, name=args.name, key=plaintext, scopes=args.scope or None,
        rate_limit_per_hour=args.per_hour, rate_limit_per_day=args.per_day,
    )
    key = await service.import_api_key(engine, actor, body, await load_secrets(engine, cfg.secrets.key))
    _emit(api_key_id=str(key["id"]))
    return key


async def _tenants_list(args, engine, actor):
    from gateway.controlplane import service

    for t in await service.list_tenants(engine, actor, limit=500, after=None):
        print(f"{t['id']}  {t['name']:<24} {t['status']:<9} weight={t['weight']}")


async def _tenants_update(args, engine, actor):
    import orjson

    from gateway.controlplane import schemas, service

    try:
        settings = orjson.loads(args.settings) if args.settings is not None else None
    except orjson.JSONDecodeError as exc:
        raise schemas.ValidationFailed([{"field": "settings", "message": f"is not JSON: {exc}"}]) from None
    body = _convert(schemas.TenantUpdate, status=args.status, weight=args.weight, settings=settings)
    tenant = await service.update_tenant(engine, actor, uuid.UUID(args.tenant_id), body)
    print(f"tenant {tenant['name']}: {tenant['status']}, weight {tenant['weight']}", file=sys.stderr)
    return tenant


async def _users_update(args, engine, actor):
    from gateway.controlplane import schemas, service

    body = _convert(schemas.UserUpdate, role=args.role, is_active=args.active, email=args.email)
    user = await service.update_user(engine, actor, uuid.UUID(args.user_id), body)
    state = "active" if user["is_active"] else "deactivated"
    print(f"user {user['username']}: {user['role']}, {state}", file=sys.stderr)
    return user


async def _tenants_create(args, engine, actor):
    from gateway.controlplane import schemas, service

    tenant = await service.create_tenant(engine, actor, _convert(schemas.TenantCreate, name=args.name))
    _emit(tenant_id=str(tenant["id"]))
    return tenant


async def _users_create(args, engine, actor):
    from gateway.controlplane import schemas, service

    body = _convert(schemas.UserCreate, tenant_id=args.tenant, username=args.username, email=args.email,
                    role=args.role)
    user = await service.create_user(engine, actor, body)
    _emit(user_id=str(user["id"]))
    return user


async def _access_create(args, engine, actor):
    from gateway.controlplane import schemas, service

    body = _convert(
        schemas.AccessRuleCreate, effect=args.effect, tenant_id=args.tenant, role=args.role, user_id=args.user,
        api_key_id=args.key, server_id=args.server_id, server_name=args.server, tool=args.tool,
        resource=args.resource, prompt=args.prompt, description=args.description,
    )
    rule = await service.create_access_rule(engine, actor, body)
    _emit(access_rule_id=str(rule["id"]))
    return rule


def _describe_rule(rule: dict) -> str:
    subject = {"tenant": "tenant", "role": f"role {rule['role']}", "user": f"user {rule['user_id']}",
               "api_key": f"key {rule['api_key_id']}"}[rule["subject_type"]]
    where = f"server {rule['server_name']}" if rule["server_name"] else "every server"
    kind = rule["object_type"]
    what = where if kind == "server" else f"{kind} {rule[kind]!r} on {where}"
    return f"{rule['id']}  {rule['effect']:<5} {subject:<48} {what}"


async def _access_list(args, engine, actor):
    from gateway.controlplane import service

    tenant = uuid.UUID(args.tenant) if args.tenant else None
    for rule in await service.list_access_rules(engine, actor, limit=500, after=None, tenant_id=tenant):
        print(_describe_rule(rule))


async def _access_delete(args, engine, actor):
    from gateway.controlplane import service

    rule = await service.delete_access_rule(engine, actor, uuid.UUID(args.rule_id))
    print(f"deleted {_describe_rule(rule)}", file=sys.stderr)
    return rule


async def _routes_create(args, engine, actor):
    from gateway.controlplane import schemas, service

    try:
        tenant_id = uuid.UUID(args.tenant)
    except ValueError:
        raise schemas.ValidationFailed([{"field": "tenant_id", "message": "must be a UUID"}]) from None
    targets = []
    for i, given in enumerate(args.target or ()):
        server, _, weight = given.partition(":")
        try:
            server_id = str(uuid.UUID(server))
        except ValueError:  # a server name of the tenant
            found = await service.list_servers(engine, actor, limit=1, after=None, tenant_id=tenant_id, name=server)
            if not found:
                raise schemas.ValidationFailed([{"field": f"targets[{i}]",
                                                 "message": f"no server named {server!r} in the tenant"}]) from None
            server_id = str(found[0]["id"])
        targets.append({"server_id": server_id, "weight": int(weight) if weight.isdigit() else weight or 1})
    body = _convert(
        schemas.RoutingRuleCreate, name=args.name, tenant_id=args.tenant, priority=args.priority,
        enabled=False if args.disabled else None, match_server=args.server, match_tool=args.tool,
        match_tags=args.tag, strategy=args.strategy, targets=targets or None, target_tags=args.target_tag,
        description=args.description,
    )
    rule = await service.create_routing_rule(engine, actor, body)
    _emit(routing_rule_id=str(rule["id"]))
    return rule


def _describe_route(rule: dict) -> str:
    match = [f"server {rule['match_server'] or '*'}", f"tool {rule['match_tool'] or '*'}"]
    if rule["match_tags"]:
        match.append(f"tags {','.join(rule['match_tags'])}")
    replicas = [f"{t['server_name'] or t['server_id'] + ' (gone)'}:{t['weight']}" for t in rule["targets"]]
    replicas += [f"tags {','.join(rule['target_tags'])}"] if rule["target_tags"] else []
    state = "" if rule["enabled"] else " (disabled)"
    return (f"{rule['id']}  {rule['priority']:>5} {rule['name']:<24} {' '.join(match)} -> "
            f"{rule['strategy']} over {' + '.join(replicas)}{state}")


async def _routes_list(args, engine, actor):
    from gateway.controlplane import service

    tenant = uuid.UUID(args.tenant) if args.tenant else None
    rules = await service.list_routing_rules(engine, actor, limit=500, after=None, tenant_id=tenant)
    for rule in sorted(rules, key=lambda r: (str(r["tenant_id"]), r["priority"], r["name"])):
        print(_describe_route(rule))


async def _routes_delete(args, engine, actor):
    from gateway.controlplane import service

    rule = await service.delete_routing_rule(engine, actor, uuid.UUID(args.rule_id))
    print(f"deleted {_describe_route(rule)}", file=sys.stderr)
    return rule


# -- system configuration (controlplane/system_config.py) -----------------------------------------
def _config_scope(args) -> object:
    """--tenant: a tenant's id, or `default`; left out: the deployment's value (the CLI acts as the operator)."""
    import msgspec

    from gateway.controlplane import schemas

    if args.tenant is None:
        return msgspec.UNSET
    if args.tenant == "default":
        return None
    try:
        return uuid.UUID(args.tenant)
    except ValueError:
        raise schemas.ValidationFailed([{"field": "tenant_id", "message": "must be a UUID or 'default'"}]) from None


def _shown_value(setting: dict) -> str:
    import orjson

    if setting["sensitive"]:
        return "(sensitive, set)" if setting["set"] else "(sensitive, not set)"
    return orjson.dumps(setting["value"]).decode()


def _describe_setting(s: dict) -> str:
    scope = "default" if s["tenant_id"] is None else f"tenant {s['tenant_id']}"
    return (f"{s['key']:<32} {scope:<44} {s['category']:<12} v{s['version']:<4} "
            f"{'runtime' if s['runtime'] else 'restart':<8} {_shown_value(s)}")


async def _signal_change(args, engine) -> None:
    """Tell running gateways at once (Redis, when configured); without it their version poll finds the change."""
    from gateway.snapshot import read_version

    cfg = _load(args)
    if not cfg.redis.url:
        return
    import redis.asyncio as redis

    client = redis.from_url(cfg.redis.url)
    try:
        await client.publish(f"{cfg.redis.key_prefix}config-changed", str(await read_version(engine)))
    except Exception as exc:  # noqa: BLE001 - the poll still brings the change
        print(f"gateway: could not signal the change on Redis ({exc}); gateways see it at their next poll",
              file=sys.stderr)
    finally:
        await client.aclose()


async def _config_set(args, engine, actor):
    import orjson

    from gateway.auth.sealing import load_secrets
    from gateway.controlplane import schemas, system_config
    from gateway.records.cli_audit import note_secret

    if args.sensitive:
        if args.value is not None:
            raise schemas.ValidationFailed([{"field": "value", "message": "a sensitive value is read from stdin, "
                                                                          "never from the command line"}])
        # Read from stdin, never from the command line (process listings and shell history show arguments).
        text = note_secret(args, sys.stdin.readline().rstrip("\r\n"))
    elif args.value is None:
        raise schemas.ValidationFailed([{"field": "value", "message": "is required (or --sensitive, from stdin)"}])
    else:
        text = args.value
    try:
        value = orjson.loads(text)  # JSON when it is JSON (5, true, {"a": 1}, "quoted")
    except orjson.JSONDecodeError:
        value = text  # else the text itself
    fields = {"value": value, "category": args.category, "sensitive": True if args.sensitive else None,
              "runtime": args.runtime, "description": args.description}
    body = schemas.validate(schemas.ConfigSet, orjson.dumps({k: v for k, v in fields.items() if v is not None}))
    if args.tenant is not None:
        body.tenant_id = _config_scope(args)
    secrets = await load_secrets(engine, _load(args).secrets.key)
    setting = await system_config.set_setting(engine, actor, args.key, body, secrets)
    await _signal_change(args, engine)
    _emit(config_key=setting["key"], version=str(setting["version"]))
    print(f"set {_describe_setting(setting)} (applies {setting['applies']})", file=sys.stderr)
    return setting


async def _config_delete(args, engine, actor):
    from gateway.controlplane import system_config

    setting = await system_config.delete_setting(engine, actor, args.key, _config_scope(args))
    await _signal_change(args, engine)
    print(f"deleted {_describe_setting(setting)}", file=sys.stderr)
    return setting


async def _config_list(args, engine, actor):
    from gateway.controlplane import system_config

    settings = await system_config.list_settings(engine, actor, limit=500, after=None, requested=_config_scope(args),
                                                 category=args.category)
    for s in sorted(settings, key=lambda s: (s["key"], s["tenant_id"] is not None, str(s["tenant_id"]))):
        print(_describe_setting(s))


async def _config_history(args, engine, actor):
    import orjson

    from gateway.controlplane import system_config

    for h in await system_config.history(engine, actor, args.key, _config_scope(args), limit=500):
        value = "(sensitive)" if h["sensitive"] and h["set"] else orjson.dumps(h["value"]).decode()
        print(f"v{h['version']:<4} {h['created_at'].isoformat(timespec='seconds')} {h['change']:<6} "
              f"by {h['changed_by']}  {value if h['set'] else ''}".rstrip())


async def _config_show(args, engine, actor):
    from gateway.controlplane import system_config

    s = await system_config.get_effective(engine, actor, args.key, _config_scope(args))
    print(f"{s['key']} = {_shown_value(s)}    (stored: {s['source']}, v{s['version']}, {s['category']}, "
          f"applies {s['applies']})")


# -- demo -----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.app import Gateway, run, serve_until_signalled
    from gateway.db import migrate

    cfg = _load(args)
    configure_logging(cfg)
    migrate.upgrade(cfg.database.url)
    upstream_port = args.upstream_port or _free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.upstream", "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(upstream_port, upstream)
        key = asyncio.run(_demo_provision(cfg, f"http://127.0.0.1:{upstream_port}/mcp"))

        async def announce(gateway: Gateway) -> None:
            _emit(endpoint=f"{gateway.dataplane_url}/servers/demo/mcp", api_key=key)
            print(
                "Demo gateway is up. Try it with the MCP SDK:\n"
                f"  python -m gateway.demo.client {gateway.dataplane_url}/servers/demo/mcp <api_key>\n"
                "Stop with Ctrl-C.",
                file=sys.stderr,
                flush=True,
            )

        run(serve_until_signalled(Gateway(cfg), on_ready=announce))
    finally:
        upstream.terminate()
        try:
            upstream.wait(5)
        except subprocess.TimeoutExpired:
            upstream.kill()
            upstream.wait()
    return 0


async def _demo_provision(cfg: Config, upstream_url: str) -> str:
    """Idempotently create the demo tenant, user and server; mint a fresh demo key."""
    import sqlalchemy as sa

    from gateway.controlplane import schemas, service
    from gateway.db.engine import create_engine
    from gateway.db.tables import mcp_servers, tenants, users, utcnow

    engine = create_engine(cfg.database.url)
    try:
        try:
            actor = await service.operator_actor(engine)
        except service.NotFound:
            await service.bootstrap(engine)
            actor = await service.operator_actor(engine)
        async with engine.connect() as conn:
            tenant_id = (await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == "demo"))).scalar()
            user_id = (await conn.execute(sa.select(users.c.id).where(users.c.username == "demo"))).scalar()
        if tenant_id is None:
            tenant_id = (await service.create_tenant(engine, actor, schemas.TenantCreate(name="demo")))["id"]
        if user_id is None:
            body = schemas.UserCreate(username="demo", email="demo@gateway.invalid", tenant_id=tenant_id, role="USER")
            user_id = (await service.create_user(engine, actor, body))["id"]
        async with engine.begin() as conn:
            updated = await conn.execute(
                sa.update(mcp_servers)
                .where(mcp_servers.c.tenant_id == tenant_id, mcp_servers.c.name == "demo")
                .values(endpoint_url=upstream_url, updated_at=utcnow())
            )
            if updated.rowcount:
                await service.bump_version(conn)
        if not updated.rowcount:
            await service.create_server(
                engine, actor,
                schemas.ServerCreate(name="demo", endpoint_url=upstream_url, tenant_id=tenant_id, tags=["demo"]),
            )
        key = await service.create_api_key(
            engine, actor, schemas.ApiKeyCreate(user_id=user_id, name="demo", scopes=["proxy", "read"])
        )
        return key["key"]
    finally:
        await engine.dispose()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gateway: the demo upstream exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"gateway: the demo upstream did not start listening on port {port}")


# -- argument parsing ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="A multi-tenant gateway for MCP.")
    parser.add_argument("--config", "-c", help="TOML configuration file (default: $GATEWAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the data plane and the admin API")
    p.add_argument("--workers", default="1", metavar="N",
                   help="worker processes on the same ports (SO_REUSEPORT), supervised; 'auto': one per CPU "
                        "(default 1: this process serves). More than one needs Redis and PostgreSQL")
    p.add_argument("--migrate", action="store_true", help="apply the schema migrations first (once, before any worker)")
    # Set by the supervisor for each worker it starts (workers.py); not for people.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker-restarts", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    p.add_argument("revision", nargs="?", default="head")
    p.set_defaults(func=cmd_migrate)
    sub.add_parser("bootstrap", help="create the operator and print its admin key once").set_defaults(
        func=_admin(_bootstrap, "bootstrap", "tenants", bootstraps=True)
    )
    p = sub.add_parser("demo", help="run the gateway with a demo MCP server and print a key")
    p.add_argument("--upstream-port", type=int, default=0, help="port of the demo MCP server (default: any free)")
    p.set_defaults(func=cmd_demo)

    cfg = sub.add_parser("config", help="show the file/env configuration; set and list stored system settings")
    cfg = cfg.add_subparsers(dest="action", required=True)
    p = cfg.add_parser("get", help="print settings with the variables that override them (a key that is not one "
                                   "of them: the stored system setting in force)")
    p.add_argument("key", nargs="?")
    p.add_argument("--tenant", help="for a stored setting: the tenant whose value in force is shown")
    p.set_defaults(func=cmd_config_get)
    p = cfg.add_parser("set", help="store a system setting (version + 1; runtime ones reach every gateway within a "
                                   "second)")
    p.add_argument("key")
    p.add_argument("value", nargs="?", help="JSON, or else taken as a string; with --sensitive, read from stdin")
    p.add_argument("--tenant", help="a tenant's override (default: the deployment's value)")
    p.add_argument("--category", help="default: general (or what the setting already has)")
    p.add_argument("--sensitive", action="store_true", help="stored sealed, never shown; the value is read from stdin")
    p.add_argument("--runtime", action=argparse.BooleanOptionalAction, default=None,
                   help="applies without a restart (default: yes, or what the setting already has)")
    p.add_argument("--description")
    p.set_defaults(func=_admin(_config_set, "config.write", "config", "key"))
    p = cfg.add_parser("delete", help="delete a stored setting (a tenant's: the deployment's value applies again)")
    p.add_argument("key")
    p.add_argument("--tenant", help="a tenant's override (default: the deployment's value)")
    p.set_defaults(func=_admin(_config_delete, "config.write", "config", "key"))
    p = cfg.add_parser("list", help="list stored system settings (sensitive values never shown)")
    p.add_argument("--tenant", help="a tenant's overrides only, or 'default': the deployment's values only")
    p.add_argument("--category")
    p.set_defaults(func=_admin(_config_list, "config.read", "config"))
    p = cfg.add_parser("history", help="every change of a stored setting, newest first")
    p.add_argument("key")
    p.add_argument("--tenant", help="a tenant's override (default: the deployment's value)")
    p.set_defaults(func=_admin(_config_history, "config.read", "config", "key"))

    servers = sub.add_parser("servers", help="manage upstream servers").add_subparsers(dest="action", required=True)
    p = servers.add_parser("register", help="register an upstream MCP server")
    p.add_argument("name")
    p.add_argument("url")
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--transport", default="http", help="http, sse, websocket or stdio")
    p.add_argument("--tag", action="append")
    p.set_defaults(func=_admin(_servers_register, "servers.write", "servers"))
    p = servers.add_parser("list", help="list servers (each filter narrows)")
    p.add_argument("--tenant", help="tenant id")
    p.add_argument("--name")
    p.add_argument("--tag", action="append", help="carrying this tag (repeat: every one of them)")
    p.add_argument("--transport", choices=("http", "sse", "websocket", "stdio"))
    p.add_argument("--health", choices=("HEALTHY", "DEGRADED", "UNHEALTHY", "UNKNOWN", "MAINTENANCE"))
    p.add_argument("--tool", help="offering a tool of this name (as last discovered)")
    p.set_defaults(func=_admin(_servers_list, "servers.read", "servers"))
    p = servers.add_parser("show", help="one server as JSON (settings, capabilities, last discovery)")
    p.add_argument("server_id")
    p.set_defaults(func=_admin(_servers_show, "servers.read", "servers", "server_id"))
    p = servers.add_parser("update", help="change a server; what is not given stays")
    p.add_argument("server_id")
    p.add_argument("--description")
    p.add_argument("--url", help="the endpoint (a command line for stdio)")
    p.add_argument("--transport", help="http, sse, websocket or stdio")
    p.add_argument("--tag", action="append", help="replaces the tags (repeat for several)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a per-server setting of [upstreams], e.g. discovery_interval=60 (JSON values)")
    p.add_argument("--unset", action="append", metavar="KEY", help="drop a per-server setting (the default applies)")
    active = p.add_mutually_exclusive_group()
    active.add_argument("--activate", dest="active", action="store_const", const=True)
    active.add_argument("--deactivate", dest="active", action="store_const", const=False)
    p.set_defaults(func=_admin(_servers_update, "servers.write", "servers", "server_id"))
    p = servers.add_parser("unregister", help="remove a server, what was discovered of it and its access rules")
    p.add_argument("server_id")
    p.set_defaults(func=_admin(_servers_unregister, "servers.write", "servers", "server_id"))
    p = servers.add_parser("discover", help="read the server's tools, resources and prompts now")
    p.add_argument("server_id")
    p.set_defaults(func=_admin(_servers_discover, "servers.write", "servers", "server_id"))
    p = servers.add_parser("tools", help="the server's tools as last discovered, with their pin status")
    p.add_argument("server_id")
    p.add_argument("--changed", action="store_true", help="only tools whose definition changed since approval")
    p.set_defaults(func=_admin(_servers_tools, "servers.read", "servers", "server_id"))
    p = servers.add_parser("approve", help="approve a tool's current definition (it is no longer withheld)")
    p.add_argument("server_id")
    p.add_argument("tool")
    p.add_argument("--hash", help="the definition hash you reviewed (refused if the tool changed since)")
    p.set_defaults(func=_admin(_servers_approve, "servers.write", "servers", "server_id"))

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser("create", help="mint an API key (printed once)")
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("--name", required=True)
    p.add_argument("--scope", action="append", help="read, write, admin, proxy, metrics or health")
    p.add_argument("--per-hour", type=int)
    p.add_argument("--per-day", type=int)
    p.set_defaults(func=_admin(_keys_create, "keys.write", "api-keys"))
    keys.add_parser("list", help="list keys (never their secrets)").set_defaults(
        func=_admin(_keys_list, "keys.read", "api-keys")
    )
    p = keys.add_parser("revoke", help="revoke a key")
    p.add_argument("key_id")
    p.set_defaults(func=_admin(_keys_revoke, "keys.write", "api-keys", "key_id"))
    p = keys.add_parser("rotate", help="mint a replacement (printed once); the old key works for a grace period")
    p.add_argument("key_id")
    p.add_argument("--grace", type=int, help="seconds the old key keeps working (default: keys.rotation_grace)")
    p.set_defaults(func=_admin(_keys_rotate, "keys.write", "api-keys", "key_id"))
    p = keys.add_parser("import", help="accept a legacy key (read from stdin) as it is, for a user")
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("--name", required=True)
    p.add_argument("--scope", action="append", help="read, write, admin, proxy, metrics or health")
    p.add_argument("--per-hour", type=int)
    p.add_argument("--per-day", type=int)
    p.set_defaults(func=_admin(_keys_import, "keys.import", "api-keys"))

    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    p = tenants.add_parser("create")
    p.add_argument("name")
    p.set_defaults(func=_admin(_tenants_create, "tenants.create", "tenants"))
    tenants.add_parser("list").set_defaults(func=_admin(_tenants_list, "tenants.read", "tenants"))
    p = tenants.add_parser("update", help="suspend or reactivate a tenant, change its weight or settings")
    p.add_argument("tenant_id")
    p.add_argument("--status", choices=("active", "suspended"))
    p.add_argument("--weight", type=int, help="share under fair scheduling, 1..1000")
    p.add_argument("--settings", help="a JSON object that replaces the tenant's settings")
    p.set_defaults(func=_admin(_tenants_update, "tenants.update", "tenants", "tenant_id"))

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    p = users.add_parser("create")
    p.add_argument("username")
    p.add_argument("email")
    p.add_argument("--tenant", required=True)
    p.add_argument("--role", default="USER")
    p.set_defaults(func=_admin(_users_create, "users.write", "users"))
    p = users.add_parser("update", help="change a user's role, email, or deactivate it (its keys stop at once)")
    p.add_argument("user_id")
    p.add_argument("--role", choices=("ADMIN", "USER", "SERVICE", "READONLY"))
    p.add_argument("--email")
    active = p.add_mutually_exclusive_group()
    active.add_argument("--activate", dest="active", action="store_const", const=True)
    active.add_argument("--deactivate", dest="active", action="store_const", const=False)
    p.set_defaults(func=_admin(_users_update, "users.write", "users", "user_id"))

    access = sub.add_parser("access", help="manage access rules (allow/deny on servers, tools, resources, prompts)")
    access = access.add_subparsers(dest="action", required=True)
    p = access.add_parser("create", help="add a rule; deny wins, and an allowed object is closed to everyone else")
    p.add_argument("effect", choices=("allow", "deny"))
    p.add_argument("--tenant", required=True, help="tenant id")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--role", help="ADMIN, USER, SERVICE or READONLY (default: the whole tenant)")
    who.add_argument("--user", help="user id")
    who.add_argument("--key", help="API key id")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", help="server name (default: every server of the tenant)")
    where.add_argument("--server-id", help="server id")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--tool", help="tool name glob, e.g. 'delete_*' (default: the whole server)")
    what.add_argument("--resource", help="resource URI glob, e.g. 'file:///secret/*'")
    what.add_argument("--prompt", help="prompt name glob")
    p.add_argument("--description")
    p.set_defaults(func=_admin(_access_create, "create_access_rule", "access-rules"))
    p = access.add_parser("list", help="list rules")
    p.add_argument("--tenant", help="only this tenant's")
    p.set_defaults(func=_admin(_access_list, "list_access_rules", "access-rules"))
    p = access.add_parser("delete", help="delete a rule")
    p.add_argument("rule_id")
    p.set_defaults(func=_admin(_access_delete, "delete_access_rule", "access-rules", "rule_id"))

    routes = sub.add_parser("routes", help="manage routing rules (which replica of a server answers a call)")
    routes = routes.add_subparsers(dest="action", required=True)
    p = routes.add_parser("create", help="add a rule; the enabled rule with the lowest priority decides")
    p.add_argument("name")
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--server", help="glob over the addressed server's name (default: any)")
    p.add_argument("--tool", help="glob over the tool name (default: every call, lists included)")
    p.add_argument("--tag", action="append", help="the addressed server must carry this tag (repeatable)")
    p.add_argument("--target", action="append", metavar="SERVER[:WEIGHT]",
                   help="a replica: server id or name, weight 1..1000 (default 1); repeatable")
    p.add_argument("--target-tag", action="append", help="replicas: the tenant's servers carrying this tag")
    p.add_argument("--strategy", choices=("weighted_round_robin", "least_outstanding", "lowest_latency"))
    p.add_argument("--priority", type=int, help="0..10000, lowest first (default 100)")
    p.add_argument("--disabled", action="store_true", help="store it without routing by it")
    p.add_argument("--description")
    p.set_defaults(func=_admin(_routes_create, "routing.write", "routing-rules"))
    p = routes.add_parser("list", help="list rules, in the order they are tried")
    p.add_argument("--tenant", help="only this tenant's")
    p.set_defaults(func=_admin(_routes_list, "routing.read", "routing-rules"))
    p = routes.add_parser("delete", help="delete a rule")
    p.add_argument("rule_id")
    p.set_defaults(func=_admin(_routes_delete, "routing.write", "routing-rules", "rule_id"))

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="action", required=True)
    p = audit.add_parser("verify", help="recompute the audit hash chains; name the first broken link (exit 1)")
    p.add_argument("--tenant", help="only this tenant's chain")
    p.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
