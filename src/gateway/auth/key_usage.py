"""`last_used_at` of API keys, without a database write per request.

The request path calls `note(key_id)`: one set insertion. A background task
takes the set every `interval` seconds and sets `last_used_at` to the time of
that flush for every key in it, in one UPDATE: `WHERE id = ANY($1)` with an
array on PostgreSQL (the same prepared statement every time), `WHERE id IN
(...)` on SQLite (in chunks of 10000, under its bound-parameter limit). So
the recorded time is accurate to the flush interval, and a process writes at
most once per interval however busy it is. Processes flush independently; each
writes the time of its own flush, so the latest write is the latest use seen.

Not a configuration change: `updated_at` and the configuration version are
left alone, and no snapshot reload follows. A flush that fails puts its keys
back for the next one (logged once per outage); `stop()` flushes what is left.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db.tables import enhanced_api_keys, utcnow
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.keys")

# SQLite: one statement binds at most this many ids (its default limit on bound parameters is 32766).
_CHUNK = 10_000
_ID_ARRAY = sa.bindparam("ids", type_=postgresql.ARRAY(sa.Uuid))


class KeyUsage:
    def __init__(self, engine: AsyncEngine, *, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self._used: set[uuid.UUID] = set()
        self._task: asyncio.Task | None = None
        self._failing = False
        self.flushes = 0  # statements that reached the database (for tests and metrics)

    def note(self, key_id: uuid.UUID) -> None:
        """Remember that this key was used (request path: O(1), no I/O)."""
        self._used.add(key_id)

    @property
    def pending(self) -> int:
        return len(self._used)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="key-usage-flush")

    async def stop(self) -> None:
        await cancel_all([self._task])
        self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        """Write `last_used_at` for every key noted since the last flush."""
        if not self._used:
            return
        used, self._used = self._used, set()
        ids = list(used)
        now = utcnow()
        # Not a configuration change: updated_at stays as it was.
        update = sa.update(enhanced_api_keys).values(last_used_at=now, updated_at=enhanced_api_keys.c.updated_at)
        try:
            async with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    await conn.execute(update.where(enhanced_api_keys.c.id == sa.any_(_ID_ARRAY)), {"ids": ids})
                    self.flushes += 1
                else:
                    for at in range(0, len(ids), _CHUNK):
                        await conn.execute(update.where(enhanced_api_keys.c.id.in_(ids[at : at + _CHUNK])))
                        self.flushes += 1
        except Exception as exc:  # noqa: BLE001 - try again at the next flush
            self._used |= used
            if not self._failing:
                log.warning("cannot record when API keys were last used (will retry): %s", exc)
            self._failing = True
            return
        if self._failing:
            log.info("recording when API keys were last used again")
        self._failing = False
