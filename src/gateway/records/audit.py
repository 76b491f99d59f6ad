"""Audit entries: who did what, when, how long it took and how it ended, for every authenticated operation.

The data plane (dataplane/server.py `_record`, which bridge.py also goes
through) and the control plane (controlplane/api.py `_admin`) build one
`audit_logs` row per authenticated operation with `mcp_row` / `admin_row`
and submit it to the batched writer. Building a row is cheap on purpose: the
request's parameters are kept as the raw bytes the request already holds and
are decoded and sanitized (records/sanitize.py) only in `prepare`, which the
writer's flusher calls before a batch is written or spilled, off the request
path. `prepare` also emits each entry as one JSON line on the `gateway.audit`
logger ("dual logging": the application log holds a second copy of the
trail), bounds every text to its column and drops nothing.

Chain numbers and hashes (records/chain.py) are not set here: they are given
when the row is written, in the database transaction. This module never
writes to the database or to files itself.
"""

from __future__ import annotations

import codecs
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import orjson
import sqlalchemy as sa

from gateway._fast import auditentry
from gateway.db.tables import audit_logs
from gateway.records import chain
from gateway.records.chain import TEXT_TYPES, DetailsText, EncodedDetails
from gateway.records.sanitize import CLEANED_TEXTS, Sanitizer, clean_text

TABLE = "audit_logs"
COLUMNS: tuple[str, ...] = tuple(c.name for c in audit_logs.columns)
_EXPECTED = (
    "id", "tenant_id", "user_id", "api_key_id", "action", "resource_type", "resource_id", "details",
    "client_ip", "outcome", "error_code", "duration_ms", "created_at", "role", "chain_seq", "prev_hash",
    "entry_hash",
)
# The row builders below write tuples in this order by hand (a tuple is what the
# request path can afford); a schema change must change them too.
assert COLUMNS == _EXPECTED, "audit_logs columns changed: update records/audit.py's row builders"
_TENANT, _DETAILS, _CREATED = COLUMNS.index("tenant_id"), COLUMNS.index("details"), COLUMNS.index("created_at")
# (position, length) of each bounded text column: a longer value is cut, never refused by the database.
_BOUNDED = tuple(
    (COLUMNS.index(c.name), c.type.length)
    for c in audit_logs.columns
    if isinstance(c.type, sa.String) and c.type.length and c.name not in ("prev_hash", "entry_hash")
)

SUCCESS, ERROR = auditentry.SUCCESS, auditentry.ERROR
# Write-only fields of admin request bodies that hold secrets under names no
# pattern would catch: an imported legacy key, an upstream header's value.
ADMIN_SECRET_FIELDS = ("key", "header_value")
audit_log = logging.getLogger("gateway.audit")
UTC = timezone.utc


