"""Requests that broke a property of test_hostile_input.py, kept as explicit examples.

Each asserts the right behaviour for a request that once got a wrong answer."""

from __future__ import annotations

import base64
import hashlib
import json

import grpc
import pytest

from balance.v1 import info_service_pb2 as info_pb
from balance.v1 import report_service_pb2 as report_pb
from balance.v1 import transaction_service_pb2 as pb
from balance_server import limits
from tests.rpc import Failure, failure_of

_SNAPSHOT = """
    SELECT (SELECT count(*) FROM transactions), (SELECT count(*) FROM entries), (SELECT count(*) FROM orders),
           (SELECT count(*) FROM idempotency_keys), (SELECT coalesce(sum(balance), 0) FROM accounts),
           (SELECT max(updated_at) FROM accounts)
"""


async def _refusal(call) -> Failure:
    """The failure of a unary or server-streaming call that must fail."""
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            response = [item async for item in call]
        else:
            response = await call
    except grpc.aio.AioRpcError as error:
        return failure_of(error)
    raise AssertionError(f"the call succeeded: {response!r}")


def _raw(channel, path: str, raw: bytes, *, streaming: bool):
    if streaming:
        return channel.unary_stream(path, request_serializer=None, response_deserializer=None)(raw)
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)(raw)


_UNPARSEABLE = [
    pytest.param("/balance.v1.TransactionService/Deposit", b"\x00", False, id="Deposit-field-number-0"),
    pytest.param("/balance.v1.TransactionService/Deposit", b"\xff\xff\xff", False, id="Deposit-corrupt-varint"),
    pytest.param("/balance.v1.TransactionService/Transfer", b"\x1a\x02\xff\xfe", False, id="Transfer-bad-utf8"),
    pytest.param("/balance.v1.InfoService/GetBalance", b"\x12\x05USD", False, id="GetBalance-length-past-end"),
    pytest.param("/balance.v1.ReportService/ExportTransactions", b"\x0b", True, id="ExportTransactions-group"),
]


@pytest.mark.parametrize(("path", "raw", "streaming"), _UNPARSEABLE)
async def test_unparseable_request_bytes_change_nothing(channel, books, path, raw, streaming):
    """Bytes that are no request message (hypothesis found b"\\x00") are refused, never INTERNAL, changing nothing."""
    before = await books.rows(_SNAPSHOT)
    failure = await _refusal(_raw(channel, path, raw, streaming=streaming))
    assert failure.code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL)
    assert await books.rows(_SNAPSHOT) == before


@pytest.mark.parametrize(("path", "raw", "streaming"), _UNPARSEABLE)
async def test_unparseable_request_bytes_are_invalid_argument_with_error_info(channel, path, raw, streaming):
    """Bytes that are no request message (UNKNOWN "Unexpected <class ...>") are INVALID_ARGUMENT of balance.v1."""
    failure = await _refusal(_raw(channel, path, raw, streaming=streaming))
    assert (failure.code, failure.domain) == (grpc.StatusCode.INVALID_ARGUMENT, "balance.v1")
    assert "<class" not in failure.message


@pytest.mark.parametrize("time_zone", ["Europe", "America", "Etc"])
async def test_time_zone_naming_a_folder_of_the_time_zone_database_is_invalid_argument(reports, time_zone):
    """A time zone naming a folder of the time zone database (once INTERNAL) is INVALID_ARGUMENT naming time_zone."""
    failure = await _refusal(
        reports.GetRevenueReport(report_pb.RevenueReportRequest(year=2024, month=1, time_zone=time_zone))
    )
    assert (failure.code, failure.domain, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "balance.v1",
        ["time_zone"],
    )


def _forged(content: object) -> str:
    """A page token of the service's format, its checksum matching `content`."""
    payload = json.dumps(content).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(payload).digest()[:6] + payload).decode().rstrip("=")


@pytest.mark.parametrize("transaction", [0, True, [], {}, 1.5])
async def test_forged_page_token_with_a_non_string_transaction_id_is_invalid_page_token(
    transactions, info, new_id, transaction
):
    """A token with a matching checksum and a transaction id that is no string (once INTERNAL) is INVALID_PAGE_TOKEN."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="1"))
    token = _forged([1, "0" * 16, 0, transaction])
    failure = await _refusal(info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user, page_token=token)))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["page_token"],
    )


async def test_a_page_of_history_filled_by_another_user_still_fits_the_message_limit(transactions, info, books, new_id):
    """600 transfers of 500-emoji comments (RESOURCE_EXHAUSTED, no ErrorInfo) keep the receiver's history readable."""
    sender, victim = new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=sender, amount="2000.00"))
    # The ledger function each Transfer calls, 600 times in one statement to keep the test fast.
    await books.rows(
        "SELECT r.transaction_id FROM generate_series(1, 600) AS g(n),"
        " LATERAL balance_transfer(%s, %s, 'USD', g.n, %s, NULL) AS r",
        sender,
        victim,
        "😀" * limits.MEMO_LENGTH_MAX,
    )
    page = await info.ListTransactions(info_pb.ListTransactionsRequest(user_id=victim, page_size=limits.PAGE_SIZE_MAX))
    assert page.ByteSize() <= limits.MESSAGE_BYTES_MAX
    assert len(page.transactions) == 600 or page.next_page_token
