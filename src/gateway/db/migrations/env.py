"""Alembic environment: runs migrations on the configured async engine."""

import asyncio

from alembic import context

from gateway.db.engine import create_engine
from gateway.db.tables import metadata

config = context.config
target_metadata = metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


url = config.attributes.get("gateway_url")
if context.is_offline_mode():  # pragma: no cover - SQL scripts are not a supported path
    raise SystemExit("offline migrations are not supported; run `gateway migrate`")


def _in_thread_if_loop_running() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_main(url))
        return
    # Called from inside a running loop (tests, `gateway demo`): run the
    # migration on its own loop in a worker thread.
    import threading

    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(_main(url))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


_in_thread_if_loop_running()
