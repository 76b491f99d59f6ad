"""The audit chain's per-entry work: the canonical head, the whole-float test, numbering and hashing
(the pure-Python twin of `auditentry_c.pyx`).

records/chain.py says what a chain is and what its canonical form means; this
module does the parts the writer repeats for every entry of every batch:

- `canonical_head`: the hashed columns but details as the canonical JSON array;
- `may_hold_whole_float`: whether details' JSON text needs the slow canonical form;
- `canonicals_into`: the canonical form of each row of a batch, with its details' text;
- `finish_row`: an entry's row as `prepare` leaves it (id, details, bounded texts, time in UTC);
- `prepare_rows`: a batch's rows through `prepare`, a plain call's at C level in the compiled twin;
- `mcp_row`: an MCP request's audit row, as the request path builds it;
- `McpDetails` and `DetailsText`: what an MCP entry's details are before and, for a plain call, after
  `prepare` (records/audit.py, records/chain.py say how they are used);
- `log_line`: the entry's line on the `gateway.audit` log, as JSON;
- `link`: each row numbered after its tenant's head and hashed,

    entry_hash = SHA-256( prev_hash "|" chain_seq "|" canonical )  (lowercase hex)

The compiled twin writes the head itself for the types a written entry holds
(exact UUIDs, str, int, float, UTC datetimes; anything else goes to this
twin's code), scans for whole floats in one pass, hashes with the system's
libcrypto called directly (hashlib's wrapper costs about four times the
hashing itself on an entry of a few hundred bytes) and builds the rows at C
level; tests/fast/test_auditentry.py holds the two to the same bytes, rows
and heads.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone

import orjson

GENESIS = "0" * 64
"""The prev_hash of a chain's first entry."""

HEAD_COLUMNS = ("id", "tenant_id", "user_id", "api_key_id", "role", "action", "resource_type", "resource_id",
                "client_ip", "outcome", "error_code", "duration_ms", "created_at")
"""What `canonical_head` takes, in this order (records/chain.py HASHED, but details)."""
UTC = timezone.utc
# Positions in the head's array, after the format version.
_IDS = (1, 2, 3, 4)
_DURATION, _CREATED = 12, 13


class McpDetails:
    """What an MCP entry's details are made of, kept raw until `prepare` (records/audit.py subclasses it
    with `build`): the request's body, the server's name, the answer's HTTP status and the error."""

    __slots__ = ("body", "server", "status", "error")

    def __init__(self, body: bytes, server: str | None, status: int, error: str | None) -> None:
        self.body, self.server, self.status, self.error = body, server, status, error


SUCCESS, ERROR = "success", "error"
"""An entry's outcome."""
TARGET_KINDS = {"tools/call": "tool", "prompts/get": "prompt", "resources/read": "resource",
                "resources/subscribe": "resource", "resources/unsubscribe": "resource"}
"""The resource_type of a method's target (its tool, prompt or URI)."""


def mcp_row(details_type: type, key, server_name: str | None, method: str | None, target: str | None, body: bytes,
            status: int, error_code: int | None, error: str | None, duration_ms: float, client_ip: str | None,
            now: datetime, is_batch: bool = False) -> tuple:
    """An MCP request's audit row (records/audit.py `AuditTrail.mcp_row` says what each value is), its
    details a `details_type` (an `McpDetails`) of the raw body, its id None (given in `prepare`)."""
    if is_batch:
        action, kind, resource = "mcp.batch", "server", server_name
    else:
        action = "mcp." + method if method else ("mcp.response" if body else "mcp.request")
        kind = TARGET_KINDS.get(method) if target is not None else None
        if kind is None:
            kind, resource = ("server", server_name) if server_name is not None else (None, None)
        else:
            resource = target
    failed = status >= 400 or error_code is not None
    return (
        None, key.tenant_id, key.user_id, key.id, action, kind, resource,
        details_type(body, server_name, status, error), client_ip, ERROR if failed else SUCCESS,
        error_code, duration_ms, now, key.role, None, None, None,
    )


