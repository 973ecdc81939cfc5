"""GetRevenueReport and ExportTransactions through a real server: the exact CSV, month and time-zone
edges, file metadata, validation, chunking, and cancellation that gives the report connection back."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from grpc import aio

from balance.v1 import report_service_pb2 as pb
from balance.v1 import transaction_service_pb2 as tx_pb
from balance.v1 import types_pb2
from balance_server import limits
from balance_server.db import sql
from tests.rpc import fails

REVENUE_HEADER = "service_id;service_name;revenue;currency\n"
STATEMENT_HEADER = (
    "transaction_id;created_at;kind;amount;currency;description;order_id;service_id;counterparty_user_id\n"
)
EVERY_KIND = ["deposit", "withdrawal", "transfer", "reserve", "release", "revenue"]
# How long a cancelled or expired download may keep its report connection and its query.
_STOP_SECONDS_MAX = 5.0
# Bulk statements: rows of about 550 bytes, so these are about 1.6 MB and 11 MB of CSV.
_MANY_CHUNKS_ROWS = 3_000
_LONG_DOWNLOAD_ROWS = 20_000


@dataclass
class Download:
    """A whole file as a client receives it."""

    chunks: list[bytes]
    initial_metadata: dict[str, str]
    trailing_metadata: dict[str, str]

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")

    @property
    def rows(self) -> list[list[str]]:
        """The CSV's lines after the header, parsed as RFC 4180 says."""
        return list(csv.reader(io.StringIO(self.text, newline=""), delimiter=";"))[1:]


async def _download(call) -> Download:
    chunks = await _read_all(call)
    initial = dict(tuple(await call.initial_metadata()))
    trailing = dict(tuple(await call.trailing_metadata()))
    return Download(chunks, initial, trailing)


async def _read_all(call) -> list[bytes]:
    """The chunks of a streaming call from where it is to its end. With read(), not iteration,
    so that it can finish a call whose first chunks were read one by one."""
    chunks = []
    while (chunk := await call.read()) is not aio.EOF:
        chunks.append(chunk.data)
    return chunks


async def _revenue_report(reports, **request) -> Download:
    return await _download(reports.GetRevenueReport(pb.RevenueReportRequest(**request)))


async def _statement(reports, **request) -> Download:
    return await _download(reports.ExportTransactions(pb.ExportTransactionsRequest(**request)))


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message


@dataclass(frozen=True)
class _Entry:
    """A transaction of a service written straight into the books, at a chosen time."""

    service_id: int
    amount_minor: int
    currency: str
    created_at: datetime
    kind: str = "revenue"


async def _name_services(books, names: dict[int, str]) -> None:
    for service_id, name in names.items():
        await books.connection.execute(
            "INSERT INTO services (service_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", (service_id, name)
        )


async def _record(books, new_id: Callable[[], int], *written: _Entry) -> None:
    """Writes transactions with chosen created_at, each balanced by a world -> revenue pair of
    entries in one INSERT, so the books stay balanced and no user's balance moves."""
    async with books.connection.transaction():
        for entry in written:
            transaction_id, user = uuid.uuid4(), new_id()
            await books.connection.execute(
                "INSERT INTO transactions (transaction_id, kind, amount, currency, created_at, description,"
                " from_user_id, to_user_id, order_id, service_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    transaction_id,
                    entry.kind,
                    entry.amount_minor,
                    entry.currency,
                    entry.created_at,
                    "Written by the report tests.",
                    user,
                    user if entry.kind == "reserve" else None,
                    new_id(),
                    entry.service_id,
                ),
            )
            await books.connection.execute(
                "INSERT INTO entries (transaction_id, account_id, amount) VALUES"
                " (%(id)s, system_account(%(currency)s, 'world'), -%(amount)s),"
                " (%(id)s, system_account(%(currency)s, 'revenue'), %(amount)s)",
                {"id": transaction_id, "currency": entry.currency, "amount": entry.amount_minor},
            )


