"""Database URLs and connections for both back ends.

The configuration names a database the way operators write it
(`sqlite:///gateway.db`, `postgresql://user@host/db`); this module turns that
into a SQLAlchemy async engine (control plane, migrations, SQLite writer) and
an asyncpg pool (the PostgreSQL writer's COPY path).
"""

from __future__ import annotations

import sqlite3

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://"))


def sqlalchemy_url(url: str) -> str:
    """The async-driver form of a configured URL."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+asyncpg://" + url[len(scheme) :]
    return url


def asyncpg_dsn(url: str) -> str:
    """The plain libpq form asyncpg accepts."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def create_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    if is_postgres(url):
        return create_async_engine(sqlalchemy_url(url), pool_size=pool_size, pool_pre_ping=True)
    _bind_none_directly()
    engine = create_async_engine(sqlalchemy_url(url))

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - trivial
        # WAL lets the writer append while the control plane reads; foreign
        # keys are off by default in SQLite and the schema relies on them.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()

    return engine


def _bind_none_directly() -> None:
    """Let the sqlite3 module bind None without its adaptation protocol.

    CPython's sqlite3 (3.11 at least) adapts every parameter that is not an exact
    int, float, str or bytearray, None included: it looks `__adapt__` up on its
    protocol type, whose AttributeError is built and discarded each time (about
    450 ns a None; a request's records bind several: a success's error and
    error code). With an adapter registered for NoneType the lookup ends in the
    adapters' dict. `{}.get` returns None for any key, so the value bound is
    still NULL; a C function, not a Python frame. Process-wide and idempotent,
    as `register_adapter` is; it changes no stored value.
    """
    sqlite3.register_adapter(type(None), _NONE)


_NONE = {}.get  # a C callable of one argument that returns None


async def create_pg_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """The records writer's pool. A connection given back is not reset with asyncpg's default query
    (unlock advisory locks, close cursors, UNLISTEN, RESET ALL: a round trip each time): the writer leaves
    none of that behind. asyncpg still rolls back a transaction left open before `reset` runs."""
    return await asyncpg.create_pool(asyncpg_dsn(url), min_size=min_size, max_size=max_size, reset=_keep_session)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Nothing to undo: the writer's statements hold transaction-scoped locks and temporary tables only."""
