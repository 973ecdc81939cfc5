"""One money operation at a time per user within this process.

Concurrent operations on one account conflict inside PostgreSQL under SERIALIZABLE: all but one
fail with a serialization error and are run again, wasting work and, on a hot account, running
out of retries. Queueing them here first means the database mostly sees them one after another;
SERIALIZABLE and its retries stay as the safety net for what this cannot see (other processes,
orders whose user is known only to the database).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class UserLocks:
    """A lock per user id, created on first use and dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, *user_ids: int) -> AsyncIterator[None]:
        # Always in ascending order, so two operations on the same two users cannot deadlock.
        ordered = sorted(set(user_ids))
        entries = [self._entries.setdefault(user_id, _Entry()) for user_id in ordered]
        for entry in entries:
            entry.users += 1
        acquired: list[_Entry] = []
        try:
            for entry in entries:
                await entry.lock.acquire()
                acquired.append(entry)
            yield
        finally:
            for entry in reversed(acquired):
                entry.lock.release()
            for user_id, entry in zip(ordered, entries, strict=True):
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[user_id]
