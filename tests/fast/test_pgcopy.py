"""The binary COPY encoder: the compiled module and its twin write the same bytes, and PostgreSQL stores
exactly what asyncpg's own COPY stores for the same rows."""

import asyncio
import math
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._fast import pgcopy

KINDS = bytes([pgcopy.UUID, pgcopy.TEXT, pgcopy.INT4, pgcopy.INT8, pgcopy.FLOAT8, pgcopy.TIMESTAMPTZ, pgcopy.JSONB])
TABLE = (
    "CREATE TEMPORARY TABLE t (n int, id uuid, label varchar(64), small integer, big bigint, ms double precision, "
    "at timestamp with time zone, details jsonb)"
)
COLUMNS = ("id", "label", "small", "big", "ms", "at", "details")

ids = st.uuids() | st.uuids().map(str)
texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                     timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)),
                                                timezone(timedelta(hours=-11))]))
json_texts = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                          max_leaves=6).map(lambda value: __import__("orjson").dumps(value).decode())
rows = st.tuples(
    st.none() | ids,
    st.none() | texts,
    st.none() | st.integers(-(2**31), 2**31 - 1),
    st.none() | st.integers(-(2**63), 2**63 - 1),
    st.none() | st.floats(allow_nan=False),
    st.none() | times,
    st.none() | json_texts,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(rows, max_size=8))
def test_the_compiled_encoder_writes_the_twins_bytes(compiled_pgcopy, python_pgcopy, batch):
    assert compiled_pgcopy.encode(batch, KINDS) == python_pgcopy.encode(batch, KINDS)


def _stored(url, batch, encoder) -> list[tuple]:
    """Insert `batch` with `encoder` (None: asyncpg's copy_records_to_table) into a fresh table; read it back."""
    async def go():
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(TABLE)
            numbered = [(i, *row) for i, row in enumerate(batch)]
            if encoder is None:
                await conn.copy_records_to_table("t", records=numbered, columns=("n", *COLUMNS))
            else:
                kinds = bytes([pgcopy.INT4]) + KINDS
                await conn.copy_to_table("t", source=memoryview(encoder.encode(numbered, kinds)), columns=("n", *COLUMNS),
                                         format="binary")
            found = await conn.fetch(f"SELECT {', '.join(COLUMNS)}, details::text AS text FROM t ORDER BY n")
            return [tuple(record) for record in found]
        finally:
            await conn.close()

    return asyncio.run(go())


# Each example makes its own temporary table on a connection of its own: nothing carries over in the database.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(rows, min_size=1, max_size=12))
def test_postgresql_stores_what_asyncpg_stores(pgcopy_impl, pg_url, batch):
    assert _stored(pg_url, batch, pgcopy_impl) == _stored(pg_url, batch, None)


def test_edge_values_round_trip(pgcopy_impl, pg_url):
    naive = datetime(2026, 11, 26, 10, 0, 0, 123456)  # local time, as asyncpg reads a naive one
    batch = [
        (uuid.UUID(int=0), "", -(2**31), -(2**63), -0.0, datetime(1, 1, 2, tzinfo=timezone.utc), "null"),
        (uuid.UUID(int=2**128 - 1), "é ✓ 𝄞", 2**31 - 1, 2**63 - 1, math.inf, naive, '{"a":[1,2.5,"x"]}'),
        (str(uuid.UUID(int=7)), "x" * 64, True, 0, -math.inf, datetime(2000, 1, 1, tzinfo=timezone.utc), '"t"'),
        (None, None, None, None, 1e-310, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc), None),
    ]
    stored = _stored(pg_url, batch, pgcopy_impl)
    assert stored == _stored(pg_url, batch, None)
    assert stored[0][0] == uuid.UUID(int=0) and stored[1][0] == uuid.UUID(int=2**128 - 1)
    assert stored[1][1] == "é ✓ 𝄞" and stored[1][5] == naive.astimezone(timezone.utc)
    assert math.copysign(1.0, stored[0][4]) == -1.0 and stored[3][4] == 1e-310
    assert stored[3][5] == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (pgcopy.TEXT, 5),
        (pgcopy.TEXT, "lone \ud800 surrogate"),
        (pgcopy.UUID, "not-a-uuid-secret-text"),
        (pgcopy.UUID, 12345),
        (pgcopy.INT4, 2**31),
        (pgcopy.INT4, "7"),
        (pgcopy.INT8, -(2**63) - 1),
        (pgcopy.INT8, math.nan),
        (pgcopy.FLOAT8, "1.5"),
        (pgcopy.TIMESTAMPTZ, "2026-11-26"),
        (pgcopy.JSONB, {"a": 1}),
    ],
)
def test_a_value_its_column_cannot_take_is_refused_without_quoting_it(pgcopy_impl, kind, value):
    with pytest.raises(ValueError) as refused:
        pgcopy_impl.encode([("fine", value)], bytes([pgcopy.TEXT, kind]))
    message = str(refused.value)
    assert message.startswith("row 0, column 1: a ") and pgcopy.KIND_NAMES[kind] in message
    assert str(value) not in message and "secret" not in message


def test_a_row_of_the_wrong_width_is_refused(pgcopy_impl):
    with pytest.raises(ValueError, match="row 1 has 1 values for 2 columns"):
        pgcopy_impl.encode([("a", "b"), ("c",)], bytes([pgcopy.TEXT, pgcopy.TEXT]))


def test_an_empty_batch_is_the_header_and_trailer(pgcopy_impl):
    assert pgcopy_impl.encode([], KINDS) == b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"\xff\xff"
