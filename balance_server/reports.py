"""Report downloads: CSV produced by PostgreSQL (COPY ... TO STDOUT) and passed on in chunks while
it streams, so no report is ever held whole in memory."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import LiteralString
from zoneinfo import ZoneInfo

from balance_server import ledger, limits
from balance_server.db import sql
from balance_server.db.database import Database
from balance_server.errors import AccountNotFound
from balance_server.models import TransactionKind


@dataclass
class Download:
    """A CSV file on its way out: its name, and what the trailing metadata reports once it ends."""

    filename: str
    rows: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)


@dataclass(frozen=True)
class RevenueReport:
    year: int
    month: int
    currency: str | None
    """None: every currency."""
    time_zone: ZoneInfo

    @property
    def filename(self) -> str:
        return f"revenue_{self.year:04d}-{self.month:02d}.csv"


@dataclass(frozen=True)
class Statement:
    user_id: int
    from_time: datetime | None
    to_time: datetime | None
    kinds: frozenset[TransactionKind]

    @property
    def filename(self) -> str:
        start = self.from_time.date().isoformat() if self.from_time else "start"
        end = self.to_time.date().isoformat() if self.to_time else "now"
        return f"statement_{self.user_id}_{start}_{end}.csv"


def revenue_report(database: Database, report: RevenueReport, download: Download) -> AsyncIterator[bytes]:
    """The month's revenue per service and currency; the month's edges are midnights in report.time_zone."""
    start = datetime(report.year, report.month, 1, tzinfo=report.time_zone)
    next_year, next_month = divmod(report.year * 12 + report.month, 12)
    end = datetime(next_year, next_month + 1, 1, tzinfo=report.time_zone)
    parameters = {"start": start, "end": end, "currency": report.currency}
    return _copy_csv(database, sql.REVENUE_REPORT, parameters, download)


async def statement(database: Database, query: Statement, download: Download) -> AsyncIterator[bytes]:
    """The user's transactions, oldest first; NOT_FOUND for a user without accounts."""
    if not await ledger.user_has_accounts(database, query.user_id):
        raise AccountNotFound(
            f"user {query.user_id} has no accounts: they are created by the first deposit",
            metadata={"user_id": str(query.user_id)},
        )
    parameters = {
        "user_id": query.user_id,
        "from_time": query.from_time or datetime.min.replace(tzinfo=UTC),
        "to_time": query.to_time or datetime.max.replace(tzinfo=UTC),
        "kinds": sorted(kind.value for kind in query.kinds) or [kind.value for kind in TransactionKind],
    }
    async for chunk in _copy_csv(database, sql.STATEMENT, parameters, download):
        yield chunk


async def _copy_csv(
    database: Database, statement: LiteralString, parameters: Mapping[str, object], download: Download
) -> AsyncIterator[bytes]:
    """Chunks of at most REPORT_CHUNK_BYTES_MAX, each sent on before the next is read: a slow
    reader slows the query instead of filling memory. Leaving early (a cancelled call) ends the
    COPY and gives the connection back."""
    chunk_size = limits.REPORT_CHUNK_BYTES_MAX
    async with database.report_connection() as connection:
        cursor = connection.cursor()
        async with cursor.copy(statement, parameters) as copy:
            pending = bytearray()
            async for data in copy:
                pending += data
                while len(pending) >= chunk_size:
                    chunk = bytes(pending[:chunk_size])
                    del pending[:chunk_size]
                    download.digest.update(chunk)
                    yield chunk
            if pending:
                download.digest.update(pending)
                yield bytes(pending)
        download.rows = max(cursor.rowcount, 0)
