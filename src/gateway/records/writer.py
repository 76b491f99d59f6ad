"""The batched record writer: request logs, audit entries and metrics reach the database here.

It owns a bounded in-memory queue per record table and one flusher task that
writes the queued rows in batches through a `Sink` (COPY on PostgreSQL,
executemany on SQLite). The request path only calls `submit`, which appends a
tuple and returns: it never awaits, never blocks and never touches the
database. The writer must not lose a row it accepted while the process lives
(a batch the database could not take is held and retried until it can), must
not grow past `max_queue` (new rows are refused and counted instead), and must
never log row contents (they carry user data).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

from gateway.db import tables
from gateway.records.sinks import RowsRejected, Sink, SinkError

logger = logging.getLogger("gateway.records")

COLUMNS: dict[str, tuple[str, ...]] = {
    name: tuple(column.name for column in tables.metadata.tables[name].columns)
    for name in tables.RECORD_TABLES
}
"""For each record table, its column names in schema order: the order of a submitted row's values."""

# Retry delays after a failed write: doubling from the first to the cap, each
# jittered down by up to half so that gateway processes cut off by the same
# outage do not reconnect in lockstep.
RETRY_FIRST_SECONDS = 0.1
RETRY_CAP_SECONDS = 4.0


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of the writer's counters, for /metrics.
    submitted == written + dropped + queued, always."""

    submitted: int  # rows passed to submit(), accepted or not
    written: int  # rows the database confirmed
    # refused (queue full, writer stopped) + rejected by the database + unwritten at stop()'s deadline
    dropped: int
    failed_flushes: int  # batch writes that failed and were (or will be) retried
    queued: int  # rows accepted and not yet written, including a held failed batch
    last_flush_seconds: float | None  # how long the last successful batch took
    last_error: str | None  # the most recent write error or rejection (kept after recovery)


class RecordWriter:
    """Queues record rows on the request path and writes them in batches off it."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_queue: int = 100_000,
        batch_size: int = 2_000,
        flush_interval: float = 0.5,
    ) -> None:
        if max_queue < 1 or batch_size < 1 or flush_interval <= 0:
            raise ValueError("max_queue and batch_size must be positive and flush_interval above zero")
        self._sink = sink
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        # submit() compares the depth with this alone; stop() sets it to 0 so a
        # stopped writer refuses rows without a second test on the hot path.
        self._limit = max_queue

        # One FIFO per table, so a batch needs no grouping and a row needs no
        # wrapper saying where it goes. Each entry carries the table's width.
        self._lanes: dict[str, tuple[deque[tuple], int]] = {
            table: (deque(), len(columns)) for table, columns in COLUMNS.items()
        }
        self._tables = tuple(COLUMNS)
        self._next_table = 0  # batches start at a rotating table: a busy one cannot starve the rest
        # Rows taken from the lanes and not yet written: the batch in flight, or
        # the one that failed and is being retried. Counted in the depth.
        self._held: dict[str, list[tuple]] = {}
        self._queued = 0  # rows in the lanes + rows held

        # No count of submissions: every row submitted is written, dropped or
        # queued, so `stats` adds them up instead of submit() paying for it.
        self._written = 0
        self._refused = 0
        self._rejected = 0
        self._unwritten_at_stop = 0
        self._failed_flushes = 0
        self._settled_by_table = dict.fromkeys(COLUMNS, 0)  # written or rejected, for flush()
        self._last_flush_seconds: float | None = None
        self._last_error: str | None = None

        self._outage_started: float | None = None  # monotonic time of the first failure of an outage
        self._outage_failures = 0
        self._refused_seen = 0  # refusals already reported by the flusher
        self._refused_at_overflow: int | None = None  # refusal count when the queue filled up

        self._wake = asyncio.Event()  # enough rows for a batch, or stop requested
        self._stop_requested = asyncio.Event()
        self._write_lock = asyncio.Lock()  # one batch at a time: flusher, flush() and stop() share it
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------ request path

    def submit(self, table: str, row: tuple) -> bool:
        """Queue one row (values in `COLUMNS[table]` order). False if it was refused
        because the queue is full or the writer is stopped; the refusal is counted."""
        try:
            lane, width = self._lanes[table]
        except KeyError:
            raise ValueError(f"{table!r} is not a record table") from None
        if len(row) != width:
            # COPY would silently ignore extra values; a short row would be dropped
            # far from the bug. Fail where the row is made.
            raise ValueError(f"a {table} row has {width} values, got {len(row)}")
        queued = self._queued
        if queued >= self._limit:
            self._refused += 1
            return False
        lane.append(row)
        self._queued = queued = queued + 1
        if queued == self._batch_size:
            # Only on the crossing: the flusher re-checks the depth after each
            # batch, so a deeper queue needs no further wake-ups (and submit
            # stays a handful of operations).
            self._wake.set()
        return True

    # ------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stats(self) -> WriterStats:
        dropped = self._refused + self._rejected + self._unwritten_at_stop
        return WriterStats(
            submitted=self._written + dropped + self._queued,
            written=self._written,
            dropped=dropped,
            failed_flushes=self._failed_flushes,
            queued=self._queued,
            last_flush_seconds=self._last_flush_seconds,
            last_error=self._last_error,
        )

    async def start(self) -> None:
        """Start the flusher task (rows submitted before this wait for it)."""
        if self.running:
            raise RuntimeError("the record writer is already running")
        self._limit = self._max_queue
        self._stop_requested.clear()
        self._wake.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway.records.writer")

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new rows, write every queued one (retrying through errors), then stop.

        Rows still unwritten `timeout` seconds after the call are counted as
        dropped and logged (as a count). The sink stays open: it is the caller's
        to close.
        """
        self._limit = 0
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
        unwritten = self._queued
        if unwritten:
            for lane, _width in self._lanes.values():
                lane.clear()
            self._held.clear()
            self._queued = 0
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
        # Per-table FIFO: a table's rows queued now are its next settlements up to
        # `goal`. (An empty queue also ends it: stop() may have discarded rows.)
        while self._queued and any(self._settled_by_table[t] < target for t, target in goal.items()):
            await self._flush_batch()

    # ------------------------------------------------------------ flusher

    async def _run(self) -> None:
        retry_delay = RETRY_FIRST_SECONDS
        while not self._stop_requested.is_set():
            # A held batch was just backed off for: retry it without also
            # waiting out the interval.
            if not self._held and self._queued < self._batch_size:
                await _wait(self._wake, self._flush_interval)
                self._wake.clear()
                if self._stop_requested.is_set():
                    break
            try:
                await self._flush_batch()
            except Exception:  # noqa: BLE001 - noted by _flush_batch; the flusher must not die
                await _wait(self._stop_requested, _jittered(retry_delay))
                retry_delay = min(retry_delay * 2, RETRY_CAP_SECONDS)
            else:
                retry_delay = RETRY_FIRST_SECONDS
            self._report_overflow()
        await self._drain()

    async def _drain(self) -> None:
        """Write until nothing is queued, retrying with backoff; stop() bounds it with its deadline."""
        retry_delay = RETRY_FIRST_SECONDS
        while self._queued:
            try:
                await self._flush_batch()
            except Exception:  # noqa: BLE001 - noted by _flush_batch
                await asyncio.sleep(_jittered(retry_delay))
                retry_delay = min(retry_delay * 2, RETRY_CAP_SECONDS)
            else:
                retry_delay = RETRY_FIRST_SECONDS
        self._report_overflow()

    async def _flush_batch(self) -> None:
        """Write one batch: the held one if a write failed, else up to batch_size queued rows."""
        async with self._write_lock:
            try:
                if not self._held:
                    self._take_batch()
                    if not self._held:
                        return
                started = time.perf_counter()
                for table in list(self._held):
                    await self._write_table(table, self._held[table])
                    del self._held[table]
            except Exception as exc:
                self._note_failure(exc)
                raise
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
            self._held[table] = rows
            budget -= len(rows)
            if not budget:
                return

    async def _write_table(self, table: str, rows: list[tuple]) -> None:
        """Write `rows`, dropping only rows the database rejects (found by halving).

        On any other error `rows` is cut down to the rows not yet written, which
        are always a suffix, and the error propagates.
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
                    self._settle(table, 1)
                    self._rejected += 1
                    continue
                self._settle(table, high - low)
                self._written += high - low
        except BaseException:  # also cancellation at stop()'s deadline: keep what is unwritten
            del rows[:low]
            raise
        finally:
            if rejected:
                self._last_error = str(rejection)
                logger.warning("dropped %d %s rows the database rejected: %s", rejected, table, rejection)

    def _settle(self, table: str, count: int) -> None:
        self._queued -= count
        self._settled_by_table[table] += count

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
                self._queued,
            )

    def _report_overflow(self) -> None:
        """Log a full queue when it starts refusing rows, and again once it has room.

        Called by the flusher, not by submit(): the request path only counts."""
        refused = self._refused
        if refused != self._refused_seen:
            if self._refused_at_overflow is None:
                self._refused_at_overflow = self._refused_seen
                logger.error("record queue full (%d records): refusing new records", self._max_queue)
            self._refused_seen = refused
        elif self._refused_at_overflow is not None and self._queued < self._limit:
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


def _describe(exc: BaseException) -> str:
    """An error as it may be logged: sinks' messages are written for that; any
    other exception is named by type alone, since its message may quote a row."""
    if isinstance(exc, SinkError):
        return str(exc)
    return type(exc).__name__