async def _user_with_deposits(books, user: int, count: int) -> None:
    """A user whose only transactions are `count` deposits of 1.00 USD, a second apart in 2006,
    each with a long description full of what CSV must quote; written set-based, balances exact."""
    parameters = {"user": user, "count": count, "total": count * 100}
    async with books.connection.transaction():
        await books.connection.execute(
            "INSERT INTO accounts (user_id, currency, kind, balance)"
            " VALUES (%(user)s, 'USD', 'regular', %(total)s), (%(user)s, 'USD', 'reserve', 0)",
            parameters,
        )
        await books.connection.execute(
            "INSERT INTO transactions (transaction_id, kind, amount, currency, created_at, description, to_user_id)"
            " SELECT md5(%(user)s || ':' || n)::uuid, 'deposit', 100, 'USD',"
            "        '2006-01-01T00:00:00Z'::timestamptz + n * interval '1 second',"
            "        'Deposit ' || n || '; \"bulk\" line' || chr(10) || repeat('payment reference ', 24), %(user)s"
            " FROM generate_series(1, %(count)s) AS n",
            parameters,
        )
        await books.connection.execute(
            "INSERT INTO entries (transaction_id, account_id, amount, balance_after)"
            " SELECT md5(%(user)s || ':' || n)::uuid, side.account_id, side.amount, side.balance_after"
            " FROM generate_series(1, %(count)s) AS n,"
            "      (SELECT account_id FROM accounts WHERE user_id = %(user)s AND kind = 'regular') AS regular,"
            "      LATERAL (VALUES (system_account('USD', 'world'), -100, NULL::bigint),"
            "                      (regular.account_id, 100, n * 100)) AS side (account_id, amount, balance_after)",
            parameters,
        )


async def _report_work_stopped_within(running, books, seconds: float) -> float:
    """Seconds until every report connection is idle in its pool, nobody waits for one, and no
    backend still runs (or holds a transaction open after) a report's COPY; inf past `seconds`."""
    started = time.monotonic()
    while True:
        stats = running.database.reporter.get_stats()
        idle = stats["pool_available"] == stats["pool_size"] and stats.get("requests_waiting", 0) == 0
        if idle and await _reports_running_in_database(books) == 0:
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            return float("inf")
        await asyncio.sleep(0.01)


async def _reports_running_in_database(books) -> int:
    return int(
        await books.value(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND position('TO STDOUT' IN query) > 0 AND state <> 'idle'"
        )
    )


def _holds_a_report_connection(running) -> bool:
    stats = running.database.reporter.get_stats()
    return stats["pool_available"] < stats["pool_size"]


# Revenue report.


async def test_revenue_report_is_the_exact_csv_of_the_month(reports, books, new_id):
    """One line per service and currency, ordered by service id then currency, amounts exact in each
    currency's digits, names quoted per RFC 4180; only REVENUE inside [first, next first) counts."""
    alpha, deli, lines, cafe = new_id(), new_id(), new_id(), new_id()
    await _name_services(
        books, {alpha: "Alpha", deli: 'Deli; "very" good', lines: "Line one\nLine two", cafe: "Ünïcode café ☕"}
    )
    await _record(
        books,
        new_id,
        _Entry(lines, 700, "EUR", _at("2007-03-07T10:00:00Z")),
        _Entry(alpha, 23_450, "USD", _at("2007-03-31T23:59:59.999999Z")),
        _Entry(cafe, 999_999_999_999_999, "USD", _at("2007-03-20T08:00:00Z")),
        _Entry(alpha, 5_000, "JPY", _at("2007-03-15T12:00:00Z")),
        _Entry(deli, 1, "USD", _at("2007-03-05T00:00:00Z")),
        _Entry(alpha, 100_000, "USD", _at("2007-03-01T00:00:00Z")),
        _Entry(lines, 1_234, "KWD", _at("2007-03-06T00:00:00Z")),
        # Outside the month by one microsecond on either side, and not revenue.
        _Entry(alpha, 7_777, "USD", _at("2007-02-28T23:59:59.999999Z")),
        _Entry(alpha, 8_888, "USD", _at("2007-04-01T00:00:00Z")),
        _Entry(alpha, 5_555, "USD", _at("2007-03-10T00:00:00Z"), kind="reserve"),
        *[_Entry(cafe, 999_999_999_999_999, "USD", _at("2007-03-21T08:00:00Z"))] * 9,
    )
    report = await _revenue_report(reports, year=2007, month=3)
    assert report.text == (
        REVENUE_HEADER + f"{alpha};Alpha;5000;JPY\n"
        f"{alpha};Alpha;1234.50;USD\n"
        f'{deli};"Deli; ""very"" good";0.01;USD\n'
        f'{lines};"Line one\nLine two";7.00;EUR\n'
        f'{lines};"Line one\nLine two";1.234;KWD\n'
        f"{cafe};Ünïcode café ☕;99999999999999.90;USD\n"
    )
    assert report.trailing_metadata["x-row-count"] == "6"