class McpDetails(auditentry.McpDetails):
    """What an MCP entry's details are made of, kept raw until `prepare` (the body is not decoded twice
    on the request path: the pipeline read only the envelope). The fields are `_fast/auditentry`'s, which
    reads them at C level for a plain call (`prepare_rows`); `build` is every other entry's way."""

    __slots__ = ()

    def build(self, sanitizer: Sanitizer, plain: bool | None = None) -> EncodedDetails | DetailsText:
        """The details, sanitized. `plain`: what the screen said of the body as one message where the caller
        asked already (`prepare_rows`; True means `plain_details` declined the body), so it is not asked again."""
        server = self.server
        if server is not None:
            cleaned = CLEANED_TEXTS.get(server)  # clean_text's cache first: the call costs more than the lookup
            server = cleaned if cleaned is not None else clean_text(server)
        error = clean_text(self.error) if self.error else None  # refusals may quote what the caller sent
        body = self.body
        if plain is None and body and body[0] != 91:  # not asked yet, and not a batch's "["
            plain = sanitizer.unchanged(body, 0)  # whether the screen passes the body as one message (asked once)
            if plain:
                # Nothing to clean: most calls' details are written from the body's text as they are stored,
                # without decoding it (_fast/auditentry.plain_details; None leaves it to the code below).
                text = _plain_details(body, self.status, server, error)
                if text is not None:
                    return DetailsText(text)
        details = EncodedDetails()
        details["status"] = self.status
        if server is not None:
            details["server"] = server
        if error is not None:
            details["error"] = error
        if body:
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError:
                details["params"] = "[not JSON]"
                return details
            if isinstance(message, list):  # a batch: each message's method and params
                found: dict[str, Any] = {"batch": [_message_details(item) for item in message]}
                nesting = 1  # the batch's list is one level deeper in the details than in the body
            elif isinstance(message, dict):
                if plain if plain is not None else sanitizer.unchanged(body, 0):
                    _message_details(message, details)  # nothing to clean: straight into the entry's details
                    return details
                found, nesting = _message_details(message), 0
            else:
                found, nesting = {"message": "[not an object]"}, 0
            # Walking the decoded params is most of an entry's cost; a screen of the raw body rules it out
            # for the calls it cannot change (most: no secret, nothing too long or too deep).
            unchanged = plain if nesting == 0 and plain is not None else sanitizer.unchanged(body, nesting)
            details.update(found if unchanged else sanitizer.clean(found))
        return details


