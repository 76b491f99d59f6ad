"""The record writer's intake (gateway._fast.intake): the lanes the request path queues its rows in, and the rows
of one data-plane request, the same from both twins."""

from __future__ import annotations

import uuid
from collections import deque
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._fast import auditentry_py
from gateway.records.audit import McpDetails
from gateway.records.writer import AUDIT, COLUMNS

WIDTHS = {table: len(columns) for table, columns in COLUMNS.items()}
TABLES = sorted(WIDTHS)
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


class Key:
    """A key as the data plane holds it (snapshot.KeyEntry's fields the rows read)."""

    def __init__(self, tenant_id=None, role="USER"):
        self.id, self.user_id = uuid.uuid4(), uuid.uuid4()
        self.tenant_id = tenant_id or uuid.uuid4()
        self.role = role


class Server:
    def __init__(self, name="files"):
        self.id, self.name = uuid.uuid4(), name


class Harness:
    """An intake over lanes of its own, noting its wake-ups and the audit rows it hands over after a stop."""

    def __init__(self, module, batch_size, limit, after_stop_answer=True):
        self.lanes = {table: (deque(), width) for table, width in WIDTHS.items()}
        self.wakes = 0
        self.after_stop: list[tuple] = []
        self.answer = after_stop_answer
        self.intake = module.Intake(self.lanes, AUDIT, batch_size, limit, self.wake, self.stopped_row)

    def wake(self):
        self.wakes += 1

    def stopped_row(self, row):
        self.after_stop.append(row)
        return self.answer

    def state(self):
        intake = self.intake
        return ({table: list(lane) for table, (lane, _) in self.lanes.items()}, intake.queued, intake.refused,
                intake.limit, intake.stopped, self.wakes, self.after_stop)


def _row(table, width, n):
    return tuple(f"{table}:{n}:{i}" for i in range(width))


operations = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.sampled_from([*TABLES, "nope"]), st.integers(-1, 1)),
    st.tuples(st.just("limit"), st.integers(0, 12)),
    st.tuples(st.just("stopped"), st.booleans()),
    st.tuples(st.just("settle"), st.integers(0, 5)),
), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=operations, batch_size=st.integers(1, 6), limit=st.integers(0, 10), answer=st.booleans())
def test_the_twins_queue_refuse_and_wake_alike(compiled_intake, python_intake, ops, batch_size, limit, answer):
    """The same submissions (any table, rows too short or too long, an unknown table), limit changes, stops and
    settled rows give the same lanes, counts, wake-ups, answers and errors from both twins; and what they do is
    RecordWriter.submit's promise: another table's row is refused and counted at the limit, an audit row never
    is (after a stop it goes to `after_stop`), a lane reaching a batch wakes the flusher."""

    def run(module):
        harness = Harness(module, batch_size, limit, answer)
        intake = harness.intake
        answers = []
        for n, op in enumerate(ops):
            if op[0] == "submit":
                _, table, off = op
                width = WIDTHS.get(table, 3) + off
                before = harness.state()
                try:
                    answers.append(intake.submit(table, _row(table, width, n)))
                except ValueError as exc:
                    answers.append(str(exc))
                    assert harness.state() == before  # a refused shape changes nothing
                    continue
                if table == AUDIT:
                    assert answers[-1] is (answer if before[4] else True)
                    assert harness.state()[2] == before[2]  # never counted as refused
                elif before[1] >= before[3]:
                    assert answers[-1] is False and harness.state()[2] == before[2] + 1
                else:
                    assert answers[-1] is True and harness.state()[1] == before[1] + 1
                    assert harness.wakes == before[5] + (before[1] + 1 == batch_size)
            elif op[0] == "limit":
                intake.limit = op[1]
            elif op[0] == "stopped":
                intake.stopped = op[1]
            else:  # the writer settles rows it wrote
                intake.queued = max(0, intake.queued - op[1])
        return answers, harness.state()

    assert run(compiled_intake) == run(python_intake)