async def test_revenue_of_the_current_month_written_through_grpc(transactions, reports, new_id):
    """Full and partial RecognizeRevenue both count, with their service's name, in the month they happen."""
    user, service, whole, part = new_id(), new_id(), new_id(), new_id()
    await transactions.Deposit(tx_pb.DepositRequest(user_id=user, amount="100.00"))
    for order, amount in ((whole, "30.00"), (part, "20.00")):
        await transactions.Reserve(
            tx_pb.ReserveRequest(user_id=user, service_id=service, order_id=order, amount=amount, service_name="Gamma")
        )
    await transactions.RecognizeRevenue(tx_pb.RecognizeRevenueRequest(user_id=user, service_id=service, order_id=whole))
    recognized = await transactions.RecognizeRevenue(
        tx_pb.RecognizeRevenueRequest(user_id=user, service_id=service, order_id=part, amount="12.50")
    )
    month = recognized.transaction.created_at.ToDatetime(tzinfo=UTC)
    report = await _revenue_report(reports, year=month.year, month=month.month)
    assert [row for row in report.rows if row[0] == str(service)] == [[str(service), "Gamma", "42.50", "USD"]]


async def test_empty_month_is_the_header_alone(reports):
    """A month without revenue is the header line alone, with x-row-count 0 and its checksum."""
    report = await _revenue_report(reports, year=2009, month=8)
    assert report.text == REVENUE_HEADER
    assert report.initial_metadata["content-disposition"] == "attachment; filename=revenue_2009-08.csv"
    assert report.trailing_metadata["x-row-count"] == "0"
    assert report.trailing_metadata["x-sha256"] == hashlib.sha256(REVENUE_HEADER.encode()).hexdigest()


async def test_month_boundaries_follow_the_time_zone(reports, books, new_id):
    """Month edges are midnights in the asked time zone (UTC by default), DST included."""
    service, spring = new_id(), new_id()
    await _record(
        books,
        new_id,
        _Entry(service, 100, "USD", _at("2022-11-30T23:59:59Z")),
        _Entry(service, 200, "USD", _at("2022-10-31T21:00:00Z")),
        _Entry(service, 400, "USD", _at("2022-10-31T20:59:59.999999Z")),
        # New York: EST (-05:00) on 1 March 2010, EDT (-04:00) on 1 April 2010.
        _Entry(spring, 100, "USD", _at("2010-03-01T04:59:59Z")),
        _Entry(spring, 200, "USD", _at("2010-03-01T05:00:00Z")),
        _Entry(spring, 400, "USD", _at("2010-04-01T03:59:59Z")),
        _Entry(spring, 800, "USD", _at("2010-04-01T04:00:00Z")),
    )
    expected = {
        (service, 2022, 10, ""): "6.00",
        (service, 2022, 11, ""): "1.00",
        (service, 2022, 11, "UTC"): "1.00",
        (service, 2022, 10, "Europe/Moscow"): "4.00",
        (service, 2022, 11, "Europe/Moscow"): "2.00",
        (service, 2022, 12, "Europe/Moscow"): "1.00",
        (spring, 2010, 2, "America/New_York"): "1.00",
        (spring, 2010, 3, "America/New_York"): "6.00",
        (spring, 2010, 4, "America/New_York"): "8.00",
        (spring, 2010, 3, ""): "3.00",
    }
    found = {}
    for service_id, year, month, time_zone in expected:
        report = await _revenue_report(reports, year=year, month=month, time_zone=time_zone)
        [found[service_id, year, month, time_zone]] = [row[2] for row in report.rows if row[0] == str(service_id)]
    assert found == expected


