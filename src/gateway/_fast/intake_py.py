"""The record writer's intake: where the request path hands its rows over (records/writer.py writes them).

`Intake.submit` queues one row in its table's lane, as `RecordWriter.submit`
promises: a row of another table than audit_logs is refused and counted when
`queued` has reached `limit`, an audit row never is (after the writer stopped
it goes to `after_stop`, which spills it), and the flusher is woken when a lane
reaches a batch. `CallRecorder.record` is what the data plane does at the end
of every request (`DataPlane._record`): its request_logs row and, for an
authenticated caller, its audit entry, built and queued in one call. Both run on
every request, so they are kept here, in the compiled core: two rows cost no
Python frame between the request's handler and the lanes (about 150 bytecodes
a request before).

This file is also the compiled module: `intake_c.py` is a symlink to it and
`intake_c.pxd` gives it C types, so keep it to tuples, deques and calls.
"""

REQUEST_LOGS = "request_logs"
INT32_MAX = 2**31 - 1  # request_logs' byte counts are integer columns


class Intake:
    """The counts `submit` keeps over a writer's lanes.

    `lanes`: table -> (deque, width), the writer's own dict (it takes the rows
    from the same deques). `audit`: the audit table. `wake()`: sets the
    flusher's event. `after_stop(row)`: an audit row submitted after the writer
    stopped; its answer is submit's.
    """

    def __init__(self, lanes, audit, batch_size, limit, wake, after_stop):
        self.lanes = lanes
        self._audit_table = audit
        self.audit_lane, self.audit_width = lanes[audit]
        self.batch_size = batch_size
        # submit compares the depth with this alone: the writer's stop() sets it to 0, so a stopped writer
        # refuses rows without a second test here.
        self.limit = limit
        self.queued = 0  # rows of the other tables in the lanes or held by the writer
        self.refused = 0
        self.stopped = False  # the writer's stop() finished: audit rows go to `after_stop`
        self._wake = wake
        self._after_stop = after_stop

    def submit(self, table, row):
        """Queue one row (values in the table's column order). False if it was refused because the queue is
        full or the writer is stopped; the refusal is counted."""
        try:
            lane, width = self.lanes[table]
        except KeyError:
            raise ValueError(f"{table!r} is not a record table") from None
        if lane is self.audit_lane:
            return self._audit(row)
        return self._queue(lane, width, table, row)

    def _queue(self, lane, width, table, row):
        if len(row) != width:
            # COPY would silently ignore extra values; a short row would be dropped far from the bug. Fail where
            # the row is made.
            raise ValueError(f"a {table} row has {width} values, got {len(row)}")
        queued = self.queued
        if queued >= self.limit:
            self.refused += 1
            return False
        lane.append(row)
        self.queued = queued = queued + 1
        if queued == self.batch_size:
            # Only on the crossing: the flusher looks at the depth again after each batch, so a deeper queue
            # needs no further wake-ups.
            self._wake()
        return True

    def _audit(self, row):
        # Never refused, and not counted against the limit (that bound is the other tables'): the flusher
        # writes or spills them every interval.
        if len(row) != self.audit_width:
            raise ValueError(f"a {self._audit_table} row has {self.audit_width} values, got {len(row)}")
        if self.stopped:
            return self._after_stop(row)
        lane = self.audit_lane
        lane.append(row)
        if len(lane) == self.batch_size:
            self._wake()
        return True


class CallRecorder:
    """One data-plane request's rows, queued in `intake`'s lanes: its request_logs row (when `request_logs`)
    and, for a caller with a key, its audit entry (when `audit`), made by `audit_row` (auditentry.mcp_row)
    with `details_type` (records/audit.py `McpDetails`). `new_id()`: the request_logs row's id."""

    def __init__(self, intake, new_id, audit_row, details_type):
        self._intake = intake
        self._log_lane, self._log_width = intake.lanes[REQUEST_LOGS]
        self._new_id = new_id
        self._audit_row = audit_row
        self._details_type = details_type
        self.request_logs = True
        self.audit = True

    def record(self, key, server, server_name, method, target, status, error_code, error, duration_ms, body,
               sent, address, now, is_batch):
        """Queue the request's rows (refused ones are counted by the intake, as `submit`'s)."""
        if self.request_logs:
            if key is not None:
                tenant_id = key.tenant_id
                user_id = key.user_id
                key_id = key.id
            else:
                tenant_id = user_id = key_id = None
            row = (
                self._new_id(),
                tenant_id,
                user_id,
                key_id,
                server.id if server is not None else None,
                server_name,
                method,
                target,
                status,
                error_code,
                error,
                duration_ms,
                len(body),
                # A stream open for days can pass what the int column holds: counted up to its bound.
                sent if sent < INT32_MAX else INT32_MAX,
                address,
                now,
            )
            self._intake._queue(self._log_lane, self._log_width, REQUEST_LOGS, row)
        if key is not None and self.audit:
            # Every authenticated request, refused or not; its params are decoded later, by the writer.
            self._intake._audit(self._audit_row(
                self._details_type, key, server_name, method, target, body, status, error_code, error,
                duration_ms, address, now, is_batch,
            ))


__all__ = ("INT32_MAX", "REQUEST_LOGS", "CallRecorder", "Intake")
