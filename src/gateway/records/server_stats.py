"""Calls, errors and latency per upstream server and per tool, kept in process, flushed per window.

The guard (dataplane/guard.py) reports every upstream call it let through:
`observe(tenant_id, server_id, tool, ok, seconds)`, synchronous and O(1), in the
compiled core (`_fast/windows`).
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
import time
import uuid
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway._fast import windows
from gateway.db.tables import server_metrics, server_tools
from gateway.records.sanitize import clean_text
from gateway.records.writer import COLUMNS
from gateway.tasks import cancel_all

_ORDER = COLUMNS["server_metrics"]

log = logging.getLogger("gateway.records")

# Latencies kept per (server, tool) and window for the percentiles (a reservoir beyond: `_fast/windows`).
_SAMPLES = windows.SAMPLES
_TOOL_NAME_LENGTH = server_metrics.c.tool_name.type.length


def _stored_name(tool: str) -> str:
    """`tool` as server_metrics stores it (the writer cleans and cuts it, writer.TEXTS)."""
    return clean_text(tool)[:_TOOL_NAME_LENGTH]


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
        self._calls = windows.CallWindows()
        # The guard's report of each upstream call (request path): the compiled windows' own method, no frame
        # of ours around it. `observe(tenant_id, server_id, tool, ok, seconds)`: one call ended with an
        # answer (`ok`) or a failure, after `seconds`.
        self.observe = self._calls.observe
        # Tool counts not yet in server_tools: (server_id, tool) -> [successes, errors, seconds].
        self._tool_counts: dict[tuple[uuid.UUID, str], list] = {}
        self._task: asyncio.Task | None = None
        self._failing = False
        self.flushed_rows = 0

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
        by_server = self._calls.take()
        started, self._started = self._started, time.time()
        if by_server:
            start = datetime.fromtimestamp(started, timezone.utc)
            seconds = max(1, round(self._started - started))
            now = datetime.now(timezone.utc)
            for server_id, tool, w in ((s, t, w) for s, by_tool in by_server.items() for t, w in by_tool.items()):
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
                # A name the writer would change (cut, a NUL, a secret: writer.TEXTS) is no tool the registry
                # knows, and as a parameter it would fail the whole UPDATE below, flush after flush.
                if tool is not None and _stored_name(tool) == tool:
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
