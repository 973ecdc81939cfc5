"""Report downloads at scale, through the real server running in its own process.

Loads a fresh database with one month of revenue (1,000,000 REVENUE transactions over 1,000
services by default) and one user's statement (200,000 transactions), starts
`python -m balance_server serve` on it, downloads each report three times over gRPC, and prints
how long each download took and how much the server's resident memory grew while it streamed.
The figures also go to bench/results/reports.json.

    python bench/reports.py [--revenue-rows N] [--services N] [--statement-rows N] [--dsn DSN]

Without --dsn an embedded PostgreSQL is started in a temporary folder. With --dsn a database of
its own is created on that server and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import grpc
import psycopg

from balance.v1 import report_service_pb2, report_service_pb2_grpc

# The repository root, so that `bench` imports as a package when this file runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balance_server.db import migrations
from balance_server.db.embedded import EmbeddedPostgres
from bench._common import REPOSITORY, progress, rss_kb, running_server

RESULTS_PATH: Final = REPOSITORY / "bench" / "results" / "reports.json"

# Targets of the issue: each download within 3 s, and the server's memory flat while it streams.
REVENUE_SECONDS_TARGET: Final = 3.0
STATEMENT_SECONDS_TARGET: Final = 3.0
RSS_GROWTH_MB_TARGET: Final = 50.0

DOWNLOADS_PER_REPORT: Final = 3
RSS_SAMPLE_INTERVAL_SECONDS: Final = 0.01
DOWNLOAD_SECONDS_MAX: Final = 300.0
LOAD_BATCH_ROWS: Final = 250_000
"""Revenue rows per INSERT: each statement's entries are checked for balance as one set."""

# The loaded data: revenue in May 2024 (UTC), the statement user's deposits through 2023.
REPORT_YEAR: Final = 2024
REPORT_MONTH: Final = 5
MONTH_START: Final = "2024-05-01T00:00:00Z"
MONTH_SECONDS: Final = 31 * 24 * 3600
STATEMENT_USER_ID: Final = 1
REVENUE_USER_ID_FIRST: Final = 1_000_000
REVENUE_USERS: Final = 50_000


@dataclass
class Measurement:
    """Three downloads of one report."""

    name: str
    rows: int = 0
    bytes: int = 0
    chunks: int = 0
    seconds: list[float] = field(default_factory=list)
    baseline_rss_mb: list[float] = field(default_factory=list)
    peak_rss_growth_mb: list[float] = field(default_factory=list)
    seconds_target: float = 0.0

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def met(self) -> bool:
        return self.median_seconds < self.seconds_target and max(self.peak_rss_growth_mb) < RSS_GROWTH_MB_TARGET


# Loading.

INSERT_SERVICES: Final = """
    INSERT INTO services (service_id, name)
    SELECT s, 'Service ' || s || CASE WHEN mod(s, 10) = 0 THEN '; "premium"' ELSE '' END
    FROM generate_series(1, %(services)s::bigint) AS s
"""

INSERT_REVENUE: Final = """
    INSERT INTO transactions (transaction_id, kind, amount, currency, created_at, description,
                              from_user_id, order_id, service_id)
    SELECT md5('revenue:' || n)::uuid, 'revenue', 100 + mod(n, 9900), 'USD',
           %(month_start)s::timestamptz + (n * %(month_seconds)s::bigint / %(rows)s::bigint) * interval '1 second',
           'Revenue for order ' || n || ' (service ' || (1 + mod(n, %(services)s::bigint)) || ').',
           %(user_first)s::bigint + mod(n, %(users)s::bigint), n, 1 + mod(n, %(services)s::bigint)
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
"""

INSERT_REVENUE_ENTRIES: Final = """
    INSERT INTO entries (transaction_id, account_id, amount)
    SELECT md5('revenue:' || n)::uuid, side.account_id, side.amount
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
    CROSS JOIN LATERAL (VALUES (system_account('USD', 'world'), -(100 + mod(n, 9900))),
                               (system_account('USD', 'revenue'), 100 + mod(n, 9900)))
        AS side (account_id, amount)
"""

INSERT_STATEMENT_ACCOUNTS: Final = """
    INSERT INTO accounts (user_id, currency, kind, balance)
    VALUES (%(user)s, 'USD', 'regular', 0), (%(user)s, 'USD', 'reserve', 0)
"""

INSERT_STATEMENT_DEPOSITS: Final = """
    INSERT INTO transactions (transaction_id, kind, amount, currency, created_at, description,
                              to_user_id, memo)
    SELECT md5('statement:' || n)::uuid, 'deposit', 100 + mod(n * 7, 50000), 'USD',
           '2023-01-01T00:00:00Z'::timestamptz + n * interval '2 minutes',
           'Deposit to user ' || %(user)s || ' from payment source ''card-' || mod(n, 97) || '''.',
           %(user)s, 'card-' || mod(n, 97)
    FROM generate_series(1, %(rows)s::bigint) AS n
"""

