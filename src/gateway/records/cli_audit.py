"""Audit entries for the local admin commands: one per invocation, whatever its outcome.

`gateway keys create`, `servers register`, `config set`, ... and `bootstrap`
(cli.py `_admin`) act on the database as the operator, not through the admin
API, so `ControlPlane._admin` never sees them. Each invocation gets its entry
here instead, the way the gateway makes every entry: built with
`AuditTrail.admin_row`, prepared by `AuditTrail.prepare` (sanitized, bounded,
logged on `gateway.audit`: the CLI's logging set-up decides where that line
goes), then numbered and hashed into the operator's tenant's chain by the
sink's write (records/sinks.py, records/chain.py).

The entry's action is the one the admin API records for the same operation
(`admin.keys.write`, `admin.create_access_rule`, ...), its error code the
HTTP status the API would have answered, so the trail reads the same
whichever door was used; its details say it came from the command line:
`{"via": "cli", "command", "args", "status", "error"?}`. A command's output
is never put in an entry, and every secret the invocation read from stdin or
minted is cut out of the entry's text wherever it appears, besides the
sanitizer's own nets.

If the database does not take the entry, it is appended to the audit spill
(records/spill.py) in the directory the gateway uses, where a running gateway
adopts it (records/writer.py, every `ADOPT_INTERVAL_SECONDS`) and replays it
into the chain. Only if the spill cannot be written either is the entry lost;
`CommandAudit.store` then says so on stderr and returns False, and the
command must exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import Config
from gateway.records import chain
from gateway.records.audit import AuditTrail
from gateway.records.sanitize import REDACTED
from gateway.records.sinks import SinkError, sink_for
from gateway.records.spill import Spill, default_dir

TABLE = "audit_logs"
# How long the database may take to accept the entry (connecting included) before it goes to the spill.
WRITE_TIMEOUT_SECONDS = 30.0
# The attribute of a command's argparse namespace holding the secrets it read from stdin (`note_secret`).
_SECRETS = "_audit_secrets"
# Parts of the namespace that are not the operation's arguments.
_NOT_ARGS = frozenset({"func", "config", "command", "action"})
# A secret shorter than this is not searched for in the entry's text (it would match by chance and
# mangle the entry); such a secret never gets there anyway: nothing read from stdin is put in an entry.
_MIN_SCRUBBED = 4


def note_secret(args: argparse.Namespace, secret: str) -> str:
    """Remember a secret this invocation read (from stdin), so its entry can be scrubbed of it; returns it."""
    vars(args).setdefault(_SECRETS, []).append(secret)
    return secret


def command_name(args: argparse.Namespace) -> str:
    """`keys create`, `config set`, `bootstrap`: the command line's words that chose the command."""
    return " ".join(word for word in (args.command, getattr(args, "action", None)) if word)


