"""The audit trail's hash chains: numbering entries, hashing them, and checking a stored chain.

Each tenant's audit entries form one chain (entries without a tenant form one
more, keyed by NULL): `chain_seq` counts 1, 2, 3, ... in the order the
entries were written, `prev_hash` is the previous entry's `entry_hash` (64
zeros for the first), and

    entry_hash = SHA-256( prev_hash "|" chain_seq "|" canonical(entry) )

where `canonical` is a fixed serialization of every other column (ids,
who, what, when, how long, outcome, details). Changing any stored value of an
entry, removing one from the middle, or reordering them breaks the chain at
that entry; `verify` walks every chain and names the first broken link. A
chain whose oldest entries were deleted must start right after the anchor
that retention (records/retention.py) leaves for it. What a chain cannot show
by itself: entries cut from its newest end; `verify` prints each chain's head
so that it can be kept elsewhere and compared later.

Numbers are assigned when an entry is written (records/sinks.py), in the
database transaction that inserts it, under a per-tenant lock, so several
gateway processes extend one chain without forking it. This module holds the
pure parts (canonical form, hashing, numbering a batch) and `verify`, which
reads the database; nothing here writes.

The canonical form is computed from what the database gives back, so that a
verifier recomputes exactly what the writer hashed: `details` as sorted-key
JSON with whole-number floats read as ints (jsonb keeps numbers as `numeric`
and prints 1e16 as 10000000000000000, -0.0 as 0.0); timestamps as UTC
microseconds; UUIDs as lowercase text.
"""

from __future__ import annotations

import hashlib
import operator
import re
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import timezone
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway._fast import auditentry
from gateway.db.tables import audit_logs, metadata, system_config

GENESIS = auditentry.implementation.GENESIS
"""The prev_hash of a chain's first entry ("0" * 64)."""

COLUMNS: tuple[str, ...] = tuple(c.name for c in metadata.tables["audit_logs"].columns)
CHAIN_FIELDS = ("chain_seq", "prev_hash", "entry_hash")
# What the hash covers, in this order: every column but the chain's own.
HASHED: tuple[str, ...] = (
    "id", "tenant_id", "user_id", "api_key_id", "role", "action", "resource_type", "resource_id",
    "client_ip", "outcome", "error_code", "duration_ms", "created_at", "details",
)
assert set(HASHED) | set(CHAIN_FIELDS) == set(COLUMNS), "a new audit_logs column must be hashed or be a chain field"
_AT = {name: COLUMNS.index(name) for name in COLUMNS}
_SEQ, _PREV, _HASH, _TENANT, _ID = _AT["chain_seq"], _AT["prev_hash"], _AT["entry_hash"], _AT["tenant_id"], _AT["id"]
_FORMAT_VERSION = "1"
UTC = timezone.utc


# ------------------------------------------------------------------ canonical form


# A number token that may be a float, outside strings or (harmlessly) inside one.
_FLOAT_TOKEN = re.compile(rb"[:,\[]-?\d+(?:\.\d+|[eE])")
_SORTED = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _integral_floats_as_ints(value: Any) -> Any:
    """`value` with every float that holds a whole number below 2**63 as an int (-0.0 as 0).

    jsonb keeps numbers as decimals and prints them in plain notation, so a
    float's type does not survive storage when it is a whole number (1e16 comes
    back as 10000000000000000, -0.0 as 0.0): both sides of the hash read such
    numbers as ints.
    """
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    if type(value) is float and value.is_integer() and -(2**63) <= value < 2**63:
        return int(value)
    return value


def details_canonical(details: Any, encode_json) -> str:
    """The canonical text of a details value about to be written (`encode_json`: the sink's encoder).

    Equal to `canonical_details(<the text the database gives back>)`; without a
    float in the value (most entries) it is two C-level encodings.
    """
    if details is None:
        return "-"  # SQL NULL, distinct from the JSON null "null"
    if type(details) is DetailsText:
        return details.text.decode()  # canonical already: sorted keys, no whole float
    text = encode_json(details).encode()
    if _FLOAT_TOKEN.search(text) is not None:
        details = _integral_floats_as_ints(orjson.loads(text))  # as stored: NaN and infinities are null
    return orjson.dumps(details, option=_SORTED).decode()


def canonical_details(details_json: str | None) -> str:
    """The canonical text of a `details` value given as the JSON text the database holds (None: SQL NULL).

    Keys sorted, no spaces, numbers as orjson writes them once whole-number
    floats are read as ints.
    """
    if details_json is None:
        return "-"
    return orjson.dumps(_integral_floats_as_ints(orjson.loads(details_json)), option=_SORTED).decode()