class DetailsText:
    """An audit entry's details kept only as their sorted-key JSON text (`text`, bytes): a plain call's,
    which `plain_details` writes from the request body without decoding it. The text is what
    `chain.EncodedDetails.encode` gives for the same details, holds no whole float, and is already the
    canonical text (records/chain.py). Where a value is needed, `value()`."""

    __slots__ = ("text", "_canonical", "_canonical_of", "_canonical_head_at")

    def __init__(self, text: bytes) -> None:
        self.text = text
        # The canonical form of the row these details were logged in, written with its log line (`log_lines`),
        # the id of that row and of the head's positions: `canonicals_into` takes it for that very row.
        self._canonical: bytes | None = None
        self._canonical_of = 0
        self._canonical_head_at = 0

    def value(self) -> dict:
        return orjson.loads(self.text)

    def __eq__(self, other: object) -> bool:
        return type(other) is DetailsText and other.text == self.text

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DetailsText({self.text!r})"


def canonical_head(values, version: str) -> bytes:
    """`[version, *values]` as canonical JSON: ids as lowercase text (a str id read as a UUID), the time in
    UTC ("...Z", a naive one taken as UTC), the duration as a float; orjson's encoding, str() for what it
    has no type for (asyncpg's UUID). `values`: the `HEAD_COLUMNS`."""
    items = [version, *values]
    created = items[_CREATED]
    if isinstance(created, datetime) and created.tzinfo is not UTC:
        # SQLite gives back naive UTC; a row on its way in may carry any offset.
        items[_CREATED] = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    duration = items[_DURATION]
    if duration is not None and type(duration) is not float:
        items[_DURATION] = float(duration)  # REAL / float8 come back as floats
    for at in _IDS:
        if isinstance(items[at], str):
            items[at] = uuid.UUID(items[at])
    return orjson.dumps(items, default=str, option=orjson.OPT_UTC_Z)


def log_line(names: tuple, values: tuple, details_at: int, details_text: bytes | None) -> bytes:
    """An audit entry's log line: a JSON object of each name in `names` and the value at its position in
    `values`, None ones left out; the value at `details_at` written as `details_text`, its JSON text already
    (when given). Each value as orjson writes it (OPT_UTC_Z; str() of what it has no type for)."""
    parts = []
    for at, name in enumerate(names):
        value = values[at]
        if value is None:
            continue
        if at == details_at and details_text is not None:
            encoded = details_text
        else:
            encoded = orjson.dumps(value, default=str, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS)
        parts.append(orjson.dumps(name) + b":" + encoded)
    return b"{" + b",".join(parts) + b"}"


def log_lines(names: tuple, rows: list, details_at: int, text_types: tuple, fallback, head_at: tuple | None = None,
              version: str | None = None) -> list[bytes]:
    """Each row's `log_line`, in order, with the details' JSON text where the details are of `text_types` (their
    `text`); `fallback(row)`'s line for a row `log_line` refuses (TypeError, ValueError: a value orjson cannot
    write, as an int past 64 bits in details of another origin).

    Given `head_at` and `version` (the row positions of the canonical head's columns, all of them line columns,
    and the format's version), each `DetailsText` row's canonical form is written too and kept in its details,
    for `canonicals_into` to take for that very row: the compiled twin spells the head's values as the line
    spells them, writing each once."""
    if head_at is not None:
        if len(head_at) != len(HEAD_COLUMNS) or version is None:
            raise ValueError("head_at names the head's columns, with the version")
        if any(not 0 <= at < len(names) or at == details_at for at in head_at):
            raise ValueError("a head column that is no line's")
    lines = []
    for row in rows:
        details = row[details_at] if details_at < len(row) else None
        text = getattr(details, "text", None) if type(details) in text_types else None
        try:
            line = log_line(names, row, details_at, text)
        except (TypeError, ValueError):
            line = fallback(row)
        else:
            if head_at is not None and type(details) is DetailsText:
                details._canonical = _memo_canonical(row, head_at, version, details.text)
                details._canonical_of = id(row) if details._canonical is not None else 0
                details._canonical_head_at = id(head_at)
        lines.append(line)
    return lines


def _memo_canonical(row: tuple, head_at: tuple, version: str, text: bytes) -> bytes | None:
    """The canonical form `canonicals_into` writes for `row`, whose details' text is `text`; None where it
    would not take the text as it is."""
    if type(text) is not bytes or may_hold_whole_float(text):
        return None
    try:
        return canonical_head(tuple(row[at] for at in head_at), version) + b"\x1f" + text
    except (TypeError, ValueError):
        return None


