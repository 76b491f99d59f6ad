"""The audit spill on disk: framing, torn lines, owners and adoption (no database needed)."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

from gateway.records.spill import Spill, database_tag, default_dir, read_segment
from gateway.records.writer import COLUMNS

URL = "postgresql://gw@db.example:5432/gateway"


def entry(i: int, **overrides) -> tuple:
    values = dict.fromkeys(COLUMNS["audit_logs"])
    values.update(
        id=uuid.uuid4(), tenant_id=uuid.uuid4(), user_id=uuid.uuid4(), action="mcp.tools/call", outcome="success",
        details={"i": i, "f": 1.5, "s": "é ✓\n", "none": None, "list": [1, "2"]},
        created_at=datetime(2026, 1, 2, 3, 4, 5, i, tzinfo=timezone.utc), duration_ms=i / 3, role="USER",
    )
    values.update(overrides)
    return tuple(values[name] for name in COLUMNS["audit_logs"])


def test_rows_round_trip_through_a_segment(tmp_path):
    spill = Spill(tmp_path, URL)
    rows = [entry(i) for i in range(10)]
    spill.append(rows[:4])
    spill.append(rows[4:])
    assert spill.rows_pending == 10 and len(spill.pending) == 1
    path, result = spill.oldest()
    assert result.rows == rows and result.torn == 0
    spill.done(path)
    assert not path.exists() and spill.rows_pending == 0
    spill.close()
    assert os.listdir(tmp_path) == []  # nothing pending: the owner's lock file goes too


def test_a_torn_last_line_and_a_damaged_line_are_ignored_and_the_rest_read(tmp_path):
    spill = Spill(tmp_path, URL)
    rows = [entry(i) for i in range(5)]
    spill.append(rows)
    path = spill.pending[0][0]
    data = path.read_bytes().split(b"\n")
    # Flip one byte inside the third line's payload: its checksum no longer matches.
    damaged = bytearray(data[2])
    damaged[30] ^= 0x01
    data[2] = bytes(damaged)
    path.write_bytes(b"\n".join(data) + b'0badc0de {"id": "cut sh')  # and a torn last line
    result = read_segment(path)
    assert result.torn == 2
    assert result.rows == rows[:2] + rows[3:]


def test_segments_roll_over_at_their_size(tmp_path):
    spill = Spill(tmp_path, URL, segment_bytes=4096)
    for i in range(30):
        spill.append([entry(i)])
    assert len(spill.pending) > 1
    assert sum(count for _, count in spill.pending) == 30
    seen = []
    while spill.pending:
        path, result = spill.oldest()
        seen.extend(result.rows)
        spill.done(path)
    assert [row[COLUMNS["audit_logs"].index("details")]["i"] for row in seen] == list(range(30))


def test_a_live_owner_keeps_its_segments_and_a_dead_ones_are_adopted(tmp_path):
    first = Spill(tmp_path, URL)
    first.append([entry(i) for i in range(3)])
    second = Spill(tmp_path, URL)
    assert second.adopt() == 0  # the first still holds its lock
    first.close()  # as a process that exits (or dies) with rows pending: its files stay
    assert second.adopt() == 3
    assert second.adopt() == 0  # adopted once
    path, result = second.oldest()
    assert len(result.rows) == 3 and not second.is_own(path)
    second.done(path)
    second.close()
    assert os.listdir(tmp_path) == []  # the dead owner's lock file is cleaned up with its last segment


def test_adopted_segments_are_replayed_before_the_process_own(tmp_path):
    dead = Spill(tmp_path, URL)
    dead.append([entry(0)])
    dead.close()
    alive = Spill(tmp_path, URL)
    alive.append([entry(1)])
    alive.adopt()
    order = []
    while alive.pending:
        path, result = alive.oldest()
        order.append(result.rows[0][COLUMNS["audit_logs"].index("details")]["i"])
        alive.done(path)
    assert order == [0, 1]


def test_another_database_segments_are_never_adopted(tmp_path):
    other = Spill(tmp_path, "postgresql://gw@db.example:5432/another")
    other.append([entry(0)])
    other.close()
    assert Spill(tmp_path, URL).adopt() == 0
    assert database_tag(URL) != database_tag("postgresql://gw@db.example:5432/another")
    assert database_tag("postgresql://a:secret1@h/db") == database_tag("postgresql://a:secret2@h/db")
    # The same database through another address (a pooler, a failover host) finds its spill.
    assert database_tag("postgresql://a@10.0.0.1:5432/db") == database_tag("postgresql://a@pooler:6432/db")


def test_default_directory(tmp_path):
    assert default_dir(f"sqlite:///{tmp_path}/gw.db") == tmp_path / "gateway-spill"
    assert default_dir(URL).name == "gateway-spill"


def test_rows_with_database_ids_are_spilled(tmp_path):
    """Ids read back from PostgreSQL are asyncpg's UUID subclass, which orjson does not encode itself."""
    import asyncpg.pgproto.pgproto as pgproto

    tenant = pgproto.UUID(str(uuid.uuid4()))
    spill = Spill(tmp_path, URL)
    spill.append([entry(0, tenant_id=tenant)])
    _, result = spill.oldest()
    assert result.rows[0][1] == uuid.UUID(str(tenant))


def test_details_kept_as_text_are_spilled_as_their_json(tmp_path):
    """A plain call's details are kept as their JSON text (chain.DetailsText); the spill stores that JSON
    itself, and the row comes back with the same details as a dict (and the same canonical form)."""
    import orjson

    from gateway.records import chain
    from gateway.records.sinks import encode_json

    value = {"method": "tools/call", "params": {"arguments": {"q": "x"}, "name": "t"}, "request_id": 7,
             "server": "s", "status": 200}
    row = entry(0, details=chain.DetailsText(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)))
    spill = Spill(tmp_path, URL)
    spill.append([row])
    _, result = spill.oldest()
    back = result.rows[0]
    at = COLUMNS["audit_logs"].index("details")
    assert back[at] == value and back[:at] == row[:at] and back[at + 1 :] == row[at + 1 :]
    assert chain.row_canonical(back, encode_json) == chain.row_canonical(row, encode_json)
