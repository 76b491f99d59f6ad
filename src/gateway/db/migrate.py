"""Apply and check the Alembic migrations.

`gateway migrate` calls `upgrade`; `gateway serve` calls `check_current` and
refuses to start on a database whose revision is not the code's head. The
Alembic configuration is built here, so no alembic.ini has to sit next to the
installed package.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from gateway.db.engine import create_engine

MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaNotCurrent(Exception):
    """The database is not at the revision this code expects."""


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["gateway_url"] = url
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (synchronous; runs its own loop)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


async def current_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    finally:
        await engine.dispose()


async def check_current(url: str) -> None:
    """Raise SchemaNotCurrent with an actionable message unless the schema is at head."""
    head = head_revision()
    try:
        current = await current_revision(url)
    except (OSError, asyncio.TimeoutError) as exc:
        raise SchemaNotCurrent(f"cannot reach the database {redact_url(url)}: {exc}") from exc
    if current is None:
        raise SchemaNotCurrent(
            f"the database {redact_url(url)} has no gateway schema: run `gateway migrate` first"
        )
    if current != head:
        raise SchemaNotCurrent(
            f"the database {redact_url(url)} is at revision {current} but this gateway needs {head}: "
            "run `gateway migrate`"
        )


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