def finish_row(row: tuple, new_id, details, details_at: int, bounded: tuple, cleaned: dict, clean,
               created_at: int) -> tuple:
    """An audit row as `prepare` leaves it (records/audit.py): `new_id` for its id (position 0) where that is
    None, `details` at `details_at`, each text at a position of `bounded` ((position, length) pairs) cleaned
    (`cleaned.get(text)`, the cache of `clean`, first; `clean(str(value))` for a value that is no str) and
    cut to its length, and the time at `created_at` in UTC where it is naive."""
    values = list(row)
    if values[0] is None:
        values[0] = new_id
    values[details_at] = details
    for at, length in bounded:
        text = values[at]
        if text is not None:
            found = cleaned.get(text) if type(text) is str else None
            if found is None:
                found = clean(text) if isinstance(text, str) else clean(str(text))
            values[at] = found[:length]
    created = values[created_at]
    if created.tzinfo is None:
        values[created_at] = created.replace(tzinfo=UTC)
    return tuple(values)


def bound_rows(rows: list, bounded: tuple, cleaned: dict, clean) -> list:
    """`rows` with each text at a position of `bounded` ((position, length) pairs; length None: no bound)
    cleaned (`cleaned.get(text)`, the cache of `clean`, first; `clean(str(value))` for a value that is no str)
    and cut to its length, as `finish_row` does an audit row's: what a record table's text columns take (no
    NUL, valid UTF-8, secrets replaced, within the column). A row none of whose texts changes is kept as it is
    (the same tuple); None stays None."""
    out = []
    for row in rows:
        values = None
        for at, length in bounded:
            value = row[at]
            if value is None:
                continue
            found = cleaned.get(value) if type(value) is str else None
            if found is None:
                found = clean(value) if isinstance(value, str) else clean(str(value))
            if length is not None and len(found) > length:
                found = found[:length]
            if found is not value and (type(value) is not str or found != value):
                if values is None:
                    values = list(row)
                values[at] = found
        out.append(row if values is None else tuple(values))
    return out


def prepare_rows(rows: list, out: list, mcp_type: type, plain_of, fallback, new_id, tenant_at: int,
                 details_at: int, bounded: tuple, cleaned: dict, clean, created_at: int) -> None:
    """Append each of `rows` to `out` as `prepare` leaves it (records/audit.py).

    The compiled twin does a plain call's row itself: details of exactly `mcp_type` whose body is one
    message the tenant's screen passes (`plain_of(tenant)`: its `Screen.plain`, or None) and
    `plain_details` writes; the details become a `DetailsText` and the row is `finish_row`'s (server and
    error cleaned as `McpDetails.build` cleans them, `new_id()` where the id is None). Every other row is
    `fallback(row)`'s, or `fallback(row, passed)`'s where it asked the screen already (`passed`: its answer;
    True: `plain_details` declined the body), so that the fallback does not ask again. This twin gives every
    row to `fallback(row)`, whose result is the same.
    """
    out.extend(map(fallback, rows))


def canonicals_into(rows: list, start: int, stop: int, head_at: tuple, details_at: int, version: str,
                    text_types: tuple, slow, canonicals: list, texts: list) -> None:
    """Append to `canonicals` and `texts` each of `rows[start:stop]`'s canonical form and its details' text
    (records/chain.py `row_canonical_and_json`), where the details carry their text already (one of
    `text_types`, its `text`) or are None and hold no whole float: the head (`canonical_head` of the row's values at
    `head_at`), a 0x1f byte, then the text, or "-" for no details. `slow(row)` gives both for any other row."""
    for i in range(start, stop):
        row = rows[i]
        details = row[details_at]
        if details is None:
            text = None
        elif type(details) in text_types:
            if (type(details) is DetailsText and details._canonical_of == id(row)
                    and details._canonical_head_at == id(head_at)
                    and details._canonical.startswith(b"[" + orjson.dumps(version) + b",")):
                # Written with the row's log line, for this very row and head (`log_lines`).
                details.text.decode()  # UTF-8, or a UnicodeDecodeError as the database would refuse it
                canonicals.append(details._canonical)
                texts.append(details.text)
                continue
            text = getattr(details, "text", None)
            if text is None or may_hold_whole_float(text):
                text = False
        else:
            text = False
        if text is False:
            canonical, decoded = slow(row)
        else:
            canonical = canonical_head(tuple(row[at] for at in head_at), version) + (
                b"\x1f-" if text is None else b"\x1f" + text)
            decoded = text
            if text is not None:
                text.decode()  # UTF-8, or a UnicodeDecodeError as the database would refuse it
        canonicals.append(canonical)
        texts.append(decoded)


