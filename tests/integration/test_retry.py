"""Database.serializable: the one way into a money transaction retries conflicts, within bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import errors as pg_errors

from balance_server import limits
from balance_server.db.database import Database
from balance_server.errors import RetriesExhausted
from balance_server.settings import Settings


@pytest.fixture(scope="module")
async def database(dsn: str) -> AsyncIterator[Database]:
    opened = Database(dsn, Settings(pool_min_size=2, pool_max_size=4, read_pool_max_size=1))
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff of about a millisecond, so that running out of attempts takes no time."""
    monkeypatch.setattr(limits, "RETRY_DELAY_MS_BASE", 1)
    monkeypatch.setattr(limits, "RETRY_DELAY_MS_MAX", 1)


class ConflictingWork:
    """A body that conflicts on its first `conflicts` attempts, then answers from the database."""

    def __init__(self, conflicts: int, error: type[psycopg.Error] = pg_errors.SerializationFailure) -> None:
        self.conflicts = conflicts
        self.error = error
        self.attempts = 0

    async def __call__(self, connection: psycopg.AsyncConnection[object]) -> object:
        self.attempts += 1
        cursor = await connection.execute("SELECT %s::int", (self.attempts,))
        if self.attempts <= self.conflicts:
            raise self.error(f"simulated conflict on attempt {self.attempts}")
        return (await cursor.fetchone())[0]  # type: ignore[index]


@pytest.mark.parametrize("error", [pg_errors.SerializationFailure, pg_errors.DeadlockDetected])
async def test_a_conflicting_body_is_run_again_until_it_commits(database, fast_backoff, error):
    """Serialization failures and deadlocks are retried; the result of the attempt that succeeds is returned."""
    work = ConflictingWork(conflicts=2, error=error)
    assert await database.serializable(work, deadline=None, repeatable=False) == 3
    assert work.attempts == 3


async def test_the_last_allowed_attempt_can_still_succeed(database, fast_backoff):
    """A body that conflicts on every attempt but the RETRY_ATTEMPTS_MAX-th commits on that one."""
    work = ConflictingWork(conflicts=limits.RETRY_ATTEMPTS_MAX - 1)
    assert await database.serializable(work, deadline=None, repeatable=False) == limits.RETRY_ATTEMPTS_MAX


async def test_attempts_are_bounded(database, fast_backoff):
    """A body that always conflicts runs exactly RETRY_ATTEMPTS_MAX times, then RetriesExhausted says so."""
    work = ConflictingWork(conflicts=limits.RETRY_ATTEMPTS_MAX + 100)
    with pytest.raises(RetriesExhausted) as exhausted:
        await database.serializable(work, deadline=None, repeatable=False)
    assert work.attempts == limits.RETRY_ATTEMPTS_MAX
    assert exhausted.value.metadata == {"attempts": str(limits.RETRY_ATTEMPTS_MAX)}
    assert isinstance(exhausted.value.__cause__, pg_errors.SerializationFailure)


async def test_other_errors_are_not_retried(database, fast_backoff):
    """An error other than a serialization failure or deadlock propagates from the first attempt."""
    work = ConflictingWork(conflicts=1, error=pg_errors.CheckViolation)
    with pytest.raises(pg_errors.CheckViolation):
        await database.serializable(work, deadline=None, repeatable=False)
    assert work.attempts == 1


async def test_a_passed_deadline_allows_no_retry(database, fast_backoff):
    """With the deadline already reached, the first conflict is final: one attempt, RetriesExhausted."""
    work = ConflictingWork(conflicts=1)
    with pytest.raises(RetriesExhausted) as exhausted:
        await database.serializable(work, deadline=time.monotonic(), repeatable=False)
    assert work.attempts == 1
    assert exhausted.value.metadata == {"attempts": "1"}


async def test_retrying_stops_before_the_deadline_would_pass(database, monkeypatch):
    """With backoff of 25-50 ms and 200 ms left, retrying gives up before its attempts run out, and
    never sleeps past the deadline (it overshoots by less than the shortest sleep)."""
    monkeypatch.setattr(limits, "RETRY_DELAY_MS_BASE", 50)
    monkeypatch.setattr(limits, "RETRY_DELAY_MS_MAX", 50)
    work = ConflictingWork(conflicts=limits.RETRY_ATTEMPTS_MAX + 100)
    deadline = time.monotonic() + 0.200
    with pytest.raises(RetriesExhausted):
        await database.serializable(work, deadline=deadline, repeatable=False)
    assert time.monotonic() < deadline + 0.025
    assert 2 <= work.attempts < limits.RETRY_ATTEMPTS_MAX


async def test_concurrent_writes_to_one_account_both_commit(database, books, new_id):
    """Two SERIALIZABLE transactions that read, then both credit the same account: the second gets a real
    serialization failure, is run again by Database.serializable, and both credits land exactly once."""
    user = new_id()
    async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as setup:
        await setup.execute("SELECT * FROM balance_deposit(%s, 'USD', 1000, '', NULL)", (user,))
    both_have_read = asyncio.Barrier(2)
    attempts: list[int] = []
    conflicts: list[int] = []

    def credit(amount: int) -> object:
        first = True

        async def work(connection: psycopg.AsyncConnection[object]) -> object:
            nonlocal first
            attempts.append(amount)
            try:
                async with connection.transaction():
                    # The read fixes this transaction's snapshot before either writes.
                    await connection.execute("SELECT balance FROM accounts WHERE user_id = %s", (user,))
                    if first:
                        first = False
                        await asyncio.wait_for(both_have_read.wait(), timeout=10)
                    cursor = await connection.execute(
                        "SELECT error_reason FROM balance_deposit(%s, 'USD', %s, '', NULL)", (user, amount)
                    )
                    return (await cursor.fetchone())[0]  # type: ignore[index]
            except pg_errors.SerializationFailure:
                conflicts.append(amount)
                raise

        return work

    results = await asyncio.wait_for(
        asyncio.gather(
            database.serializable(credit(10), deadline=None, repeatable=False),
            database.serializable(credit(200), deadline=None, repeatable=False),
        ),
        timeout=30,
    )
    assert results == [None, None]
    assert len(conflicts) == 1
    assert sorted(attempts) == sorted([10, 200, *conflicts])
    assert await books.balance(user) == 1000 + 10 + 200
    assert await books.transactions_of(user) == 3
