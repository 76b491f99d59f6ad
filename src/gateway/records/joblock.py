"""One holder at a time, across gateway processes, of a named background job.

The retention job and the alert evaluator each run in one process at a time.
On PostgreSQL the holder takes a session advisory lock
(`pg_try_advisory_lock`) on a connection of its own and keeps that
connection checked out while it holds the lock. Why the database and not a
Redis lease: the jobs' data lives in PostgreSQL, so the lock works wherever
the jobs can (also without Redis); it ends with the holder's session (a
killed process frees it, no lease length to tune); and it needs no renewal
while a long retention run deletes millions of rows. The cost: one idle
connection while held, and it does not work through a PgBouncer in
transaction-pooling mode (session locks need a session).

On SQLite (the embedded, single-process mode) the lock is a set in this
process, so two jobs of one process still exclude each other.

This module must not run the jobs; it only says who may.
"""

from __future__ import annotations

import hashlib
import logging

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger("gateway.records")

# SQLite: (database URL, job name) held in this process.
_HELD_IN_PROCESS: set[tuple[str, str]] = set()


def lock_key(name: str) -> int:
    """The advisory lock key of a job: 64 bits of SHA-256 over its name, as a signed bigint."""
    digest = hashlib.sha256(f"mcp-gateway:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class JobLock:
    """Held by at most one `JobLock` of the same name on the same database at a time."""

    def __init__(self, engine: AsyncEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.key = lock_key(name)
        self._conn: AsyncConnection | None = None  # PostgreSQL: the session holding the lock
        self._held_locally = False

    @property
    def held(self) -> bool:
        return self._conn is not None or self._held_locally

    async def try_acquire(self) -> bool:
        """Hold the lock now (True), or learn that another holder has it (False).

        Called again while held, it checks that the holding session is still
        alive: a session that died took the lock with it, and then this tries
        to take it afresh.
        """
        if self.engine.dialect.name != "postgresql":
            place = (str(self.engine.url), self.name)
            if self._held_locally:
                return True
            if place in _HELD_IN_PROCESS:
                return False
            _HELD_IN_PROCESS.add(place)
            self._held_locally = True
            return True
        if self._conn is not None:
            try:
                await self._conn.execute(sa.text("SELECT 1"))
                await self._conn.commit()
                return True
            except Exception as exc:  # noqa: BLE001 - the session is gone, and the lock with it
                log.warning("the %s job lost its database session (%s); taking the lock again", self.name, exc)
                await self._drop()
        conn = await self.engine.connect()
        try:
            got = (await conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key})).scalar()
            await conn.commit()  # the lock is the session's: no transaction stays open while it is held
        except BaseException:
            await self._discard(conn)  # it may hold the lock already: never back to the pool
            raise
        if not got:
            await conn.close()
            return False
        self._conn = conn
        return True

    async def release(self) -> None:
        """Give the lock back (another process may take it at once)."""
        if self._held_locally:
            _HELD_IN_PROCESS.discard((str(self.engine.url), self.name))
            self._held_locally = False
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            await conn.commit()
            await conn.close()
        except Exception as exc:  # noqa: BLE001 - database away: ending the session ends the lock too
            log.debug("could not unlock the %s job (%s); closing its session instead", self.name, exc)
            await self._discard(conn)
        except BaseException:
            await self._discard(conn)  # a pooled connection must never keep a session lock
            raise

    @staticmethod
    async def _discard(conn: AsyncConnection) -> None:
        """Close the session itself (not back to the pool): its locks end with it."""
        try:
            await conn.invalidate()
            await conn.close()
        except Exception:  # noqa: BLE001 - already broken
            pass

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._discard(conn)