def fallbacks() -> int:
    """How many heads and lines the compiled twin left to this one (this one writes them all itself: 0)."""
    return 0


def plain_details(body: bytes, status: int, server: str | None, error: str | None) -> bytes | None:
    """The details `McpDetails.build` makes of one JSON-RPC message (`records/audit.py`), as the sorted-key
    JSON text `prepare` encodes, written from the body's text without decoding it; None where the caller
    must decode the body and build them. Only for a body the sanitizer's screen passed (nothing is redacted)
    and `server` and `error` already cleaned (`error`: None or "" for none).

    The compiled twin writes the common case: an object whose strings hold no control character and no escape
    but \\b \\f \\n \\r \\t \\" \\\\ (those, and characters past ASCII once checked as UTF-8, are copied as they
    are: orjson writes them so; a key holds no escape), whose numbers are integers of 18 digits or fewer or
    floats orjson writes as they are written (at most 15 significant digits, no trailing zero, no exponent,
    0.0001 or more), without duplicate keys, objects of at most 100 members or nesting past 32 levels. This one
    always answers None: decoding and building them in Python is what the caller does then anyway.
    """
    return None


def may_hold_whole_float(text: bytes) -> bool:
    """Whether orjson's `text` may hold a float with a whole value (the only numbers jsonb gives back in
    another form): orjson writes those as "<digits>.0" below 1e16 and with an "e+" exponent above.
    `find`, not `in`: `bytes in bytes` first tries its operand as an integer and formats the TypeError it
    then discards."""
    at = text.find(b".0")
    while at != -1:
        if text[at + 2 : at + 3] in _AFTER_WHOLE:
            return True
        at = text.find(b".0", at + 2)
    return text.find(b"e+") != -1


_AFTER_WHOLE = (b",", b"}", b"]", b"")  # what follows the ".0" of a whole float in orjson's text


def tenants_in(rows: list, tenant_at: int) -> set:
    """The distinct tenants of `rows` (tuples; the value at `tenant_at`), as a set."""
    return {row[tenant_at] for row in rows}


def entry_hash(prev_hash: str, chain_seq: int, canonical: bytes) -> str:
    digest = hashlib.sha256(b"%s|%d|" % (prev_hash.encode(), chain_seq))
    digest.update(canonical)
    return digest.hexdigest()


def link(rows: list[tuple], heads: dict, canonicals: list[bytes], texts: list | None, tenant_at: int,
         details_at: int, seq_at: int) -> list[tuple]:
    """`rows` numbered and hashed after their chains' heads: each row's `chain_seq`, `prev_hash` and
    `entry_hash` at `seq_at`, `seq_at + 1`, `seq_at + 2`, and (given `texts`) its details replaced by its text.

    `heads` maps a tenant (the value at `tenant_at`; None is a chain too) to its
    last (chain_seq, entry_hash); a tenant not in it starts a chain. It is
    updated in place. `canonicals[i]` is row i's canonical form.
    """
    states: dict = {}  # tenant -> [seq, hash], by value: equal UUID objects are one chain
    # The same state by the tenant object's identity: rows of one key share one object, and a UUID's hash and
    # equality run Python code. The rows hold their tenants alive for the call, so no identity is reused.
    known: dict[int, list] = {}
    linked = []
    for i, row in enumerate(rows):
        tenant = row[tenant_at]
        state = known.get(id(tenant))
        if state is None:
            state = states.get(tenant)
            if state is None:
                seq, digest = heads.get(tenant, (0, GENESIS))
                state = states[tenant] = [seq, digest]
            known[id(tenant)] = state
        prev = state[1]
        seq = state[0] + 1
        digest = entry_hash(prev, seq, canonicals[i])
        state[0], state[1] = seq, digest
        values = list(row)
        values[seq_at], values[seq_at + 1], values[seq_at + 2] = seq, prev, digest
        if texts is not None:
            values[details_at] = texts[i]
        linked.append(tuple(values))
    for tenant, (seq, digest) in states.items():
        heads[tenant] = (seq, digest)
    return linked


__all__ = (
    "GENESIS", "HEAD_COLUMNS", "bound_rows", "canonical_head", "canonicals_into", "entry_hash", "fallbacks",
    "finish_row", "link", "log_line", "log_lines", "may_hold_whole_float", "plain_details", "tenants_in",
)