# Each deposit debits the world and credits the user, whose balance after it is the running sum.
INSERT_STATEMENT_ENTRIES: Final = """
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    SELECT md5('statement:' || d.n)::uuid, side.account_id, side.amount, side.balance_after
    FROM (SELECT n, 100 + mod(n * 7, 50000) AS amount,
                 sum(100 + mod(n * 7, 50000)) OVER (ORDER BY n) AS balance_after
          FROM generate_series(1, %(rows)s::bigint) AS n) AS d,
         (SELECT account_id FROM accounts
          WHERE user_id = %(user)s AND currency = 'USD' AND kind = 'regular') AS regular,
         LATERAL (VALUES (system_account('USD', 'world'), -d.amount, NULL::bigint),
                         (regular.account_id, d.amount, d.balance_after::bigint))
             AS side (account_id, amount, balance_after)
"""

UPDATE_STATEMENT_BALANCE: Final = """
    UPDATE accounts a SET balance = (SELECT sum(e.amount) FROM entries e WHERE e.account_id = a.account_id)
    WHERE a.user_id = %(user)s AND a.currency = 'USD' AND a.kind = 'regular'
"""


def load(dsn: str, *, revenue_rows: int, services: int, statement_rows: int) -> float:
    """Fills the migrated database with set-based SQL; returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SET synchronous_commit = off")
        connection.execute(INSERT_SERVICES, {"services": services})
        for first in range(1, revenue_rows + 1, LOAD_BATCH_ROWS):
            last = min(first + LOAD_BATCH_ROWS - 1, revenue_rows)
            batch = {
                "first": first,
                "last": last,
                "rows": revenue_rows,
                "services": services,
                "users": REVENUE_USERS,
                "user_first": REVENUE_USER_ID_FIRST,
                "month_start": MONTH_START,
                "month_seconds": MONTH_SECONDS,
            }
            with connection.transaction():
                connection.execute(INSERT_REVENUE, batch)
                connection.execute(INSERT_REVENUE_ENTRIES, batch)
            progress(f"revenue rows {last:,} of {revenue_rows:,}")
        statement = {"user": STATEMENT_USER_ID, "rows": statement_rows}
        with connection.transaction():
            connection.execute(INSERT_STATEMENT_ACCOUNTS, statement)
            connection.execute(INSERT_STATEMENT_DEPOSITS, statement)
            connection.execute(INSERT_STATEMENT_ENTRIES, statement)
            connection.execute(UPDATE_STATEMENT_BALANCE, statement)
        progress(f"statement rows {statement_rows:,}")
        connection.execute("ANALYZE")
    return time.perf_counter() - started


# The server's memory.


class RssSampler:
    """Samples a process's resident set size every RSS_SAMPLE_INTERVAL_SECONDS in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current_kb(self) -> int:
        current = rss_kb(self.pid)
        if current == 0:
            raise RuntimeError(f"process {self.pid} is gone")
        return current

    def __enter__(self) -> RssSampler:
        self.peak_kb = self.current_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.current_kb())

    def _run(self) -> None:
        while not self._stopping.wait(RSS_SAMPLE_INTERVAL_SECONDS):
            self.peak_kb = max(self.peak_kb, self.current_kb())


# Downloads.

Download = Callable[[], Any]


def measure(name: str, start_download: Download, pid: int, seconds_target: float) -> Measurement:
    """Downloads a report DOWNLOADS_PER_REPORT times, checking each file against its trailing metadata."""
    measurement = Measurement(name, seconds_target=seconds_target)
    for _ in range(DOWNLOADS_PER_REPORT):
        with RssSampler(pid) as sampler:
            baseline_kb = sampler.peak_kb
            started = time.perf_counter()
            call = start_download()
            digest, size, chunks = hashlib.sha256(), 0, 0
            for chunk in call:
                digest.update(chunk.data)
                size += len(chunk.data)
                chunks += 1
            measurement.seconds.append(time.perf_counter() - started)
        trailing = dict(call.trailing_metadata())
        if trailing["x-sha256"] != digest.hexdigest():
            raise SystemExit(f"{name}: the file does not match its x-sha256")
        measurement.rows, measurement.bytes, measurement.chunks = int(trailing["x-row-count"]), size, chunks
        measurement.baseline_rss_mb.append(baseline_kb / 1024)
        measurement.peak_rss_growth_mb.append((sampler.peak_kb - baseline_kb) / 1024)
        progress(f"{name}: {measurement.seconds[-1]:.3f} s")
    return measurement