def _message_details(message: Any, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an entry keeps of one JSON-RPC message, in `details` (a new dict if None)."""
    if details is None:
        details = {}
    if not isinstance(message, dict):
        details["message"] = "[not an object]"
        return details
    if "method" in message:
        details["method"] = message["method"]
    if "id" in message:
        details["request_id"] = message["id"]
    params = message.get("params")
    if isinstance(params, dict) and "_meta" in params:
        # Protocol metadata (version, client info, progress tokens), not what was asked: left out.
        params = {key: value for key, value in params.items() if key != "_meta"}
    if params is not None:
        details["params"] = params
    if "error" in message:  # a client's answer to a server request
        details["response_error"] = message["error"]
    return details


class AdminDetails:
    """An admin request's details: method, path, query and body, sanitized in `prepare`."""

    __slots__ = ("method", "path", "query", "body", "status", "error")

    def __init__(self, method: str, path: str, query: dict[str, str], body: bytes, status: int,
                 error: dict[str, Any] | None) -> None:
        self.method, self.path, self.query, self.body = method, path, query, body
        self.status, self.error = status, error

    def build(self, sanitizer: Sanitizer) -> EncodedDetails:
        details: dict[str, Any] = {"method": self.method, "path": self.path, "status": self.status}
        if self.query:
            details["query"] = self.query
        if self.body and self.body.strip():
            try:
                details["body"] = orjson.loads(self.body)
            except orjson.JSONDecodeError:
                details["body"] = "[not JSON]"
        if self.error:
            details["error"] = self.error
        return EncodedDetails(sanitizer.clean(details))


_PENDING = (McpDetails, AdminDetails)


class AuditTrail:
    """Builds audit rows on the request path and prepares them (sanitize, bound, log) in the flusher.

    `extra_names`: parameter names redacted for every tenant, besides
    `sanitize.SECRET_NAMES` (the `[audit] redact_keys` setting).
    `tenant_names(tenant_id)`: a tenant's own additions (its settings'
    `audit_redact_keys`, from the snapshot), looked up when an entry is
    prepared. `log`: emit each entry on the `gateway.audit` logger.
    """

    def __init__(
        self,
        *,
        new_id: Callable[[], uuid.UUID] = uuid.uuid4,
        extra_names: Iterable[str] = (),
        tenant_names: Callable[[uuid.UUID | None], Iterable[str]] | None = None,
        log: bool = True,
    ) -> None:
        self.new_id = new_id
        self._extra = tuple(extra_names)
        self._tenant_names = tenant_names
        self.log = log
        self._sanitizers: dict[tuple[tuple[str, ...], bool], Sanitizer] = {}
        self.prepared = 0  # entries prepared (for /metrics)

    # ------------------------------------------------------------ request path

    def mcp_row(
        self,
        key,
        server_name: str | None,
        method: str | None,
        target: str | None,
        body: bytes,
        status: int,
        error_code: int | None,
        error: str | None,
        duration_ms: float,
        client_ip: str | None,
        now: datetime,
        is_batch: bool = False,
    ) -> tuple:
        """An MCP request's row: `key` is the caller (KeyEntry or TokenPrincipal); `method` the JSON-RPC
        method (or the HTTP method of a request without a body); `target` the tool, prompt or URI. Built by
        `_fast/auditentry.mcp_row` (in C where compiled); the data plane calls that directly
        (`DataPlane._record`)."""
        return _mcp_row(McpDetails, key, server_name, method, target, body, status, error_code, error, duration_ms,
                        client_ip, now, is_batch)

    def admin_row(
        self,
        actor,
        action: str,
        resource_type: str | None,
        resource_id: str | None,
        details: AdminDetails,
        failed: bool,
        error_code: int | None,
        duration_ms: float,
        client_ip: str | None,
    ) -> tuple:
        """An admin API call's row: `actor` is the authenticated `service.Actor`."""
        return (
            self.new_id(), actor.tenant_id, actor.user_id, actor.api_key_id, action, resource_type, resource_id,
            details, client_ip, ERROR if failed else SUCCESS, error_code, duration_ms, datetime.now(UTC),
            actor.role, None, None, None,
        )

    # ------------------------------------------------------------ flusher side

    def sanitizer(self, tenant_id: uuid.UUID | None, admin: bool = False) -> Sanitizer:
        names = self._extra
        if self._tenant_names is not None:
            own = tuple(self._tenant_names(tenant_id) or ())
            if own:
                names = names + own
        cache_key = (names, admin)
        sanitizer = self._sanitizers.get(cache_key)
        if sanitizer is None:
            if len(self._sanitizers) > 1024:  # tenants' name lists change rarely; never let this grow unbounded
                self._sanitizers.clear()
            sanitizer = self._sanitizers[cache_key] = Sanitizer(names, ADMIN_SECRET_FIELDS if admin else ())
        return sanitizer

    def prepare(self, rows: list[tuple]) -> list[tuple]:
        """Rows as they are stored: details decoded and sanitized, texts bounded; each logged once.

        Idempotent on its own output (a prepared row prepared again comes out
        the same), so it is safe on rows of any origin.
        """
        prepared: list[tuple] = []
        self.prepared += len(rows)
        emit = self.log and audit_log.isEnabledFor(logging.INFO)
        sanitizers: dict[tuple, Sanitizer] = {}  # per (tenant, admin?) for this batch: one lookup each

        def sanitizer_for(tenant, admin: bool) -> Sanitizer:
            # By the tenant object's identity (hashing a UUID runs Python code; every row holds its
            # tenant alive until the batch is done, so no identity is reused meanwhile).
            which = (id(tenant), admin)
            sanitizer = sanitizers.get(which)
            if sanitizer is None:
                sanitizer = sanitizers[which] = self.sanitizer(tenant, admin)
            return sanitizer

        def plain_of(tenant) -> Callable[[bytes, int], bool] | None:
            screen = sanitizer_for(tenant, False).screen
            return screen.plain if screen is not None else None

        def one(row: tuple, plain: bool | None = None) -> tuple:
            details = row[_DETAILS]
            admin = isinstance(details, AdminDetails)
            sanitizer = sanitizer_for(row[_TENANT], admin)
            if isinstance(details, McpDetails):
                details = details.build(sanitizer, plain)  # `plain`: the screen's answer, if prepare_rows asked
            elif admin:
                details = details.build(sanitizer)
            elif type(details) is DetailsText:
                pass  # prepared already (a plain call's, nothing to clean)
            elif details is not None:
                details = sanitizer.clean(details)
                if type(details) is dict:
                    details = EncodedDetails(details)
            if type(details) is EncodedDetails:
                try:
                    details.encode()  # once, for the log line and the writer (chain.row_canonical_and_json)
                except TypeError:  # orjson's errors too: the writer meets it again and says so
                    pass
            # The rest at C level: the id (drawn here, not on the request path: a UUID object costs ~1 us),
            # every bounded text cleaned (clean_text's cache looked up first: these are the same few words on
            # every entry) and cut to its column, the time in UTC.
            return _finish_row(row, self.new_id() if row[0] is None else None, details, _DETAILS, _BOUNDED,
                               CLEANED_TEXTS, clean_text, _CREATED)

        # A plain call's row (most: one message, nothing to redact) is made at C level, as `one` would make it;
        # `one` makes every other.
        _prepare_rows(rows if type(rows) is list else list(rows), prepared, McpDetails, plain_of, one,
                      self.new_id, _TENANT, _DETAILS, _BOUNDED, CLEANED_TEXTS, clean_text, _CREATED)
        if emit:
            self._log(prepared)
            for handler in audit_log.handlers:  # a batching handler writes the batch's lines now
                handler.flush()
        return prepared

    def _log(self, rows: list[tuple]) -> None:
        """Each row as one JSON line on `gateway.audit`: straight to the handlers when they are all
        `AuditLogHandler`s and nothing filters (what `gateway serve` sets up), else one log record each."""
        handlers = audit_log.handlers
        if handlers and not audit_log.filters and not audit_log.propagate and all(
            type(h) is AuditLogHandler and not h.filters and h.level <= logging.INFO for h in handlers
        ):
            entries = chain.log_lines(_LOGGED, rows, _entry_line)
            for handler in handlers:
                handler.write_entries(entries)
            return
        for row in rows:
            # makeRecord + handle is Logger.info without finding the caller's frame (a stack walk per entry);
            # filters and handlers apply as usual.
            audit_log.handle(audit_log.makeRecord(audit_log.name, logging.INFO, "", 0, _entry_json(row).decode(),
                                                  None, None, extra={"audit": _entry(row)}))


def _entry(row: tuple) -> dict[str, Any]:
    """A row's entry as a dict (what a log record carries): its columns but the chain's, None ones left out."""
    entry = {name: value for name, value in zip(_LOGGED, row) if value is not None}
    details = entry.get("details")
    if type(details) is DetailsText:
        entry["details"] = details.value()
    return entry


def _entry_json(row: tuple) -> bytes:
    """`_entry(row)` as JSON, without the dict: `_fast/auditentry`'s `log_line`, with the details as the JSON
    text `prepare` encoded for the writer too (1.0 -> 0.6 us a line, timeit). orjson's way for what it
    refuses. (`chain.log_lines` does the same for a batch, without a Python call per row.)"""
    details = row[_DETAILS]
    text = getattr(details, "text", None) if type(details) in TEXT_TYPES else None
    try:
        return _log_line(_LOGGED, row, _DETAILS, text)
    except (TypeError, ValueError):  # e.g. an int past 64 bits in details of another origin
        return _entry_line(row)


def _entry_line(row: tuple) -> bytes:
    """`_entry(row)` as JSON by orjson: the line of an entry `log_line` cannot write."""
    return _dumps(_entry(row)).encode()


def _dumps(value: Any) -> str:
    # default=str: asyncpg's UUID subclass (ids read from the database) is not one orjson knows.
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_UTC_Z).decode()
    except TypeError:  # a key that is not a str (details of another origin): OPT_NON_STR_KEYS, slower, writes it
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z).decode()