async def test_currency_filter_selects_one_currency(reports, books, new_id):
    """A currency selects its lines only (any letter case); empty selects every currency."""
    echo, foxtrot = new_id(), new_id()
    await _name_services(books, {echo: "Echo", foxtrot: "Foxtrot"})
    await _record(
        books,
        new_id,
        _Entry(echo, 100, "USD", _at("2008-06-10T00:00:00Z")),
        _Entry(echo, 300, "JPY", _at("2008-06-11T00:00:00Z")),
        _Entry(foxtrot, 5, "JPY", _at("2008-06-12T00:00:00Z")),
    )
    yen = f"{echo};Echo;300;JPY\n{foxtrot};Foxtrot;5;JPY\n"
    assert (await _revenue_report(reports, year=2008, month=6, currency="JPY")).text == REVENUE_HEADER + yen
    assert (await _revenue_report(reports, year=2008, month=6, currency="jpy")).text == REVENUE_HEADER + yen
    assert (await _revenue_report(reports, year=2008, month=6, currency="EUR")).text == REVENUE_HEADER
    everything = await _revenue_report(reports, year=2008, month=6)
    assert everything.text == REVENUE_HEADER + f"{echo};Echo;300;JPY\n{echo};Echo;1.00;USD\n{foxtrot};Foxtrot;5;JPY\n"


async def test_revenue_report_metadata_names_the_file_and_checks_it(reports, books, new_id):
    """content-disposition names revenue_YYYY-MM.csv; x-row-count and x-sha256 describe the whole file."""
    first, second = new_id(), new_id()
    await _record(
        books,
        new_id,
        _Entry(first, 100, "USD", _at("2008-07-01T00:00:00Z")),
        _Entry(second, 100, "USD", _at("2008-07-02T00:00:00Z")),
    )
    report = await _revenue_report(reports, year=2008, month=7, time_zone="Europe/Moscow")
    assert report.initial_metadata["content-disposition"] == "attachment; filename=revenue_2008-07.csv"
    assert report.trailing_metadata["x-row-count"] == "2"
    assert report.trailing_metadata["x-sha256"] == hashlib.sha256(report.data).hexdigest()
    assert report.text.count("\n") == 3


def _next_year() -> int:
    return datetime.now(UTC).year + 1


@pytest.mark.parametrize(
    ("request_fields", "fields", "reason"),
    [
        ({"year": 2022, "month": 0}, ["month"], "INVALID_ARGUMENT"),
        ({"year": 2022, "month": 13}, ["month"], "INVALID_ARGUMENT"),
        ({"year": 2022, "month": -1}, ["month"], "INVALID_ARGUMENT"),
        ({"year": 1999, "month": 12}, ["year"], "INVALID_ARGUMENT"),
        ({"year": "next + 1", "month": 1}, ["year"], "INVALID_ARGUMENT"),
        ({"year": 2022, "month": 11, "time_zone": "Mars/Olympus"}, ["time_zone"], "INVALID_ARGUMENT"),
        ({"year": 2022, "month": 11, "time_zone": "../../etc/passwd"}, ["time_zone"], "INVALID_ARGUMENT"),
        ({"year": 2022, "month": 11, "time_zone": "Europe/" + "x" * 100}, ["time_zone"], "INVALID_ARGUMENT"),
        ({"year": 2022, "month": 11, "currency": "XXX"}, ["currency"], "UNKNOWN_CURRENCY"),
        (
            {"year": 1999, "month": 13, "currency": "US", "time_zone": "Mars/Olympus"},
            ["currency", "month", "time_zone", "year"],
            None,  # Several violations: the reason is the first one's.
        ),
    ],
)
async def test_invalid_revenue_report_requests(reports, request_fields, fields, reason):
    """A month outside 1..12, a year before 2000 or after next year, an unknown time zone or currency
    is INVALID_ARGUMENT whose BadRequest names every bad field."""
    if request_fields["year"] == "next + 1":
        request_fields = {**request_fields, "year": _next_year() + 1}
    failure = await fails(_read_all(reports.GetRevenueReport(pb.RevenueReportRequest(**request_fields))))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(failure.fields) == fields
    if reason is not None:
        assert failure.reason == reason


async def test_first_and_last_allowed_months_are_accepted(reports):
    """January 2000 and December of next year are within the allowed range."""
    for year, month in ((limits.REPORT_YEAR_MIN, 1), (_next_year(), 12)):
        report = await _revenue_report(reports, year=year, month=month, time_zone="Pacific/Kiritimati")
        assert report.text.startswith(REVENUE_HEADER)


