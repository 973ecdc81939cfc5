"""Connection pools and the one way into a money transaction: `Database.serializable`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from balance_server import limits
from balance_server.db import sql
from balance_server.db.locks import UserLocks
from balance_server.errors import (
    BalanceLimitExceeded,
    DatabaseUnavailable,
    Overloaded,
    ReportsBusy,
    RetriesExhausted,
)
from balance_server.settings import Settings

_log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]
Pool = psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]

# The only errors after which a money operation is run again: the database rolled the whole
# transaction back, so running it again cannot apply anything twice.
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)


async def _configure_writer(connection: psycopg.AsyncConnection[Any]) -> None:
    # Autocommit with SERIALIZABLE as the session's default: a money operation is one function
    # call, so one statement is one serializable transaction and one round trip.
    await connection.set_autocommit(True)
    await connection.execute("SET default_transaction_isolation = 'serializable'")


async def _configure_reader(connection: psycopg.AsyncConnection[Any]) -> None:
    # Each read is one statement, so it sees one consistent snapshot. Reads stay out of
    # SERIALIZABLE so their predicate locks never make a money operation retry.
    await connection.set_autocommit(True)
    await connection.execute("SET default_transaction_read_only = on")


async def _configure_reporter(connection: psycopg.AsyncConnection[Any]) -> None:
    # Reports run in a SERIALIZABLE READ ONLY DEFERRABLE transaction: it waits for a snapshot
    # that is safe, then never fails with a serialization error or needs a retry half-way.
    await connection.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
    await connection.set_read_only(True)
    await connection.set_deferrable(True)


class Database:
    """The service's pools: money operations, reads, and report downloads."""

    def __init__(self, dsn: str, settings: Settings) -> None:
        self.dsn = dsn
        self.user_locks = UserLocks()
        self.writer: Pool = psycopg_pool.AsyncConnectionPool(
            dsn,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            timeout=limits.POOL_WAIT_SECONDS_MAX,
            max_waiting=limits.POOL_WAITERS_MAX,
            configure=_configure_writer,
            open=False,
            name="writer",
        )
        self.reader: Pool = psycopg_pool.AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=settings.read_pool_max_size,
            timeout=limits.POOL_WAIT_SECONDS_MAX,
            max_waiting=limits.POOL_WAITERS_MAX,
            configure=_configure_reader,
            open=False,
            name="reader",
        )
        self.reporter: Pool = psycopg_pool.AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=settings.report_pool_max_size,
            timeout=limits.POOL_WAIT_SECONDS_MAX,
            configure=_configure_reporter,
            open=False,
            name="reporter",
        )

    reachable = True
    """False while the health watcher finds the database down: calls then fail at once with
    UNAVAILABLE instead of waiting for a connection until their deadline."""

    async def ping(self, *, timeout_seconds: float) -> bool:
        """Whether the database answers on a fresh connection (pool connections may be stale)."""
        try:
            async with asyncio.timeout(timeout_seconds):
                connection = await psycopg.AsyncConnection.connect(
                    self.dsn, connect_timeout=max(1, int(timeout_seconds))
                )
                async with connection:
                    await connection.execute(sql.PING)
        except (psycopg.Error, OSError, TimeoutError):
            return False
        return True

    async def renew_connections(self) -> None:
        """Replaces the pools' connections that broke while the database was away."""
        for pool in (self.writer, self.reader, self.reporter):
            await pool.check()

    async def open(self) -> None:
        for pool in (self.writer, self.reader, self.reporter):
            await pool.open(wait=True, timeout=limits.POOL_WAIT_SECONDS_MAX)

    async def close(self) -> None:
        for pool in (self.reporter, self.reader, self.writer):
            await pool.close()

    async def serializable(self, work: Work[T], *, deadline: float | None, repeatable: bool = False) -> T:
        """Runs `work` (one serializable transaction) again after serialization failures and
        deadlocks, with capped, jittered exponential backoff, until it commits, the attempts run
        out or `deadline` (a time.monotonic() value) would pass; then RetriesExhausted.

        `repeatable` work (keyed by an idempotency key or an order) is also run again on a fresh
        connection when its connection was lost mid-call: whether or not the lost attempt
        committed, running it again cannot apply it twice."""
        connection_losses = 0
        for attempt in range(1, limits.RETRY_ATTEMPTS_MAX + 1):
            try:
                return await self._run(self.writer, work)
            except _RETRYABLE as conflict:
                delay = _backoff_seconds(attempt)
                if attempt == limits.RETRY_ATTEMPTS_MAX or _passes(deadline, delay):
                    _log.warning("serialization conflicts after %d attempts: %s", attempt, conflict.sqlstate)
                    raise RetriesExhausted(
                        f"the operation conflicted with concurrent ones {attempt} times; nothing was applied",
                        metadata={"attempts": str(attempt)},
                    ) from conflict
            except DatabaseUnavailable as unavailable:
                lost = isinstance(unavailable.__cause__, psycopg.OperationalError)
                connection_losses += 1
                delay = _backoff_seconds(attempt)
                if not (repeatable and lost) or connection_losses > limits.CONNECTION_LOSSES_MAX:
                    raise
                if attempt == limits.RETRY_ATTEMPTS_MAX or _passes(deadline, delay):
                    raise
                _log.warning("connection lost mid-call; running the keyed operation again")
            # Sleeping with the connection back in the pool: others can use it meanwhile.
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    async def read(self, work: Work[T]) -> T:
        return await self._run(self.reader, work)

    async def _run(self, pool: Pool, work: Work[T]) -> T:
        async with self._connection(pool) as connection:
            return await work(connection)

    def report_connection(self) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A connection in a SERIALIZABLE READ ONLY DEFERRABLE transaction, for one report.
        ReportsBusy at once when every report connection is downloading: a download can last
        minutes, so waiting for one to finish would only turn into a timeout."""
        stats = self.reporter.get_stats()
        if stats.get("pool_available", 0) == 0 and stats.get("pool_size", 0) >= self.reporter.max_size:
            raise ReportsBusy(
                f"all {self.reporter.max_size} report connections are busy; retry when a download ends",
                metadata={"report_connections": str(self.reporter.max_size)},
            )
        return self._connection(self.reporter)

    @contextlib.asynccontextmanager
    async def _connection(self, pool: Pool) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if not self.reachable:
            raise DatabaseUnavailable("the database is unavailable; retry later")
        try:
            async with pool.connection() as connection:
                yield connection
        except _RETRYABLE:
            raise
        except psycopg_pool.TooManyRequests as crowded:
            raise Overloaded("too many calls are waiting for a database connection; retry shortly") from crowded
        except pg_errors.NumericValueOutOfRange as overflow:
            raise BalanceLimitExceeded(
                "the operation would take a balance beyond what the ledger can hold"
            ) from overflow
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as unreachable:
            _log.warning("database unavailable: %s", type(unreachable).__name__)
            raise DatabaseUnavailable("the database is unavailable; retry later") from unreachable


def _passes(deadline: float | None, delay: float) -> bool:
    return deadline is not None and time.monotonic() + delay >= deadline


def _backoff_seconds(attempt: int) -> float:
    """Full jitter: a random delay up to an exponentially growing, capped ceiling."""
    ceiling_ms = min(limits.RETRY_DELAY_MS_MAX, limits.RETRY_DELAY_MS_BASE * 2**attempt)
    return random.uniform(ceiling_ms / 2, ceiling_ms) / 1000