# A line holds every column but the chain's (given when the entry is written). Plain str names: the
# columns' are SQLAlchemy's quoted_name, a str subclass.
_LOGGED = tuple(str(name) for name in COLUMNS[:14])
_log_line = auditentry.log_line
_plain_details = auditentry.plain_details
_finish_row = auditentry.finish_row
_prepare_rows = auditentry.prepare_rows
_mcp_row = auditentry.mcp_row


class AuditLogHandler(logging.StreamHandler):
    """The `gateway.audit` logger's handler in `gateway serve`: lines written together when flushed.

    `AuditTrail.prepare` hands it a batch's entries at once (`write_entries`),
    each already encoded once as JSON, which it wraps in the line's format: no
    log record, no formatter, no second encoding of the entry, and no text
    layer (a batch's lines stay bytes, written to the stream's binary buffer
    when its encoding is UTF-8). Records logged the ordinary way
    go through the formatter as usual. `json_lines`: lines are the JSON log
    format's objects (`{"ts", "level", "logger", "message": "audit entry",
    "audit"}`), else the text format's "<time> INFO gateway.audit: <entry as
    JSON>". Writing many lines in one call instead of one each on a
    line-buffered stderr was measured at about 23 -> 9 us a line, the direct
    path at a few more microseconds less.
    """

    def __init__(self, stream, *, json_lines: bool = False, capacity: int = 4096) -> None:
        super().__init__(stream)
        self.json_lines = json_lines
        self._chunks: list[bytes] = []  # UTF-8, whole lines together
        self._count = 0  # lines in them
        self._capacity = capacity

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)
            return
        self._queue((line.encode("utf-8", "backslashreplace"), b"\n"), 1)

    def write_entries(self, entries: list[bytes]) -> None:
        """Queue a line for each entry (`entries`: each one's JSON object, as `_entry_json` writes it)."""
        if not entries:
            return
        now = time.time()
        if self.json_lines:  # the JSON formatter's object (cli.py), "ts" in local time, whole seconds
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
            head = orjson.dumps({"ts": stamp, "level": "INFO", "logger": audit_log.name,
                                 "message": "audit entry"})[:-1] + b',"audit":'
            pieces = (head, (b"}\n" + head).join(entries), b"}\n")
        else:  # the text formatter's "%(asctime)s INFO gateway.audit: %(message)s"
            prefix = (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))},{int(now % 1 * 1000):03d} "
                      f"INFO {audit_log.name}: ").encode()
            pieces = (prefix, (b"\n" + prefix).join(entries), b"\n")
        self._queue(pieces, len(entries))  # three pieces, not their sum: a batch's lines are copied once less

    def _queue(self, pieces: tuple[bytes, ...], count: int) -> None:
        self.acquire()
        try:
            self._chunks.extend(pieces)
            self._count += count
        finally:
            self.release()
        if self._count >= self._capacity:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self._chunks:
                chunks, self._chunks, self._count = self._chunks, [], 0
                self._write(chunks)
            super().flush()
        finally:
            self.release()

    def _write(self, chunks: list[bytes]) -> None:
        stream = self.stream
        buffer = getattr(stream, "buffer", None)
        if buffer is not None and _is_utf8(getattr(stream, "encoding", None)):
            stream.flush()  # anything written to it as text first
            buffer.writelines(chunks)
        else:  # a text stream only (StringIO), or another encoding: its own encoder decides
            stream.write(b"".join(chunks).decode("utf-8", "replace"))


def _is_utf8(encoding: str | None) -> bool:
    try:
        return encoding is not None and codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def is_prepared(row: tuple) -> bool:
    return not isinstance(row[_DETAILS], _PENDING)


__all__ = [
    "ADMIN_SECRET_FIELDS",
    "COLUMNS",
    "ERROR",
    "SUCCESS",
    "TABLE",
    "AdminDetails",
    "AuditLogHandler",
    "AuditTrail",
    "McpDetails",
    "audit_log",
    "is_prepared",
]