def canonical(entry: dict[str, Any], details_json: str | None, *, details_text: str | None = None) -> bytes:
    """What an entry's hash covers, from its column values and the JSON text of its details
    (or, given `details_text`, their canonical text already).

    Every column but details as one JSON array (ids as lowercase text, the
    time in UTC, duration as a float), then the details' canonical text.
    """
    head = _head([entry[name] for name in HASHED[:-1]])
    tail = details_text if details_text is not None else canonical_details(details_json)
    return head + b"\x1f" + tail.encode()


def _head(values: list) -> bytes:
    """Every hashed column but details (in `HASHED` order) as the canonical JSON array: ids as lowercase
    text, the time in UTC, duration as a float (`_fast/auditentry`'s `canonical_head`)."""
    return auditentry.canonical_head(tuple(values), _FORMAT_VERSION)


assert auditentry.implementation.HEAD_COLUMNS == HASHED[:-1], "canonical_head takes the hashed columns but details"


entry_hash = auditentry.entry_hash
"""`entry_hash(prev_hash, chain_seq, canonical_bytes)`: SHA-256 hex of "<prev_hash>|<chain_seq>|<canonical>"."""


# ------------------------------------------------------------------ numbering a batch


def tenants_of(rows: Iterable[tuple]) -> list[uuid.UUID | None]:
    """The chains a batch extends, each once, in the order locks must be taken (NULL first, then by id)."""
    seen = auditentry.tenants_in(rows if type(rows) is list else list(rows), _TENANT)
    return sorted(seen, key=lambda t: (t is not None, str(t) if t is not None else ""))


def lock_key(tenant_id: uuid.UUID | None) -> int:
    """A signed 32-bit key for a tenant's chain lock (two tenants sharing one only wait for each other)."""
    raw = tenant_id.bytes if tenant_id is not None else b"platform"
    return int.from_bytes(hashlib.sha256(raw).digest()[:4], "big", signed=True)


LOCK_CLASS = 0x61756474  # "audt": the first key of pg_advisory_xact_lock(int, int), the audit chains' own space


def row_canonical(row: tuple, encode_details) -> bytes:
    """The canonical form of an audit_logs tuple about to be written: independent of its place in a chain,
    so it can be computed before the transaction that numbers it (`encode_details`: the sink's encoder)."""
    entry = dict(zip(COLUMNS, row))
    return canonical(entry, None, details_text=details_canonical(entry["details"], encode_details))


_ROW_HEAD = tuple(COLUMNS.index(name) for name in HASHED[:-1])
_pick_head = operator.itemgetter(*_ROW_HEAD)  # a row's hashed columns but details, as a tuple (in C)
_ROW_DETAILS = COLUMNS.index("details")


def log_lines(names: tuple, rows: list, fallback) -> list[bytes]:
    """Each prepared row's log line (`_fast/auditentry.log_lines`, `names`: the row's first columns), each plain
    row's canonical form written with it and kept in its details, for `row_canonicals` to take as it is (the
    head's values spelled once for both)."""
    return auditentry.log_lines(names, rows, _ROW_DETAILS, TEXT_TYPES, fallback, _ROW_HEAD, _FORMAT_VERSION)


