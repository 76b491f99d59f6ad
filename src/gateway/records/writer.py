"""The batched record writer: request logs, audit entries and metrics reach the database here.

It owns a bounded in-memory queue per record table and one flusher task that
writes the queued rows in batches through a `Sink` (COPY on PostgreSQL,
executemany on SQLite). The request path only calls `submit`, which appends a
tuple and returns: it never awaits, never blocks and never touches the
database. The writer must not lose a row it accepted while the process lives
(a batch the database could not take is held and retried until it can), must
not grow past `max_queue` (new rows are refused and counted instead), and must
never log row contents (they carry user data).

Audit entries have a policy of their own: they are never refused and do not
count against `max_queue` (request logs and metrics are the rows refused when
it is reached). The flusher prepares them (`prepare_audit`: decode, sanitize,
bound, log; records/audit.py) every interval and writes them through the
sink, which chains them (records/chain.py). When a write fails, the batch goes to
the spill (records/spill.py: append + fsync) instead of being held in memory,
and so does every later audit batch until the spill is replayed: rows reach
the database in the order they were submitted. Replay is one segment at a
time, with backoff while the database stays away; a segment is deleted only
after its rows are committed, and rows already in the table are skipped.
`stop()` spills whatever audit rows it could not write before its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass

from collections.abc import Callable

import sqlalchemy as sa

from gateway._fast import auditentry
from gateway._fast.intake import Intake
from gateway.db import tables
from gateway.records.metrics import Histogram
from gateway.records.sanitize import CLEANED_TEXTS, clean_text
from gateway.records.sinks import RowsRejected, Sink, SinkError
from gateway.records.spill import Spill, SpillFull

logger = logging.getLogger("gateway.records")

COLUMNS: dict[str, tuple[str, ...]] = {
    name: tuple(column.name for column in tables.metadata.tables[name].columns)
    for name in tables.RECORD_TABLES
}
"""For each record table, its column names in schema order: the order of a submitted row's values."""

# For each record table but audit_logs (records/audit.py bounds its own), the (position, length) of each text
# column (length None: text without a bound). The request path submits what clients sent (a tool name, a
# resource URI, a method of their own): before a batch is written each is cleaned as the audit trail's texts
# are (no NUL, valid UTF-8, secrets replaced, cut at 1024 characters with a note; records/sanitize.py `clean_text`) and
# cut to its column, so no value makes the database refuse its row, and none leaks a secret the audit entry
# of the same request redacts.
TEXTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    name: tuple(
        (at, column.type.length)
        for at, column in enumerate(tables.metadata.tables[name].columns)
        if isinstance(column.type, sa.String)
    )
    for name in tables.RECORD_TABLES
    if name != "audit_logs"
}