def run_downloads(channel: grpc.Channel, pid: int) -> list[Measurement]:
    reports = report_service_pb2_grpc.ReportServiceStub(channel)
    revenue_request = report_service_pb2.RevenueReportRequest(year=REPORT_YEAR, month=REPORT_MONTH)
    statement_request = report_service_pb2.ExportTransactionsRequest(user_id=STATEMENT_USER_ID)
    return [
        measure(
            "revenue report",
            lambda: reports.GetRevenueReport(revenue_request, timeout=DOWNLOAD_SECONDS_MAX),
            pid,
            REVENUE_SECONDS_TARGET,
        ),
        measure(
            "statement",
            lambda: reports.ExportTransactions(statement_request, timeout=DOWNLOAD_SECONDS_MAX),
            pid,
            STATEMENT_SECONDS_TARGET,
        ),
    ]


# Output.


def print_table(measurements: list[Measurement]) -> None:
    header = (
        f"{'download':<16}{'rows':>10}{'bytes':>14}{'chunks':>8}{'median s':>10}{'target s':>10}"
        f"{'baseline RSS MB':>17}{'peak RSS growth MB':>20}  result"
    )
    print(header)
    print("-" * len(header))
    for m in measurements:
        print(
            f"{m.name:<16}{m.rows:>10,}{m.bytes:>14,}{m.chunks:>8,}{m.median_seconds:>10.3f}"
            f"{m.seconds_target:>10.1f}{m.baseline_rss_mb[0]:>17.1f}{max(m.peak_rss_growth_mb):>20.1f}"
            f"  {'met' if m.met else 'MISSED'}"
        )
    print(f"targets: each median under its target seconds; peak RSS growth under {RSS_GROWTH_MB_TARGET:.0f} MB")


def write_results(arguments: argparse.Namespace, load_seconds: float, measurements: list[Measurement]) -> None:
    results = {
        "recorded_at": datetime.now(UTC).isoformat(),
        "parameters": {
            "revenue_rows": arguments.revenue_rows,
            "services": arguments.services,
            "statement_rows": arguments.statement_rows,
            "downloads_per_report": DOWNLOADS_PER_REPORT,
            "external_dsn": arguments.dsn is not None,
        },
        "targets": {
            "revenue_seconds": REVENUE_SECONDS_TARGET,
            "statement_seconds": STATEMENT_SECONDS_TARGET,
            "rss_growth_mb": RSS_GROWTH_MB_TARGET,
        },
        "load_seconds": round(load_seconds, 3),
        "downloads": [{**asdict(m), "median_seconds": m.median_seconds, "met": m.met} for m in measurements],
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {RESULTS_PATH.relative_to(REPOSITORY)}")


# Lifecycle.


@contextlib.contextmanager
def fresh_database(dsn: str | None, scratch: Path) -> Iterator[str]:
    """A new, empty database on the given server or on an embedded one; removed at the end."""
    embedded = None
    if dsn is None:
        embedded = EmbeddedPostgres(scratch / "pgdata")
        dsn = embedded.start()
    name = f"balance_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')  # a generated identifier, not input
        try:
            yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
        finally:
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if embedded is not None:
            embedded.stop()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revenue-rows", type=int, default=1_000_000, help="REVENUE transactions in the month")
    parser.add_argument("--services", type=int, default=1_000, help="services the revenue is spread over")
    parser.add_argument("--statement-rows", type=int, default=200_000, help="transactions of the statement's user")
    parser.add_argument("--dsn", default=None, help="PostgreSQL server to use; unset starts an embedded one")
    arguments = parser.parse_args()
    if min(arguments.revenue_rows, arguments.services, arguments.statement_rows) < 1:
        parser.error("--revenue-rows, --services and --statement-rows must be at least 1")
    return arguments


def main() -> int:
    arguments = parse_arguments()
    with tempfile.TemporaryDirectory(prefix="balance-bench-") as scratch_name:
        scratch = Path(scratch_name)
        with fresh_database(arguments.dsn, scratch) as dsn:
            asyncio.run(migrations.migrate(dsn))
            progress("loading")
            load_seconds = load(
                dsn,
                revenue_rows=arguments.revenue_rows,
                services=arguments.services,
                statement_rows=arguments.statement_rows,
            )
            progress(f"loaded in {load_seconds:.1f} s; starting the server")
            with (
                running_server(dsn, scratch / "server.log") as server,
                grpc.insecure_channel(server.target) as channel,
            ):
                measurements = run_downloads(channel, server.pid)
    print(
        f"\nreports over {arguments.revenue_rows:,} revenue rows ({arguments.services:,} services) and a statement"
        f" of {arguments.statement_rows:,} rows; {DOWNLOADS_PER_REPORT} downloads each; data loaded in"
        f" {load_seconds:.1f} s\n"
    )
    print_table(measurements)
    write_results(arguments, load_seconds, measurements)
    return 0 if all(m.met for m in measurements) else 1


if __name__ == "__main__":
    raise SystemExit(main())
