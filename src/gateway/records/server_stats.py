"""Calls, errors and latency per upstream server and per tool, kept in process, flushed per window.

The guard (dataplane/guard.py) reports every upstream call it let through:
`observe(tenant_id, server_id, tool, ok, seconds)`, synchronous and O(1).
Every `window` seconds (60) the flusher turns what the window saw into
`server_metrics` rows through the batched writer, one per server (tool_name
NULL: every call) and one per tool called: request_count, error_count, and
the average, p50, p95 and p99 latency in ms. Percentiles come from at most
`_SAMPLES` latencies per row and window (reservoir sampling beyond that, so
memory stays bounded however busy a server is). The same flush adds the
window's counts to `server_tools.success_count` / `error_count` and folds its
average into `avg_execution_time` (a running mean over all calls), in one
transaction of UPDATEs by (server_id, name); a tool the registry does not
know changes nothing there.

An error is what the guard counts as a failure (transport error, timeout,
5xx): the upstream's health, not the caller's. Each process flushes its own
windows; rows of several processes for the same window add up. A flush that
fails to reach the database keeps its tool counts for the next one (the
metrics rows are the writer's to keep); `stop()` flushes the window in
progress.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db.tables import server_tools
from gateway.records.writer import COLUMNS
from gateway.tasks import cancel_all

_ORDER = COLUMNS["server_metrics"]

log = logging.getLogger("gateway.records")

# Latencies kept per (server, tool) and window for the percentiles.
_SAMPLES = 2048


class _Window:
    """One row's window: counts, the sum of latencies, and a uniform sample of at most `_SAMPLES` of them.

    Past `_SAMPLES` calls the sample is a reservoir kept by Li's "Algorithm L"
    (ACM TOMS 20(4), 1994): instead of drawing a random number for every call,
    it draws how many calls to skip before the next one that replaces a kept
    latency, so that every call is equally likely to be in the sample and a call
    costs a comparison between replacements.
    """

    __slots__ = ("tenant_id", "calls", "errors", "total", "samples", "_next", "_w")

    def __init__(self, tenant_id: uuid.UUID | None) -> None:
        self.tenant_id = tenant_id
        self.calls = 0
        self.errors = 0
        self.total = 0.0  # seconds
        self.samples: list[float] = []
        self._next = 0  # past the first _SAMPLES calls: the number of the next call whose latency is kept
        self._w = 1.0  # Algorithm L's running weight

    def add(self, ok: bool, seconds: float) -> None:
        calls = self.calls = self.calls + 1
        if not ok:
            self.errors += 1
        self.total += seconds
        if calls <= _SAMPLES:
            self.samples.append(seconds)
            if calls == _SAMPLES:
                self._w = math.exp(math.log(_uniform()) / _SAMPLES)
                self._next = calls
                self._skip()
        elif calls == self._next:
            self.samples[min(int(_uniform() * _SAMPLES), _SAMPLES - 1)] = seconds
            self._w *= math.exp(math.log(_uniform()) / _SAMPLES)
            self._skip()

    def _skip(self) -> None:
        """Move `_next` past a geometric number of calls (Algorithm L's step)."""
        w = self._w
        self._next += (math.floor(math.log(_uniform()) / math.log1p(-w)) if w < 1.0 else 0) + 1


def _uniform() -> float:
    """A uniform draw in (0, 1): never 0, whose logarithm Algorithm L takes."""
    return 1.0 - random.random()


def percentile(ordered: list[float], q: float) -> float:
    """The q-th quantile (0..1) of sorted values, by the nearest rank."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class ServerStats:
    def __init__(self, writer, engine: AsyncEngine | None, *, window: float = 60.0, ids=uuid.uuid4) -> None:
        self.writer = writer
        self.engine = engine
        self.window = window
        self._ids = ids
        self._started = time.time()
        self._windows: dict[uuid.UUID, dict[str | None, _Window]] = {}
        # The last server's id object and its windows: most calls go to the server the one before went to,
        # and looking it up by identity skips hashing the UUID (Python code). Reset with `_windows`.
        self._last: tuple[uuid.UUID | None, dict[str | None, _Window] | None] = (None, None)
        # Tool counts not yet in server_tools: (server_id, tool) -> [successes, errors, seconds].
        self._tool_counts: dict[tuple[uuid.UUID, str], list] = {}
        self._task: asyncio.Task | None = None
        self._failing = False
        self.flushed_rows = 0

    def observe(self, tenant_id: uuid.UUID | None, server_id: uuid.UUID, tool: str | None, ok: bool,
                seconds: float) -> None:
        """One upstream call ended with an answer (`ok`) or a failure, after `seconds` (request path)."""
        # Per server: its own window (key None) and one per tool.
        last, windows = self._last
        if server_id is not last or windows is None:
            windows = self._windows.get(server_id)
            if windows is None:
                windows = self._windows[server_id] = {None: _Window(tenant_id)}
            self._last = (server_id, windows)
        windows[None].add(ok, seconds)
        if tool is not None:
            window = windows.get(tool)
            if window is None:
                window = windows[tool] = _Window(tenant_id)
            window.add(ok, seconds)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="server-stats-flush")

    async def stop(self) -> None:
        await cancel_all([self._task])
        self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.window)
            await self.flush()

    async def flush(self) -> None:
        """Close the window: its rows to the writer, its tool counts to server_tools."""
        windows, self._windows, self._last = self._windows, {}, (None, None)
        started, self._started = self._started, time.time()
        if windows:
            start = datetime.fromtimestamp(started, timezone.utc)
            seconds = max(1, round(self._started - started))
            now = datetime.now(timezone.utc)
            for server_id, tool, w in ((s, t, w) for s, by_tool in windows.items() for t, w in by_tool.items()):
                ordered = sorted(w.samples)
                row = {
                    "id": self._ids(), "tenant_id": w.tenant_id, "server_id": server_id, "tool_name": tool,
                    "window_start": start, "window_seconds": seconds, "request_count": w.calls,
                    "error_count": w.errors, "avg_response_ms": w.total / w.calls * 1000.0,
                    "p50_response_ms": percentile(ordered, 0.50) * 1000.0,
                    "p95_response_ms": percentile(ordered, 0.95) * 1000.0,
                    "p99_response_ms": percentile(ordered, 0.99) * 1000.0, "created_at": now,
                }
                self.writer.submit("server_metrics", tuple(row[c] for c in _ORDER))
                self.flushed_rows += 1
                if tool is not None:
                    counts = self._tool_counts.setdefault((server_id, tool), [0, 0, 0.0])
                    counts[0] += w.calls - w.errors
                    counts[1] += w.errors
                    counts[2] += w.total
        await self._flush_tools()

    async def _flush_tools(self) -> None:
        if not self._tool_counts or self.engine is None:
            return
        counts, self._tool_counts = self._tool_counts, {}
        t = server_tools
        calls = t.c.success_count + t.c.error_count
        added = sa.bindparam("ok") + sa.bindparam("failed")
        update = (
            sa.update(t)
            .where(t.c.server_id == sa.bindparam("sid"), t.c.name == sa.bindparam("tool"))
            .values(
                success_count=t.c.success_count + sa.bindparam("ok"),
                error_count=t.c.error_count + sa.bindparam("failed"),
                # A running mean over every call: the old mean weighted by the old count, plus this window's.
                avg_execution_time=(sa.func.coalesce(t.c.avg_execution_time, 0.0) * calls + sa.bindparam("ms_total"))
                / (calls + added),
                updated_at=t.c.updated_at,  # not a configuration change
            )
        )
        rows = [{"sid": s, "tool": tool, "ok": c[0], "failed": c[1], "ms_total": c[2] * 1000.0}
                for (s, tool), c in counts.items()]
        try:
            async with self.engine.begin() as conn:
                await conn.execute(update, rows)
        except Exception as exc:  # noqa: BLE001 - kept for the next flush
            for key, c in counts.items():
                mine = self._tool_counts.setdefault(key, [0, 0, 0.0])
                for i in range(3):
                    mine[i] += c[i]
            if not self._failing:
                log.warning("cannot add tool call counts to server_tools (will retry): %s", exc)
            self._failing = True
            return
        if self._failing:
            log.info("adding tool call counts to server_tools again")
        self._failing = False
