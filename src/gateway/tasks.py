"""Ending background tasks for certain.

Python 3.11's `asyncio.wait_for` (used by redis-py and by our connection
pools) can swallow a cancellation that races a completion (CPython
gh-86296), so one `cancel()` does not always end a task: ask again until it
has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_all(tasks: Iterable[asyncio.Task | None]) -> None:
    """Cancel `tasks` and wait until each has ended, asking again if one swallowed a cancellation."""
    current = asyncio.current_task()
    pending = [t for t in tasks if t is not None and not t.done() and t is not current]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
        pending = [t for t in pending if not t.done()]