def _failure(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and error the admin API would have answered for the same failure (controlplane/api.py)."""
    from gateway.controlplane import schemas, service

    if isinstance(exc, schemas.ValidationFailed):
        return 422, {"code": "validation_failed", "message": str(exc)}
    if isinstance(exc, service.NotFound):
        return 404, {"code": "not_found", "message": str(exc)}
    if isinstance(exc, service.Conflict):
        return 409, {"code": "conflict", "message": str(exc)}
    if isinstance(exc, service.Forbidden):
        return 403, {"code": "forbidden", "message": str(exc)}
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
        return 500, {"code": "interrupted"}
    # Only the type: the text of an unexpected error may quote values (SQLAlchemy's names the statement's parameters).
    return 500, {"code": "internal_error", "exception": type(exc).__name__}


class CommandAudit:
    """One CLI admin command's audit entry: begun before the command, ended with its outcome, then stored.

    `action`: the admin API's name for the operation without its `admin.`
    prefix; `resource_type`: the API's collection (`servers`, `api-keys`,
    ...); `id_arg`: the argument naming the object acted on (None: a create's
    entry names what it made, a list's nothing).
    """

    def __init__(self, cfg: Config, args: argparse.Namespace, action: str, resource_type: str | None,
                 id_arg: str | None = None) -> None:
        self._started = time.perf_counter()
        self._url = cfg.database.url
        self._spill_dir = cfg.writer.spill_dir or default_dir(cfg.database.url)
        self._segment_bytes = cfg.writer.spill_segment_bytes
        self._names: tuple[str, ...] = ()  # the named tenants' own redaction names (`read_redact_names`)
        self.trail = AuditTrail(extra_names=cfg.audit.redact_keys, tenant_names=lambda _tenant: self._names,
                                log=cfg.audit.log)
        self._args = args
        self.command = command_name(args)
        self.action = "admin." + action
        self.resource_type = resource_type
        value = getattr(args, id_arg, None) if id_arg is not None else None
        self.resource_id = str(value) if value is not None else None
        self._creates = id_arg is None
        self.succeeded: bool | None = None  # set by `ended`
        # Tenants the operation names, whose `audit_redact_keys` apply to its entry.
        self.tenants: set[uuid.UUID] = set()
        for name in ("tenant", "tenant_id"):
            self._add_tenant(getattr(args, name, None))

    def _add_tenant(self, value: object) -> None:
        if isinstance(value, uuid.UUID):
            self.tenants.add(value)
        elif isinstance(value, str):
            try:
                self.tenants.add(uuid.UUID(value))
            except ValueError:
                pass  # "default", or not an id at all (the command says so)

    def ended(self, actor, result: object = None, error: BaseException | None = None) -> None:
        """The command ended: `result` is what it returned (the object it made or changed, if any), `error`
        what it raised; `actor` (the operator) is who the entry names."""
        self._elapsed_ms = (time.perf_counter() - self._started) * 1000.0
        self._actor = actor
        self.tenants.add(actor.tenant_id)
        if isinstance(result, dict):
            self._add_tenant(result.get("tenant_id"))
        if error is None:
            self._status, self._error = 200, None
            if self._creates and isinstance(result, dict) and result.get("id") is not None:
                self._status, self.resource_id = 201, str(result["id"])
        else:
            self._status, self._error = _failure(error)
        self.succeeded = error is None

    async def read_redact_names(self, engine: AsyncEngine) -> None:
        """The named tenants' (and the operator's) `audit_redact_keys`, read after the command (it may have
        changed them). If they cannot be read, the deployment's names and the built-in ones still apply."""
        from gateway.db.tables import tenants

        if not self.tenants:
            return
        try:
            async with engine.connect() as conn:
                found = await conn.execute(sa.select(tenants.c.settings).where(tenants.c.id.in_(self.tenants)))
                settings = [row[0] for row in found]
        except Exception as exc:  # noqa: BLE001 - the entry is still written, with the other names
            print(f"gateway: could not read the tenants' audit_redact_keys for the audit entry ({type(exc).__name__})",
                  file=sys.stderr)
            return
        names: list[str] = []
        for value in settings:
            listed = value.get("audit_redact_keys") if isinstance(value, dict) else None
            if isinstance(listed, list):
                names.extend(name for name in listed if isinstance(name, str) and name.strip())
        self._names = tuple(sorted(set(names)))

    def prepared(self) -> list[tuple]:
        """The entry as it is stored (and logged, once: by `prepare`)."""
        if self.succeeded is None:
            raise RuntimeError("the command has not ended")
        actor = self._actor
        # Sanitized here with the admin rules (write-only fields such as `key` too) and the names of the tenants
        # involved; `prepare` walks it again with the ordinary ones (nothing left to change), bounds and logs it.
        sanitizer = self.trail.sanitizer(actor.tenant_id, admin=True)
        details: dict[str, Any] = {"via": "cli", "command": self.command,
                                   "args": command_args(self._args, sanitizer.secret_name), "status": self._status}
        if self._error is not None:
            details["error"] = self._error
        secrets = [s for s in vars(self._args).get(_SECRETS, ()) if isinstance(s, str) and len(s) >= _MIN_SCRUBBED]
        failed = not self.succeeded
        # The secrets cut out before the sanitizer (which may cut a long text in the middle of one) and after.
        details = _scrub(sanitizer.clean(_scrub(details, secrets)), secrets)
        row = self.trail.admin_row(actor, self.action, self.resource_type, self.resource_id, details, failed,
                                   self._status if failed else None, self._elapsed_ms, None)
        return self.trail.prepare([row])

    async def store(self) -> bool:
        """Write the entry into its chain, or else into the audit spill. False (said on stderr): neither took it."""
        rows = self.prepared()
        try:
            await asyncio.wait_for(self._write(rows), WRITE_TIMEOUT_SECONDS)
            return True
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - whatever it was, the spill is next
            reason = str(exc) if isinstance(exc, SinkError) else _describe(exc)
        try:
            spill = Spill(self._spill_dir, self._url, segment_bytes=self._segment_bytes)
            try:
                spill.append(rows)  # fsynced when it returns; blocking is fine here, nothing else runs
            finally:
                spill.close()  # the segment stays, unlocked: a running gateway adopts it
        except OSError as exc:
            outcome = "succeeded" if self.succeeded else "failed"
            print(f"gateway: error: the audit entry of this command was NOT stored: the database did not take it "
                  f"({reason}) and the audit spill {self._spill_dir} could not be written ({exc}). The command "
                  f"itself {outcome}.", file=sys.stderr)
            return False
        print(f"gateway: the audit entry of this command could not be written to the database ({reason}); it is "
              f"in the audit spill {self._spill_dir}, which a gateway using that directory and this database "
              f"writes into the trail (at its next start, or within a minute while it runs)", file=sys.stderr)
        return True

    async def _write(self, rows: list[tuple]) -> None:
        sink = await sink_for(self._url, timeout=WRITE_TIMEOUT_SECONDS)
        try:
            # Chained in the sink's transaction, which waits for a running gateway's writer (PostgreSQL: the
            # chain's advisory lock; SQLite: BEGIN IMMEDIATE), so a refusal is about the entry itself.
            await sink.write(TABLE, chain.COLUMNS, rows)
        finally:
            await sink.close()