# Statement.


async def _history(transactions, new_id) -> tuple[int, int, int, int, list[types_pb2.Transaction]]:
    """A user with a deposit, a transfer out and one in, a reserve, its revenue and a withdrawal,
    in that order; returns the user, the other user, the service, the order and the transactions."""
    user, other, service, order = new_id(), new_id(), new_id(), new_id()
    written = [(await transactions.Deposit(tx_pb.DepositRequest(user_id=user, amount="100.00", source="visa")))]
    await transactions.Deposit(tx_pb.DepositRequest(user_id=other, amount="50.00"))
    written.append(
        await transactions.Transfer(
            tx_pb.TransferRequest(from_user_id=user, to_user_id=other, amount="10.00", comment='rent; "May"\nflat 2')
        )
    )
    written.append(
        await transactions.Transfer(tx_pb.TransferRequest(from_user_id=other, to_user_id=user, amount="5.00"))
    )
    written.append(
        await transactions.Reserve(
            tx_pb.ReserveRequest(user_id=user, service_id=service, order_id=order, amount="20.00")
        )
    )
    written.append(
        await transactions.RecognizeRevenue(
            tx_pb.RecognizeRevenueRequest(user_id=user, service_id=service, order_id=order)
        )
    )
    written.append(await transactions.Withdraw(tx_pb.WithdrawRequest(user_id=user, amount="1.00")))
    return user, other, service, order, [response.transaction for response in written]


def _line(
    transaction: types_pb2.Transaction,
    kind: str,
    amount: str,
    *,
    order: int | None = None,
    service: int | None = None,
    counterparty: int | None = None,
) -> list[str]:
    """The statement line a transaction should become, its fields as a CSV reader gives them."""
    created_at = transaction.created_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    optional = [str(value) if value is not None else "" for value in (order, service, counterparty)]
    return [transaction.transaction_id, created_at, kind, amount, "USD", transaction.description, *optional]


async def test_statement_lists_every_transaction_oldest_first(transactions, reports, new_id):
    """Each transaction of the user is one line, oldest first, with the counterparty of transfers
    both ways and the order and service of order transactions; the file is named after the user."""
    user, other, service, order, written = await _history(transactions, new_id)
    deposit, sent, received, reserve, revenue, withdrawal = written
    statement = await _statement(reports, user_id=user)
    assert statement.text.startswith(STATEMENT_HEADER)
    assert statement.rows == [
        _line(deposit, "deposit", "100.00"),
        _line(sent, "transfer", "10.00", counterparty=other),
        _line(received, "transfer", "5.00", counterparty=other),
        _line(reserve, "reserve", "20.00", order=order, service=service),
        _line(revenue, "revenue", "20.00", order=order, service=service),
        _line(withdrawal, "withdrawal", "1.00"),
    ]
    quoted = sent.description.replace('"', '""')
    assert f';"{quoted}";' in statement.text
    assert statement.initial_metadata["content-disposition"] == f"attachment; filename=statement_{user}_start_now.csv"
    assert statement.trailing_metadata["x-row-count"] == "6"
    assert statement.trailing_metadata["x-sha256"] == hashlib.sha256(statement.data).hexdigest()


async def test_statement_filters_by_kind_and_time(transactions, reports, new_id):
    """kinds keeps the named kinds; from_time is inclusive and to_time exclusive; the filename shows the dates."""
    user, _, _, _, written = await _history(transactions, new_id)
    deposit, sent, received, reserve, revenue, withdrawal = written
    ids = [transaction.transaction_id for transaction in written]

    transfers = await _statement(reports, user_id=user, kinds=[types_pb2.TRANSACTION_KIND_TRANSFER])
    assert [row[0] for row in transfers.rows] == [sent.transaction_id, received.transaction_id]
    outside = await _statement(
        reports, user_id=user, kinds=[types_pb2.TRANSACTION_KIND_WITHDRAWAL, types_pb2.TRANSACTION_KIND_DEPOSIT]
    )
    assert [row[0] for row in outside.rows] == [deposit.transaction_id, withdrawal.transaction_id]
    assert outside.trailing_metadata["x-row-count"] == "2"

    window = await _statement(reports, user_id=user, from_time=sent.created_at, to_time=revenue.created_at)
    assert [row[0] for row in window.rows] == ids[1:4]
    day = sent.created_at.ToDatetime(tzinfo=UTC).date().isoformat()
    assert window.initial_metadata["content-disposition"] == f"attachment; filename=statement_{user}_{day}_{day}.csv"
    since = await _statement(reports, user_id=user, from_time=reserve.created_at)
    assert [row[0] for row in since.rows] == ids[3:]
    none = await _statement(reports, user_id=user, to_time=deposit.created_at)
    assert (none.text, none.trailing_metadata["x-row-count"]) == (STATEMENT_HEADER, "0")