class EncodedDetails(dict):
    """An audit entry's details (a dict like any other) that also carry `text`, their sorted-key JSON as
    `row_canonical_and_json` writes it: encoded once, when the entry is prepared (records/audit.py
    `prepare`), for its log line and the writer both. Unset until `encode`, which comes after the last
    change to the dict."""

    __slots__ = ("text",)

    def encode(self) -> bytes:
        """Set `text` and return it (a value JSON has no type for is a TypeError, and leaves it unset)."""
        try:
            text = orjson.dumps(self, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # a key that is not a str: orjson's slower option that writes it
            text = orjson.dumps(self, option=_SORTED)
        self.text = text
        return text


DetailsText = auditentry.DetailsText
"""An audit entry's details kept only as their sorted-key JSON text (`text`, bytes): a plain call's, which
`_fast/auditentry.plain_details` writes from the request body without decoding it (`prepare_rows`, called by
records/audit.py `prepare`). The text is what `EncodedDetails.encode` gives for the same details, holds no
whole float, and is already the canonical text (`row_canonical_and_json`). Where a value is needed, `value()`; the
spill writes the text itself (an orjson Fragment), sinks.encode_json gives it as it is."""


# The details types whose `text` is their sorted-key JSON (`canonicals_into` takes their rows' text as it is).
TEXT_TYPES = (EncodedDetails, DetailsText)


def row_canonical_and_json(row: tuple) -> tuple[bytes, bytes | None]:
    """`row_canonical(row, sinks.encode_json)` and the details' JSON text to store (UTF-8 bytes, which the COPY
    sends as they are), with one encoding of the details where `row_canonical` makes three (the writer's
    per-entry cost; tests check the two agree).

    The text is the sorted-key JSON of the details: what the database stores
    is the same value (jsonb keeps no key order), and without a float in it,
    it is already the canonical text.
    """
    head = _canonical_head(_pick_head(row), _FORMAT_VERSION)
    details = row[_ROW_DETAILS]
    if details is None:
        return head + b"\x1f-", None
    text = getattr(details, "text", None) if type(details) in TEXT_TYPES else None
    if text is None:
        text = orjson.dumps(details, option=_SORTED)
    else:
        text.decode()  # UTF-8 (the COPY sends it as it is), or a UnicodeDecodeError as the database would refuse it
    if not _may_hold_whole_float(text):
        return head + b"\x1f" + text, text
    tail = orjson.dumps(_integral_floats_as_ints(orjson.loads(text)), option=_SORTED)
    return head + b"\x1f" + tail, text


_canonical_head = auditentry.canonical_head
# Whether orjson's text of the details may hold a float with a whole value (the only numbers jsonb gives
# back in another form): "<digits>.0" below 1e16, an "e+" exponent above.
_may_hold_whole_float = auditentry.may_hold_whole_float


async def row_canonicals(rows: list[tuple], chunk: int = 128) -> tuple[list[bytes], list[bytes | None]]:
    """`row_canonical_and_json` of every row, as two lists, letting the event loop run between chunks
    (a batch is thousands). Rows whose details `prepare` encoded and that hold no whole float (most) are
    done by `_fast/auditentry.canonicals_into` alone; it hands any other to `row_canonical_and_json`."""
    import asyncio

    canonicals: list[bytes] = []
    texts: list[bytes | None] = []
    rows = rows if type(rows) is list else list(rows)
    for start in range(0, len(rows), chunk):
        if start:
            await asyncio.sleep(0)
        auditentry.canonicals_into(rows, start, min(start + chunk, len(rows)), _ROW_HEAD, _ROW_DETAILS,
                                   _FORMAT_VERSION, TEXT_TYPES, row_canonical_and_json, canonicals, texts)
    return canonicals, texts


def link(rows: list[tuple], heads: dict[uuid.UUID | None, tuple[int, str]], encode_details,
         canonicals: list[bytes] | None = None, details_texts: list[bytes | None] | None = None) -> list[tuple]:
    """`rows` (audit_logs tuples without chain values) numbered and hashed after each chain's head.

    `heads` maps a tenant to its last (chain_seq, entry_hash); a tenant not in
    it starts a chain. It is updated in place. `encode_details` turns a details
    value into the JSON text the database will store (the sink's own encoder);
    `canonicals`: the rows' `row_canonical`, if already computed; `details_texts`: their details' JSON
    text, put in place of the details (`row_canonicals` gives both). The loop is `_fast/auditentry`'s.
    """
    if canonicals is None:
        canonicals = [row_canonical(row, encode_details) for row in rows]
    return auditentry.link(rows, heads, canonicals, details_texts, _TENANT, _ROW_DETAILS, _SEQ)


assert (_PREV, _HASH) == (_SEQ + 1, _SEQ + 2), "auditentry.link writes the chain columns side by side"


# ------------------------------------------------------------------ verifying


@dataclass(frozen=True, slots=True)
class ChainReport:
    """One tenant's chain as `verify` found it."""

    tenant_id: uuid.UUID | None
    entries: int  # entries checked
    first_seq: int | None
    last_seq: int | None
    head: str | None  # the last entry's hash: keep it elsewhere to detect later truncation
    broken_seq: int | None = None  # the first broken link: its chain_seq (or None when it has none)
    broken_entry: uuid.UUID | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


_PAGE = 5_000


async def _rows(conn, tenant_id: uuid.UUID | None) -> AsyncIterator[dict[str, Any]]:
    """A tenant's chained entries by chain_seq, a page at a time (keyset: never the whole table in memory)."""
    columns = [audit_logs.c[name] for name in COLUMNS if name != "details"]
    columns.append(sa.cast(audit_logs.c.details, sa.Text).label("details"))
    tenant = audit_logs.c.tenant_id == tenant_id if tenant_id is not None else audit_logs.c.tenant_id.is_(None)
    after = None
    while True:
        query = sa.select(*columns).where(tenant, audit_logs.c.chain_seq.is_not(None))
        if after is not None:
            query = query.where(audit_logs.c.chain_seq > after)
        page = (await conn.execute(query.order_by(audit_logs.c.chain_seq).limit(_PAGE))).mappings().all()
        for row in page:
            yield row
        if len(page) < _PAGE:
            return
        after = page[-1]["chain_seq"]


async def verify_chain(conn, tenant_id: uuid.UUID | None) -> ChainReport:
    """Recompute one tenant's chain; the report names the first broken link, if any."""
    expected_seq: int | None = None
    prev_hash: str | None = None
    first_seq = last_seq = None
    count = 0

    def broken(row, reason: str) -> ChainReport:
        return ChainReport(tenant_id, count, first_seq, last_seq, prev_hash, row["chain_seq"], _uuid(row["id"]), reason)

    async for row in _rows(conn, tenant_id):
        seq = row["chain_seq"]
        if first_seq is None:
            first_seq = seq
            if seq == 1:
                if row["prev_hash"] != GENESIS:
                    return broken(row, f"the first entry's prev_hash is {row['prev_hash']}, not the genesis value")
            else:
                # The oldest entries are gone: only retention may have deleted them, and it
                # left the last one it deleted as the chain's anchor (records/retention.py).
                anchor = await _anchor(conn, tenant_id)
                if anchor is None:
                    return broken(row, f"the chain starts at chain_seq {seq}: entries 1..{seq - 1} were deleted "
                                       "and retention left no anchor for them")
                if anchor.get("chain_seq") != seq - 1 or anchor.get("entry_hash") != row["prev_hash"]:
                    return broken(row, f"the chain starts at chain_seq {seq} with prev_hash {row['prev_hash']}, "
                                       f"but retention's anchor is chain_seq {anchor.get('chain_seq')} with "
                                       f"entry_hash {anchor.get('entry_hash')} (entries deleted after it)")
            prev_hash = row["prev_hash"]
        elif seq != expected_seq:
            missing = f"chain_seq {expected_seq}" if seq == expected_seq + 1 else f"chain_seq {expected_seq}..{seq - 1}"
            return broken(row, f"{missing} missing: chain_seq {expected_seq - 1} is followed by {seq} "
                               "(entries deleted)")
        elif row["prev_hash"] != prev_hash:
            return broken(row, f"prev_hash {row['prev_hash']} differs from the entry_hash {prev_hash} of "
                               f"chain_seq {seq - 1} (an entry before it was changed, or this link was rewritten)")
        recomputed = entry_hash(row["prev_hash"], seq, canonical(row, row["details"]))
        if recomputed != row["entry_hash"]:
            return broken(row, f"entry_hash {row['entry_hash']} does not match the entry's contents "
                               f"(recomputed {recomputed}): a stored value was changed")
        prev_hash = row["entry_hash"]
        last_seq = seq
        expected_seq = seq + 1
        count += 1
    unchained = (
        await conn.execute(
            sa.select(audit_logs.c.id).where(
                audit_logs.c.tenant_id == tenant_id if tenant_id is not None else audit_logs.c.tenant_id.is_(None),
                audit_logs.c.chain_seq.is_(None),
            ).limit(1)
        )
    ).scalar_one_or_none()
    if unchained is not None:
        return ChainReport(tenant_id, count, first_seq, last_seq, prev_hash, None, _uuid(unchained),
                           "an entry without a chain position (not written by the gateway's writer)")
    return ChainReport(tenant_id, count, first_seq, last_seq, prev_hash)


async def _anchor(conn, tenant_id: uuid.UUID | None) -> dict[str, Any] | None:
    from gateway.records.retention import ANCHOR_KEY  # the job that deletes chain prefixes owns the key

    tenant = system_config.c.tenant_id == tenant_id if tenant_id is not None else system_config.c.tenant_id.is_(None)
    value = (
        await conn.execute(sa.select(system_config.c.value).where(tenant, system_config.c.key == ANCHOR_KEY))
    ).scalar()
    return value if isinstance(value, dict) else None


async def verify(engine: AsyncEngine, tenant_id: uuid.UUID | None = None, *, all_tenants: bool = True
                 ) -> list[ChainReport]:
    """Check every tenant's chain (or only `tenant_id`'s); one report per chain, NULL-tenant chain included."""
    async with engine.connect() as conn:
        if tenant_id is not None or not all_tenants:
            tenants = [tenant_id]
        else:
            from gateway.records.retention import distinct_values  # one index probe per tenant

            tenants = await distinct_values(conn, audit_logs.c.tenant_id)
            tenants.sort(key=lambda t: (t is not None, str(t) if t is not None else ""))
        return [await verify_chain(conn, tenant) for tenant in tenants]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


__all__ = [
    "CHAIN_FIELDS",
    "GENESIS",
    "LOCK_CLASS",
    "ChainReport",
    "DetailsText",
    "EncodedDetails",
    "canonical",
    "entry_hash",
    "link",
    "lock_key",
    "tenants_of",
    "verify",
    "verify_chain",
]