def command_args(args: argparse.Namespace, secret_name=lambda name: False) -> dict[str, Any]:
    """The command's arguments as an entry records them (sanitized later, like an admin API body).

    Values the command reads as JSON or as KEY=VALUE are recorded decoded, so
    that the sanitizer's name rules reach the names inside them. A stored
    setting's value is replaced whole when it is `--sensitive` or its key
    names a secret (`secret_name`). The config key is `config_key`: an admin
    body's `key` is a write-only secret field (an imported key).
    """
    values = {name: value for name, value in vars(args).items()
              if name not in _NOT_ARGS and not name.startswith("_") and value is not None}
    if args.command == "config" and "key" in values:
        values["config_key"] = values.pop("key")
        if "value" in values:
            if values.get("sensitive") or secret_name(values["config_key"]):
                values["value"] = REDACTED
            else:
                values["value"] = _json_or_text(values["value"])
    if isinstance(values.get("settings"), str):  # tenants update --settings '{...}'
        values["settings"] = _json_or_text(values["settings"])
    if isinstance(values.get("set"), list):  # servers update --set KEY=VALUE
        pairs: dict[str, Any] = {}
        for assignment in values["set"]:
            key, sep, text = str(assignment).partition("=")
            pairs[key] = _json_or_text(text) if sep else REDACTED  # not KEY=VALUE: refused, and not kept either
        values["set"] = pairs
    return values


def _json_or_text(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _scrub(value: Any, secrets: Iterable[str]) -> Any:
    """`value` with every occurrence of each secret, in any string or key at any depth, replaced by REDACTED."""
    secrets = tuple(secrets)
    if not secrets:
        return value

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            for secret in secrets:
                if secret in item:
                    item = item.replace(secret, REDACTED)
            return item
        if isinstance(item, dict):
            return {walk(k) if isinstance(k, str) else k: walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v) for v in item]
        return item

    return walk(value)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {WRITE_TIMEOUT_SECONDS:.0f}s"
    if isinstance(exc, asyncio.CancelledError):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


__all__ = ["CommandAudit", "command_args", "command_name", "note_secret"]