async def test_statement_of_unknown_user_is_not_found(reports, new_id):
    """A user who never had an account is NOT_FOUND (ACCOUNT_NOT_FOUND), with no file announced."""
    call = reports.ExportTransactions(pb.ExportTransactionsRequest(user_id=new_id()))
    failure = await fails(_read_all(call))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert "content-disposition" not in dict(tuple(await call.initial_metadata()))


async def test_invalid_statement_requests(reports, new_id):
    """A user id below 1 or a time window that ends before it starts is INVALID_ARGUMENT naming the field."""
    moment = datetime(2024, 1, 1, tzinfo=UTC)
    cases = [
        (pb.ExportTransactionsRequest(user_id=0), ["user_id"]),
        (pb.ExportTransactionsRequest(user_id=-5), ["user_id"]),
        (
            pb.ExportTransactionsRequest(user_id=new_id(), from_time=_timestamp(moment), to_time=_timestamp(moment)),
            ["to_time"],
        ),
        (pb.ExportTransactionsRequest(user_id=new_id(), kinds=[99]), ["kinds"]),
    ]
    for request, fields in cases:
        failure = await fails(_read_all(reports.ExportTransactions(request)))
        assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, fields)


# Streaming: chunks, and what a download holds while it runs.


async def test_long_statement_is_chunked_and_byte_identical_to_copy(reports, books, dsn, new_id):
    """A file of many chunks reassembles byte for byte into what the statement's COPY writes, and no
    chunk is over 64 KiB."""
    user = new_id()
    await _user_with_deposits(books, user, _MANY_CHUNKS_ROWS)
    statement = await _statement(reports, user_id=user)

    parameters = {
        "user_id": user,
        "from_time": datetime.min.replace(tzinfo=UTC),
        "to_time": datetime.max.replace(tzinfo=UTC),
        "kinds": EVERY_KIND,
    }
    expected = bytearray()
    async with (
        await psycopg.AsyncConnection.connect(dsn) as connection,
        connection.cursor().copy(sql.STATEMENT, parameters) as copy,
    ):
        async for data in copy:
            expected += data
    assert statement.data == bytes(expected)
    assert len(statement.chunks) > 3
    assert max(len(chunk) for chunk in statement.chunks) <= limits.REPORT_CHUNK_BYTES_MAX
    assert statement.trailing_metadata["x-row-count"] == str(_MANY_CHUNKS_ROWS)
    assert statement.trailing_metadata["x-sha256"] == hashlib.sha256(expected).hexdigest()
    assert len(statement.rows) == _MANY_CHUNKS_ROWS
    assert statement.rows[0][5].startswith('Deposit 1; "bulk" line\npayment reference')


async def test_report_connections_are_serializable_read_only_deferrable(running):
    """A report's connection runs in a SERIALIZABLE READ ONLY DEFERRABLE transaction from its own pool."""
    database = running.database
    assert database.reporter not in (database.writer, database.reader)
    async with database.report_connection() as connection:
        cursor = await connection.execute(
            "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'),"
            " current_setting('transaction_deferrable')"
        )
        assert await cursor.fetchone() == ("serializable", "on", "on")