# Retry delays after a failed write: doubling from the first to the cap, each
# jittered down by up to half so that gateway processes cut off by the same
# outage do not reconnect in lockstep.
RETRY_FIRST_SECONDS = 0.1
RETRY_CAP_SECONDS = 4.0
AUDIT = "audit_logs"
# How often a running writer looks for spill segments left by processes that died.
ADOPT_INTERVAL_SECONDS = 60.0
# Audit rows prepared per step before the flusher lets the loop run other work: about half a millisecond
# (a plain call's row ~1.6 us, its log line ~0.6 us), as the COPY's and the chain's slices (records/sinks.py).
_PREPARE_CHUNK = 256
# A step that took longer than this makes the next one smaller, in proportion (down to one row), and one that
# took under a quarter of it makes the next one twice as big again (up to _PREPARE_CHUNK). A walked entry
# costs up to a few tens of milliseconds (a 4 MB body, decoded and cut at sanitize.MAX_DETAILS): 256 of them
# held the loop for seconds; now each waits on the requests in flight at most one or two such steps.
_PREPARE_SLICE = 0.002


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of the writer's counters, for /metrics.
    submitted == written + dropped + queued + spilled - recovered, always."""

    submitted: int  # rows passed to submit(), accepted or not
    written: int  # rows the database confirmed
    # refused (queue full, writer stopped) + rejected by the database + unwritten at stop()'s deadline
    dropped: int
    failed_flushes: int  # batch writes that failed and were (or will be) retried
    queued: int  # rows accepted and not yet written, including a held failed batch
    last_flush_seconds: float | None  # how long the last successful batch took
    last_error: str | None  # the most recent write error or rejection (kept after recovery)
    spilled: int = 0  # audit rows in spill files, not yet written (this process's and adopted ones)
    spilled_total: int = 0  # audit rows this process ever spilled
    recovered: int = 0  # audit rows written from spill files that earlier processes left


class RecordWriter:
    """Queues record rows on the request path and writes them in batches off it."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_queue: int = 100_000,
        batch_size: int = 2_000,
        flush_interval: float = 0.5,
        spill: Spill | None = None,
        prepare_audit: Callable[[list[tuple]], list[tuple]] | None = None,
    ) -> None:
        """`spill`: where audit batches go when the database cannot take them (None: they are
        held in memory like other rows). `prepare_audit`: turns submitted audit rows into stored
        ones (records/audit.py `AuditTrail.prepare`); None: they are stored as submitted."""
        if max_queue < 1 or batch_size < 1 or flush_interval <= 0:
            raise ValueError("max_queue and batch_size must be positive and flush_interval above zero")
        self._sink = sink
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_interval = flush_interval

        # One FIFO per table, so a batch needs no grouping and a row needs no
        # wrapper saying where it goes. Each entry carries the table's width.
        self._lanes: dict[str, tuple[deque[tuple], int]] = {
            table: (deque(), len(columns)) for table, columns in COLUMNS.items()
        }
        # Tables batched by _take_batch; audit rows have their own path (_flush_audit).
        self._tables = tuple(table for table in COLUMNS if table != AUDIT)
        self._next_table = 0  # batches start at a rotating table: a busy one cannot starve the rest
        # Rows taken from the lanes and not yet written: the batch in flight, or
        # the one that failed and is being retried. Counted in the depth.
        self._held: dict[str, list[tuple]] = {}

        # No count of submissions: every row submitted is written, dropped or
        # queued, so `stats` adds them up instead of submit() paying for it.
        self._written = 0
        self._rejected = 0
        self._unwritten_at_stop = 0
        self._failed_flushes = 0
        self._settled_by_table = dict.fromkeys(COLUMNS, 0)  # written or rejected, for flush()
        self._last_flush_seconds: float | None = None
        self._last_error: str | None = None
        # Each write the database took, by table (audit rows: the chaining transaction; the spill's
        # replays too), for /metrics; a write that failed is counted in failed_flushes instead.
        self.flush_seconds = Histogram(
            "gateway_writer_flush_seconds", "Time the database took to take one batch of records, by table",
            ("table",),
        )

        self._outage_started: float | None = None  # monotonic time of the first failure of an outage
        self._outage_failures = 0
        self._refused_seen = 0  # refusals already reported by the flusher
        self._refused_at_overflow: int | None = None  # refusal count when the queue filled up

        # Audit: rows taken from their lane and prepared, not yet written or spilled.
        self._audit_lane = self._lanes[AUDIT][0]
        self._audit_held: list[tuple] = []
        self._prepare_size = _PREPARE_CHUNK  # audit rows prepared in the next step (`_prepare_lane`)
        self._prepare_audit = prepare_audit
        self._spill = spill
        self._spilled_total = 0
        self._own_spilled = 0  # this process's rows now in the spill (the stats' balance)
        self._recovered = 0
        self._replay_at = 0.0  # monotonic time before which no replay is tried (backoff)
        self._replay_delay = RETRY_FIRST_SECONDS
        self._adopt_at = 0.0
        self._retry_at = 0.0  # monotonic time before which a held (failed) batch is not tried again
        self._retry_delay = RETRY_FIRST_SECONDS
        self._spilling_since: float | None = None  # when audit rows started going to the spill
        self._spilled_this_outage = 0
        self._spill_failing = False

        self._wake = asyncio.Event()  # enough rows for a batch, or stop requested
        # What the request path runs (compiled, _fast/intake): `submit`, and the counts it keeps over the lanes:
        # `queued` (rows in the lanes + rows held, audit rows aside: _audit_lane, _audit_held), `limit` (the
        # depth that refuses: stop() sets it to 0), `refused`, and `stopped` (stop() finished: audit rows
        # submitted now are spilled at once).
        self._intake = Intake(self._lanes, AUDIT, batch_size, max_queue, self._wake.set, self._spill_after_stop)
        self.submit = self._intake.submit  # the request path's call, without a frame of ours around it
        self._stop_requested = asyncio.Event()
        self._write_lock = asyncio.Lock()  # one batch at a time: flusher, flush() and stop() share it
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------ request path

    def submit(self, table: str, row: tuple) -> bool:
        """Queue one row (values in `COLUMNS[table]` order). False if it was refused
        because the queue is full or the writer is stopped; the refusal is counted.

        Audit rows are never refused and do not count against `max_queue`: the
        flusher writes or spills them every interval. (Each writer answers this
        with its intake's `submit`, _fast/intake, set in `__init__`.)"""
        return self._intake.submit(table, row)

    @property
    def intake(self) -> Intake:
        """The lanes' intake, for a request path that queues its rows itself (`CallRecorder`)."""
        return self._intake

    # ------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stats(self) -> WriterStats:
        dropped = self._intake.refused + self._rejected + self._unwritten_at_stop
        queued = self._intake.queued + len(self._audit_lane) + len(self._audit_held)
        return WriterStats(
            submitted=self._written + dropped + queued + self._own_spilled - self._recovered,
            written=self._written,
            dropped=dropped,
            failed_flushes=self._failed_flushes,
            queued=queued,
            last_flush_seconds=self._last_flush_seconds,
            last_error=self._last_error,
            spilled=self._spill.rows_pending if self._spill is not None else 0,
            spilled_total=self._spilled_total,
            recovered=self._recovered,
        )

    async def start(self) -> None:
        """Start the flusher task (rows submitted before this wait for it)."""
        if self.running:
            raise RuntimeError("the record writer is already running")
        self._intake.limit = self._max_queue
        self._intake.stopped = False
        self._stop_requested.clear()
        self._wake.clear()
        await self._adopt()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway.records.writer")

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new rows, write every queued one (retrying through errors), then stop.

        Rows still unwritten `timeout` seconds after the call are counted as
        dropped and logged (as a count), except audit rows: those are spilled
        (fsync) before this returns, and only counted as dropped if the spill
        cannot be written either. The sink stays open: it is the caller's to
        close; the spill's files are released (pending segments stay on disk
        for the next process).
        """
        self._intake.limit = 0
        self._stop_requested.set()
        self._wake.set()
        task = self._task
        if task is None or task.done():
            # Never started (or already stopped): drain here, under the same deadline.
            task = asyncio.get_running_loop().create_task(self._drain(), name="gateway.records.writer.drain")
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            # Let a cancelled write unwind (release its connection), but do not
            # let it hold shutdown hostage.
            await asyncio.wait({task}, timeout=1.0)
        elif not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("record writer task failed: %s", _describe(exc))
        self._task = None
        await self._spill_leftover_audit()
        self._intake.stopped = True
        if self._spill is not None:
            await asyncio.to_thread(self._spill.close)
        unwritten = self._intake.queued
        if unwritten:
            for lane, _width in self._lanes.values():
                lane.clear()
            self._held.clear()
            self._intake.queued = 0
            self._unwritten_at_stop += unwritten
            logger.error(
                "record writer stopped with %d records not written after %.1fs (last error: %s)",
                unwritten,
                timeout,
                self._last_error,
            )

    async def flush(self) -> None:
        """Write every row queued at the time of the call, in batches, before returning.

        Raises `SinkError` (or whatever the sink raised) if the database cannot
        take them; the rows stay queued and the flusher keeps retrying them.
        """
        goal = {
            table: self._settled_by_table[table] + len(lane) + len(self._held.get(table, ()))
            for table, (lane, _width) in self._lanes.items()
        }
        goal[AUDIT] += len(self._audit_held)
        # Per-table FIFO: a table's rows queued now are its next settlements up to
        # `goal`. (An empty queue also ends it: stop() may have discarded rows.)
        while self._unsettled() and any(self._settled_by_table[t] < target for t, target in goal.items()):
            await self._flush_batch(retry_now=True)
        # Audit rows that went to the spill are settled but not in the database yet.
        while self._spill is not None and self._spill.pending:
            await self._flush_batch(retry_now=True, replay_now=True)

    # ------------------------------------------------------------ flusher

    async def _run(self) -> None:
        while not self._stop_requested.is_set():
            # Each path backs off on its own (_retry_at for a held batch, _replay_at for
            # the spill), so audit rows keep reaching the spill every interval while
            # the database is away, instead of waiting in memory behind a backoff.
            pause = self._pause()
            if pause > 0:
                await _wait(self._wake, pause)
                if self._stop_requested.is_set():
                    break
            # Also when there was no wait: a wake-up left set by a batch this pass writes would end the
            # next pause at once and write a partial batch early.
            self._wake.clear()
            if self._spill is not None and time.monotonic() >= self._adopt_at:
                await self._adopt()
            try:
                await self._flush_batch()
            except Exception:  # noqa: BLE001 - noted by _flush_batch; the flusher must not die
                pass
            self._report_overflow()
        await self._drain()

    def _pause(self) -> float:
        """How long the flusher may wait before there is work it can make progress on (0: none)."""
        now = time.monotonic()
        audit_waiting = len(self._audit_lane)
        if audit_waiting >= self._batch_size:
            return 0.0
        pause = self._flush_interval
        if self._held:
            if now >= self._retry_at:
                return 0.0
            pause = min(pause, self._retry_at - now)
        elif self._intake.queued >= self._batch_size:
            return 0.0
        spill = self._spill
        if spill is not None and spill.pending:
            if now >= self._replay_at:
                return 0.0
            pause = min(pause, self._replay_at - now)
        return pause

    async def _drain(self) -> None:
        """Write until nothing is queued, retrying with backoff; stop() bounds it with its deadline."""
        retry_delay = RETRY_FIRST_SECONDS
        while self._unsettled():
            try:
                await self._flush_batch(retry_now=True)
            except Exception:  # noqa: BLE001 - noted by _flush_batch
                await asyncio.sleep(_jittered(retry_delay))
                retry_delay = min(retry_delay * 2, RETRY_CAP_SECONDS)
            else:
                retry_delay = RETRY_FIRST_SECONDS
        self._report_overflow()
        # Everything queued is written (or spilled): replay the spill while the database answers.
        while self._replay_due():
            try:
                await self._flush_batch()
            except Exception:  # noqa: BLE001 - noted by _flush_batch; the spill stays for the next start
                break

    async def _flush_batch(self, *, retry_now: bool = False, replay_now: bool = False) -> None:
        """Write one batch: the queued audit rows (or spill them), then the held batch if a write
        failed and its backoff is over (or `retry_now`), else up to batch_size queued rows of the
        other tables. Raises the error of a write that failed (its rows are kept)."""
        async with self._write_lock:
            started = time.perf_counter()
            written_before = self._written
            audit_failure = await self._flush_audit(replay_now)
            if not self._held:
                self._take_batch()
            if self._held and (retry_now or time.monotonic() >= self._retry_at):
                try:
                    for table in list(self._held):
                        await self._write_table(table, self._held[table])
                        del self._held[table]
                except Exception as exc:
                    self._note_failure(exc)
                    self._retry_at = time.monotonic() + _jittered(self._retry_delay)
                    self._retry_delay = min(self._retry_delay * 2, RETRY_CAP_SECONDS)
                    raise
                self._retry_delay = RETRY_FIRST_SECONDS
            if audit_failure is not None:
                self._note_failure(audit_failure)
                raise audit_failure
            if self._written == written_before:
                return  # nothing reached the database (nothing to write, or only spilled)
            self._last_flush_seconds = time.perf_counter() - started
            if self._outage_started is not None:
                logger.warning(
                    "writing records again after %d failed attempts over %.1fs",
                    self._outage_failures,
                    time.monotonic() - self._outage_started,
                )
                self._outage_started = None
                self._outage_failures = 0

    def _take_batch(self) -> None:
        budget = self._batch_size
        count = len(self._tables)
        first = self._next_table
        self._next_table = (first + 1) % count
        for offset in range(count):
            table = self._tables[(first + offset) % count]
            lane = self._lanes[table][0]
            if not lane:
                continue
            if len(lane) <= budget:
                rows = list(lane)
                lane.clear()
            else:
                popleft = lane.popleft
                rows = [popleft() for _ in range(budget)]
            if TEXTS[table]:
                try:
                    rows = _bound_rows(rows, TEXTS[table], CLEANED_TEXTS, clean_text)
                except Exception as exc:  # noqa: BLE001 - never lose a taken row: the database judges it as it is
                    logger.error("could not bound the texts of %d %s rows: %s", len(rows), table, _describe(exc))
            self._held[table] = rows
            budget -= len(rows)
            if not budget:
                return

    async def _write_table(self, table: str, rows: list[tuple], *, queued: bool = True) -> int:
        """Write `rows`, dropping only rows the database rejects (found by halving); returns how many.

        On any other error `rows` is cut down to the rows not yet written, which
        are always a suffix, and the error propagates. `queued`: the rows are
        counted in the queue (False: rows replayed from the spill, counted by
        the caller). A rejected audit row is kept in the spill's rejected file.
        """
        columns = COLUMNS[table]
        pending = [(0, len(rows))]  # a stack of ranges, leftmost on top: settled rows stay a prefix
        low = 0
        rejected = 0
        rejection: SinkError | None = None
        try:
            while pending:
                low, high = pending.pop()
                chunk = rows if high - low == len(rows) else rows[low:high]
                began = time.perf_counter()
                try:
                    await self._sink.write(table, columns, chunk)
                except RowsRejected as exc:
                    if high - low > 1:
                        middle = (low + high) // 2
                        pending.append((middle, high))
                        pending.append((low, middle))
                        continue
                    rejected += 1
                    rejection = exc
                    if queued:
                        self._settle(table, 1)
                    self._rejected += 1
                    if table == AUDIT:
                        await self._keep_rejected(chunk)
                    continue
                self.flush_seconds.observe(time.perf_counter() - began, table)
                if queued:
                    self._settle(table, high - low)
                    self._written += high - low
        except BaseException:  # also cancellation at stop()'s deadline: keep what is unwritten
            del rows[:low]
            raise
        finally:
            if rejected:
                self._last_error = str(rejection)
                logger.warning("dropped %d %s rows the database rejected: %s", rejected, table, rejection)
        return rejected

    # ------------------------------------------------------------ audit: write, spill, replay

    async def _flush_audit(self, replay_now: bool = False) -> Exception | None:
        """Write the queued audit rows, or spill them; replay the spill when it is due.

        Returns the error that kept rows from the database (they are in the
        spill, or held in memory if the spill failed too), or None.
        """
        if self._audit_lane:
            await self._prepare_lane()
        spill = self._spill
        if spill is not None and spill.pending:
            if self._audit_held:
                await self._spill_held()  # behind the older rows on disk, so order holds
            if not (replay_now or time.monotonic() >= self._replay_at):
                return None
            error = await self._replay_one()
            if error is not None or spill.pending:
                return error
            # The spill is drained; rows it could not take (held) go straight in below.
        rows = self._audit_held
        while rows:
            chunk = rows[: self._batch_size]
            count = len(chunk)
            try:
                await self._write_table(AUDIT, chunk)
            except BaseException as exc:  # the rows are kept either way, also when cancelled at stop()
                rows[:count] = chunk  # the unwritten suffix
                if not isinstance(exc, Exception):
                    raise
                if spill is not None:
                    self._back_off_replay()
                    await self._spill_held()
                return exc
            del rows[:count]
        return None

    async def _prepare_lane(self) -> None:
        """Move the audit lane into `_audit_held`, prepared, a chunk at a time (no row is ever in neither)."""
        lane = self._audit_lane
        popleft = lane.popleft
        size = self._prepare_size
        while lane:
            chunk = [popleft() for _ in range(min(size, len(lane)))]
            started = time.perf_counter()
            self._audit_held.extend(self._prepared(chunk))
            took = time.perf_counter() - started
            if took > _PREPARE_SLICE:
                size = max(1, int(size * _PREPARE_SLICE / took))
            elif took < _PREPARE_SLICE / 4 and size < _PREPARE_CHUNK:
                size = min(_PREPARE_CHUNK, size * 2)
            if lane:
                await asyncio.sleep(0)  # a large backlog must not hold up the requests in flight
        self._prepare_size = size

    def _prepared(self, rows: list[tuple]) -> list[tuple]:
        prepare = self._prepare_audit
        if prepare is None:
            return rows
        try:
            return prepare(rows)
        except Exception as exc:  # noqa: BLE001 - a bug in preparing must not lose an entry
            logger.error("could not prepare %d audit entries (%s); storing them without details",
                         len(rows), type(exc).__name__)
            at = COLUMNS[AUDIT].index("details")
            bare = [(row[0] or uuid.uuid4(), *row[1:at], {"error": f"details not recorded: {type(exc).__name__}"},
                     *row[at + 1 :]) for row in rows]
            try:
                return prepare(bare)
            except Exception:  # noqa: BLE001
                return bare

    async def _spill_held(self) -> bool:
        """Append `_audit_held` to the spill (fsync). False if the spill failed: the rows stay held."""
        rows = self._audit_held
        if not rows:
            return True
        try:
            await asyncio.to_thread(self._spill.append, rows)
        except SpillFull as exc:
            if not self._spill_failing:
                logger.error("%s; holding %d audit entries in memory and retrying", exc, len(rows))
                self._spill_failing = True
            return False
        if self._spill_failing:
            logger.warning("the audit spill takes entries again")
            self._spill_failing = False
        count = len(rows)
        self._audit_held = []
        self._settled_by_table[AUDIT] += count
        self._spilled_total += count
        self._own_spilled += count
        if self._spilling_since is None:
            self._spilling_since = time.monotonic()
            self._spilled_this_outage = 0
            logger.warning("audit entries go to the spill in %s until the database takes them again",
                           self._spill.directory)
        self._spilled_this_outage += count
        return True

    async def _replay_one(self) -> Exception | None:
        """Write the oldest spill segment's rows, then delete it. Returns the error if the database failed."""
        spill = self._spill
        try:
            found = await asyncio.to_thread(spill.oldest)
        except OSError as exc:
            logger.error("cannot read the audit spill: %s", exc)
            self._back_off_replay()
            return SinkError(f"cannot read the audit spill: {exc}")
        if found is None:
            return None
        path, result = found
        rows = result.rows
        own = spill.is_own(path)
        rejected = 0
        try:
            for start in range(0, len(rows), self._batch_size):
                rejected += await self._write_table(AUDIT, rows[start : start + self._batch_size], queued=False)
        except Exception as exc:  # noqa: BLE001 - the segment stays and is replayed again, whole
            self._back_off_replay()
            return exc
        # Committed: only now may the segment go (a crash before this replays it again; its rows are skipped).
        await asyncio.to_thread(spill.done, path)
        written = len(rows) - rejected
        self._written += written
        if own:
            self._own_spilled -= min(self._own_spilled, len(rows) + result.torn)
        else:
            self._recovered += written
        self._replay_delay = RETRY_FIRST_SECONDS
        self._replay_at = 0.0
        if not spill.pending and self._spilling_since is not None:
            logger.warning("audit spill replayed: %d entries spilled over %.1fs are in the database",
                           self._spilled_this_outage, time.monotonic() - self._spilling_since)
            self._spilling_since = None
        return None

    def _back_off_replay(self) -> None:
        self._replay_at = time.monotonic() + _jittered(self._replay_delay)
        self._replay_delay = min(self._replay_delay * 2, RETRY_CAP_SECONDS)

    def _replay_due(self) -> bool:
        spill = self._spill
        return spill is not None and bool(spill.pending) and time.monotonic() >= self._replay_at

    async def _adopt(self) -> None:
        """Take over spill segments that dead processes left for this database."""
        if self._spill is None:
            return
        self._adopt_at = time.monotonic() + ADOPT_INTERVAL_SECONDS
        try:
            adopted = await asyncio.to_thread(self._spill.adopt)
        except OSError as exc:
            logger.error("cannot read the audit spill directory %s: %s", self._spill.directory, exc)
            return
        if adopted:
            logger.warning("found %d audit entries in spill files of an earlier process in %s; replaying them",
                           adopted, self._spill.directory)

    async def _keep_rejected(self, rows: list[tuple]) -> None:
        if self._spill is not None:
            try:
                await asyncio.to_thread(self._spill.keep_rejected, rows)
                return
            except OSError as exc:
                logger.error("cannot keep a rejected audit entry: %s", exc)
        logger.error("the database rejected an audit entry and no spill is configured to keep it")

    async def _spill_leftover_audit(self) -> None:
        """At stop: audit rows still in memory (a dead database, or the deadline) go to the spill."""
        raw = list(self._audit_lane)
        self._audit_lane.clear()
        if raw:
            self._audit_held.extend(self._prepared(raw))
        count = len(self._audit_held)
        if not count:
            return
        if self._spill is not None and await self._spill_held():
            logger.warning("stopping with %d audit entries not written: they are in the spill, for the next start",
                           count)
            return
        # No spill, or it cannot be written: nothing more can be done in this process.
        self._audit_held = []
        self._settled_by_table[AUDIT] += count
        self._unwritten_at_stop += count
        logger.error("stopping with %d audit entries that could be neither written nor spilled", count)

    def _spill_after_stop(self, row: tuple) -> bool:
        """An audit row submitted after stop(): written to the spill at once (blocking: only at shutdown)."""
        if self._spill is not None:
            try:
                self._spill.append(self._prepared([row]))
                self._spilled_total += 1
                self._own_spilled += 1
                return True
            except SpillFull as exc:
                logger.error("an audit entry after the writer stopped could not be spilled: %s", exc)
        self._intake.refused += 1
        return False

    def _settle(self, table: str, count: int) -> None:
        if table != AUDIT:
            self._intake.queued -= count
        self._settled_by_table[table] += count

    def _unsettled(self) -> bool:
        """Whether any row is still in memory: queued, held, or audit rows not yet written or spilled."""
        return bool(self._intake.queued or self._audit_lane or self._audit_held)

    def _note_failure(self, exc: Exception) -> None:
        self._failed_flushes += 1
        self._outage_failures += 1
        self._last_error = _describe(exc)
        if self._outage_started is None:
            # Once per outage: the retries that follow are counted, not logged.
            self._outage_started = time.monotonic()
            logger.error(
                "cannot write records (%s); holding %d queued records and retrying",
                self._last_error,
                self._intake.queued,
            )

    def _report_overflow(self) -> None:
        """Log a full queue when it starts refusing rows, and again once it has room.

        Called by the flusher, not by submit(): the request path only counts."""
        refused = self._intake.refused
        if refused != self._refused_seen:
            if self._refused_at_overflow is None:
                self._refused_at_overflow = self._refused_seen
                logger.error("record queue full (%d records): refusing new records", self._max_queue)
            self._refused_seen = refused
        elif self._refused_at_overflow is not None and self._intake.queued < self._intake.limit:
            logger.warning(
                "record queue has room again; %d records were refused while it was full",
                refused - self._refused_at_overflow,
            )
            self._refused_at_overflow = None


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


def _jittered(delay: float) -> float:
    return delay * (0.5 + random.random() / 2)


_bound_rows = auditentry.bound_rows


def _describe(exc: BaseException) -> str:
    """An error as it may be logged: sinks' messages are written for that; any
    other exception is named by type alone, since its message may quote a row."""
    if isinstance(exc, SinkError):
        return str(exc)
    return type(exc).__name__