def test_an_unknown_table_or_a_wrong_width_is_refused_where_the_row_is_made(intake_impl):
    harness = Harness(intake_impl, 10, 10)
    with pytest.raises(ValueError, match="'nope' is not a record table"):
        harness.intake.submit("nope", ())
    with pytest.raises(ValueError, match=f"a request_logs row has {WIDTHS['request_logs']} values, got 2"):
        harness.intake.submit("request_logs", (1, 2))
    with pytest.raises(ValueError, match=f"a audit_logs row has {WIDTHS[AUDIT]} values, got 0"):
        harness.intake.submit(AUDIT, ())
    assert harness.state()[:3] == ({table: [] for table in WIDTHS}, 0, 0)


def _recorder(module, harness, request_logs=True, audit=True):
    counter = iter(range(1, 1000))
    recorder = module.CallRecorder(harness.intake, lambda: uuid.UUID(int=next(counter)), auditentry_py.mcp_row,
                                   McpDetails)
    recorder.request_logs, recorder.audit = request_logs, audit
    return recorder


def test_a_request_is_recorded_as_its_request_log_row_and_its_audit_entry(intake_impl):
    harness = Harness(intake_impl, 100, 100)
    key, server = Key(), Server()
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}'
    _recorder(intake_impl, harness).record(
        key, server, "files", "tools/call", "echo", 502, -32000, "upstream gone", 12.5, body, 2**40, "10.0.0.7", NOW,
        False,
    )
    (log,) = harness.lanes["request_logs"][0]
    assert dict(zip(COLUMNS["request_logs"], log)) == {
        "id": uuid.UUID(int=1), "tenant_id": key.tenant_id, "user_id": key.user_id, "api_key_id": key.id,
        "server_id": server.id, "server_name": "files", "method": "tools/call", "tool_name": "echo",
        "status_code": 502, "error_code": -32000, "error": "upstream gone", "duration_ms": 12.5,
        "request_bytes": len(body), "response_bytes": 2**31 - 1,  # held at the int column's bound
        "client_ip": "10.0.0.7", "created_at": NOW,
    }
    (entry,) = harness.lanes[AUDIT][0]
    expected = auditentry_py.mcp_row(McpDetails, key, "files", "tools/call", "echo", body, 502, -32000,
                                     "upstream gone", 12.5, "10.0.0.7", NOW, False)
    assert entry[:7] == expected[:7] and entry[8:] == expected[8:]
    details, wanted = entry[7], expected[7]
    assert (details.body, details.server, details.status, details.error) == (
        wanted.body, wanted.server, wanted.status, wanted.error)
    assert harness.intake.queued == 1  # the audit entry is not counted against the limit


def test_a_caller_without_a_key_gets_a_request_log_row_and_no_audit_entry(intake_impl):
    harness = Harness(intake_impl, 100, 100)
    _recorder(intake_impl, harness).record(None, None, None, None, None, 401, None, "no key", 0.25, b"", 31,
                                           "10.0.0.8", NOW, False)
    (log,) = harness.lanes["request_logs"][0]
    assert log[1:5] == (None, None, None, None) and log[5:9] == (None, None, None, 401)
    assert log[12:14] == (0, 31)
    assert not harness.lanes[AUDIT][0]


def test_each_kind_of_row_can_be_off_and_a_full_queue_refuses_only_request_logs(intake_impl):
    harness = Harness(intake_impl, 100, 1)
    key = Key()
    args = ("files", "tools/call", "echo", 200, None, None, 1.0, b"{}", 2, "10.0.0.9", NOW, False)
    _recorder(intake_impl, harness, request_logs=False).record(key, Server(), *args)
    assert (len(harness.lanes["request_logs"][0]), len(harness.lanes[AUDIT][0])) == (0, 1)
    _recorder(intake_impl, harness, audit=False).record(key, Server(), *args)
    assert (len(harness.lanes["request_logs"][0]), len(harness.lanes[AUDIT][0])) == (1, 1)
    _recorder(intake_impl, harness).record(key, Server(), *args)  # the limit (1) is reached: the log is refused
    assert (len(harness.lanes["request_logs"][0]), len(harness.lanes[AUDIT][0])) == (1, 2)
    assert (harness.intake.queued, harness.intake.refused) == (1, 1)