async def test_download_in_progress_neither_blocks_nor_sees_money_operations(
    transactions, reports, books, running, new_id
):
    """While a download is paused half-way, a deposit to the same user commits at once, and the file
    stays the snapshot it started from."""
    user = new_id()
    await _user_with_deposits(books, user, _LONG_DOWNLOAD_ROWS)
    call = reports.ExportTransactions(pb.ExportTransactionsRequest(user_id=user))
    first = await call.read()
    assert _holds_a_report_connection(running), "the download should still be streaming"
    await asyncio.wait_for(transactions.Deposit(tx_pb.DepositRequest(user_id=user, amount="7.00")), timeout=2)
    rest = await _read_all(call)
    assert b"".join([first.data, *rest]).count(b";deposit;7.00;") == 0
    assert dict(tuple(await call.trailing_metadata()))["x-row-count"] == str(_LONG_DOWNLOAD_ROWS)


async def test_cancelled_download_gives_its_connection_back_at_once(reports, books, running, new_id):
    """Cancelling a download half-way stops its COPY and returns the report connection idle within
    seconds; the pool then serves the next download."""
    user = new_id()
    await _user_with_deposits(books, user, _LONG_DOWNLOAD_ROWS)
    calls_before = running.gate.in_flight
    call = reports.ExportTransactions(pb.ExportTransactionsRequest(user_id=user))
    await call.read()
    assert _holds_a_report_connection(running), "the download should still be streaming"
    call.cancel()
    assert await _report_work_stopped_within(running, books, _STOP_SECONDS_MAX) < _STOP_SECONDS_MAX
    assert running.gate.in_flight == calls_before
    again = await _statement(reports, user_id=user, kinds=[types_pb2.TRANSACTION_KIND_WITHDRAWAL])
    assert again.text == STATEMENT_HEADER


@pytest.mark.parametrize("when", ["before the first chunk", "half-way"])
async def test_expired_deadline_gives_the_connection_back(reports, books, running, new_id, when):
    """A download whose deadline passes ends DEADLINE_EXCEEDED and leaves the report pool idle."""
    user = new_id()
    await _user_with_deposits(books, user, _LONG_DOWNLOAD_ROWS)
    request = pb.ExportTransactionsRequest(user_id=user)
    if when == "before the first chunk":
        call = reports.ExportTransactions(request, timeout=0.001)
    else:
        call = reports.ExportTransactions(request, timeout=0.5)
        await call.read()
        # Not reading: the server blocks on flow control until the deadline passes.
        await asyncio.sleep(1.0)
    failure = await fails(_read_all(call))
    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _report_work_stopped_within(running, books, _STOP_SECONDS_MAX) < _STOP_SECONDS_MAX


async def test_cancelled_download_is_logged_as_cancelled(reports, books, running, new_id, caplog):
    """The call log records a download the client cancelled as CANCELLED, not OK."""
    caplog.set_level(logging.INFO, logger="balance_server.calls")
    user = new_id()
    await _user_with_deposits(books, user, _LONG_DOWNLOAD_ROWS)
    call = reports.ExportTransactions(pb.ExportTransactionsRequest(user_id=user))
    await call.read()
    call.cancel()
    assert await _report_work_stopped_within(running, books, _STOP_SECONDS_MAX) < _STOP_SECONDS_MAX
    logged: list[str] = []
    for _ in range(100):
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ExportTransactions ")]
        if logged:
            break
        await asyncio.sleep(0.01)
    assert [line.split()[1] for line in logged] == ["CANCELLED"]


async def test_downloads_beyond_the_report_connections_are_refused_at_once(reports, books, running, new_id):
    """With every report connection streaming, one more download is RESOURCE_EXHAUSTED (REPORTS_BUSY)
    at once instead of waiting; once one ends, downloads are served again."""
    user = new_id()
    await _user_with_deposits(books, user, _LONG_DOWNLOAD_ROWS)
    size = running.database.reporter.max_size
    streaming = [reports.ExportTransactions(pb.ExportTransactionsRequest(user_id=user)) for _ in range(size)]
    for call in streaming:
        await call.read()
    started = time.monotonic()
    failure = await fails(_statement(reports, user_id=user))
    assert (failure.code, failure.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "REPORTS_BUSY")
    assert time.monotonic() - started < 1
    for call in streaming:
        call.cancel()
    assert await _report_work_stopped_within(running, books, _STOP_SECONDS_MAX) < _STOP_SECONDS_MAX
    again = await _statement(reports, user_id=user, kinds=[types_pb2.TRANSACTION_KIND_WITHDRAWAL])
    assert again.text == STATEMENT_HEADER
