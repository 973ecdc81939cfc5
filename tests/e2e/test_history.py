"""ListTransactions through a real server: what a user's history holds, its sorts, its keyset
pages, its filters, and the page tokens that are bound to the query they came from."""

from __future__ import annotations

import base64
import hashlib
import string
import uuid
from collections import Counter
from collections.abc import Callable
from decimal import Decimal

import grpc
import pytest
from google.protobuf import timestamp_pb2

from balance.v1 import info_service_pb2 as info_pb
from balance.v1 import transaction_service_pb2 as pb
from balance.v1 import types_pb2
from tests.rpc import fails

DEPOSIT = types_pb2.TRANSACTION_KIND_DEPOSIT
WITHDRAWAL = types_pb2.TRANSACTION_KIND_WITHDRAWAL
TRANSFER = types_pb2.TRANSACTION_KIND_TRANSFER
RESERVE = types_pb2.TRANSACTION_KIND_RESERVE
RELEASE = types_pb2.TRANSACTION_KIND_RELEASE
REVENUE = types_pb2.TRANSACTION_KIND_REVENUE

_BASE64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
# Enough for every listing here; a token that never ends fails the walk instead of hanging it.
_PAGES_MAX = 200
# 2100-01-01T00:00:00Z, after every transaction a test writes.
_FAR_FUTURE_SECONDS = 4_102_444_800


async def _user_with_every_kind(transactions, new_id) -> tuple[int, int]:
    """A user with transactions of every kind (9 in all), and the other user of their transfers."""
    user, other, service = new_id(), new_id(), new_id()
    cancelled, delivered = new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="500.00", source="visa-1"))
    await transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="20.00"))
    await transactions.Deposit(pb.DepositRequest(user_id=other, amount="50.00"))
    await transactions.Transfer(pb.TransferRequest(from_user_id=user, to_user_id=other, amount="30.00", comment="rent"))
    await transactions.Transfer(pb.TransferRequest(from_user_id=other, to_user_id=user, amount="15.00"))
    await transactions.Reserve(pb.ReserveRequest(user_id=user, service_id=service, order_id=cancelled, amount="40.00"))
    await transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=cancelled))
    await transactions.Reserve(pb.ReserveRequest(user_id=user, service_id=service, order_id=delivered, amount="100.00"))
    # A partial revenue writes a REVENUE and a RELEASE of the rest in one database transaction.
    await transactions.RecognizeRevenue(
        pb.RecognizeRevenueRequest(user_id=user, service_id=service, order_id=delivered, amount="70.00")
    )
    return user, other


async def _deposit_at_once(books, user: int, amounts_minor: list[int]) -> None:
    """USD deposits written by the ledger function in one database transaction: one created_at."""
    await books.rows(
        "SELECT r.transaction_id FROM unnest(%s::bigint[]) AS a(amount),"
        " LATERAL balance_deposit(%s, 'USD', a.amount, '', NULL) AS r",
        amounts_minor,
        user,
    )


async def _history_ids(books, user: int) -> set[str]:
    """Ids of every transaction on either side of which the user is, read from the books."""
    rows = await books.rows(
        "SELECT transaction_id::text FROM transactions WHERE from_user_id = %s OR to_user_id = %s",
        user,
        user,
    )
    return {str(row[0]) for row in rows}


async def _walk(info, request: info_pb.ListTransactionsRequest) -> list[list[types_pb2.Transaction]]:
    """Every page of a listing, following next_page_token until it comes back empty."""
    pages: list[list[types_pb2.Transaction]] = []
    token = ""
    for _ in range(_PAGES_MAX):
        page_request = info_pb.ListTransactionsRequest()
        page_request.CopyFrom(request)
        page_request.page_token = token
        response = await info.ListTransactions(page_request)
        pages.append(list(response.transactions))
        token = response.next_page_token
        if not token:
            return pages
    raise AssertionError(f"the listing did not end within {_PAGES_MAX} pages")


def _rows(pages: list[list[types_pb2.Transaction]]) -> list[types_pb2.Transaction]:
    return [transaction for page in pages for transaction in page]


def _ids(transactions: list[types_pb2.Transaction]) -> list[str]:
    return [transaction.transaction_id for transaction in transactions]


def _by_date(transaction: types_pb2.Transaction) -> tuple[int, int, uuid.UUID]:
    moment = transaction.created_at
    return (moment.seconds, moment.nanos, uuid.UUID(transaction.transaction_id))


def _by_amount(transaction: types_pb2.Transaction) -> tuple[Decimal, uuid.UUID]:
    return (Decimal(transaction.amount), uuid.UUID(transaction.transaction_id))


def _moment(transaction: types_pb2.Transaction) -> tuple[int, int]:
    return (transaction.created_at.seconds, transaction.created_at.nanos)


async def test_history_holds_every_transaction_of_the_user_once(transactions, info, new_id, books):
    """Every kind that touched the user's accounts is listed, each transaction exactly once, and nothing else."""
    user, _ = await _user_with_every_kind(transactions, new_id)
    response = await info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user))
    listed = _ids(list(response.transactions))
    assert len(listed) == len(set(listed)) == 9
    assert set(listed) == await _history_ids(books, user)
    assert Counter(t.kind for t in response.transactions) == {
        DEPOSIT: 1,
        WITHDRAWAL: 1,
        TRANSFER: 2,
        RESERVE: 2,
        RELEASE: 2,
        REVENUE: 1,
    }
    assert response.next_page_token == ""


async def test_history_descriptions_are_full_sentences(transactions, info, new_id):
    """Every kind of transaction is described by a sentence: a capital first letter and a final full stop."""
    user, _ = await _user_with_every_kind(transactions, new_id)
    response = await info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user))
    assert {t.kind for t in response.transactions} == {DEPOSIT, WITHDRAWAL, TRANSFER, RESERVE, RELEASE, REVENUE}
    for transaction in response.transactions:
        assert transaction.description[0].isupper(), transaction.description
        assert transaction.description.endswith("."), transaction.description


@pytest.mark.parametrize(
    ("order", "descending"),
    [
        (info_pb.SORT_ORDER_UNSPECIFIED, True),
        (info_pb.SORT_ORDER_DESC, True),
        (info_pb.SORT_ORDER_ASC, False),
    ],
    ids=["default", "desc", "asc"],
)
@pytest.mark.parametrize("sort_by", [info_pb.SORT_FIELD_UNSPECIFIED, info_pb.SORT_FIELD_DATE], ids=["default", "date"])
async def test_date_sort_pages_in_order_with_ties_broken_by_id(
    transactions, info, new_id, books, sort_by, order, descending
):
    """Pages by date (newest first by default) follow one another without skipping or repeating a row, ties by id."""
    user, _ = await _user_with_every_kind(transactions, new_id)
    await _deposit_at_once(books, user, [100] * 7)
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="1.00"))
    pages = await _walk(info, info_pb.ListTransactionsRequest(user_id=user, sort_by=sort_by, order=order, page_size=3))
    rows = _rows(pages)
    assert [len(page) for page in pages] == [3, 3, 3, 3, 3, 2]
    assert len(set(_ids(rows))) == len(rows)
    assert set(_ids(rows)) == await _history_ids(books, user)
    assert _ids(rows) == _ids(sorted(rows, key=_by_date, reverse=descending))
    ties = Counter(_moment(t) for t in rows)
    assert sorted(ties.values(), reverse=True)[:2] == [7, 2]  # the batch, and the revenue with its release


@pytest.mark.parametrize(
    ("order", "descending"),
    [
        (info_pb.SORT_ORDER_UNSPECIFIED, True),
        (info_pb.SORT_ORDER_DESC, True),
        (info_pb.SORT_ORDER_ASC, False),
    ],
    ids=["default", "desc", "asc"],
)
async def test_amount_sort_pages_in_order_with_ties_broken_by_id(transactions, info, new_id, books, order, descending):
    """Pages by amount (largest first by default) skip and repeat no row; equal amounts are ordered by id."""
    user, _ = await _user_with_every_kind(transactions, new_id)
    for _ in range(6):
        await transactions.Deposit(pb.DepositRequest(user_id=user, amount="5.00"))
    await _deposit_at_once(books, user, [500] * 5)
    pages = await _walk(
        info, info_pb.ListTransactionsRequest(user_id=user, sort_by=info_pb.SORT_FIELD_AMOUNT, order=order, page_size=4)
    )
    rows = _rows(pages)
    assert [len(page) for page in pages] == [4, 4, 4, 4, 4]
    assert len(set(_ids(rows))) == len(rows)
    assert set(_ids(rows)) == await _history_ids(books, user)
    assert _ids(rows) == _ids(sorted(rows, key=_by_amount, reverse=descending))
    amounts = Counter(t.amount for t in rows)
    assert (amounts["5.00"], amounts["40.00"], amounts["30.00"]) == (11, 2, 2)


async def test_page_size_zero_means_fifty_and_large_sizes_are_clamped_to_a_thousand(info, new_id, books):
    """page_size 0 returns 50 rows; 1005 and 1001 are served as 1000, without an error."""
    user = new_id()
    await _deposit_at_once(books, user, list(range(1, 1006)))
    default = await info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user, page_size=0))
    assert len(default.transactions) == 50
    assert default.next_page_token != ""
    request = info_pb.ListTransactionsRequest(user_id=user, sort_by=info_pb.SORT_FIELD_AMOUNT, page_size=1005)
    first = await info.ListTransactions(request)
    assert [t.amount for t in first.transactions] == [str(Decimal(cents).scaleb(-2)) for cents in range(1005, 5, -1)]
    assert first.next_page_token != ""
    request.page_size, request.page_token = 1001, first.next_page_token
    rest = await info.ListTransactions(request)
    assert [t.amount for t in rest.transactions] == ["0.05", "0.04", "0.03", "0.02", "0.01"]
    assert rest.next_page_token == ""
    largest = await info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user, page_size=2**31 - 1))
    assert len(largest.transactions) == 1000


@pytest.mark.parametrize("page_size", [-1, -50, -(2**31)])
async def test_negative_page_size_is_invalid(transactions, info, new_id, page_size):
    """A negative page_size is INVALID_ARGUMENT naming page_size."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="1"))
    failure = await fails(info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user, page_size=page_size)))
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_size"])


async def test_kinds_filter_keeps_only_the_given_kinds_across_pages(transactions, info, new_id):
    """One kind or several select exactly those kinds, paged to the end; duplicates in the filter do not matter."""
    user, _ = await _user_with_every_kind(transactions, new_id)
    releases = _rows(await _walk(info, info_pb.ListTransactionsRequest(user_id=user, kinds=[RELEASE], page_size=1)))
    assert sorted(t.amount for t in releases) == ["30.00", "40.00"]
    assert {t.kind for t in releases} == {RELEASE}
    several = _rows(
        await _walk(
            info,
            info_pb.ListTransactionsRequest(
                user_id=user,
                kinds=[TRANSFER, DEPOSIT, REVENUE, DEPOSIT],
                sort_by=info_pb.SORT_FIELD_AMOUNT,
                page_size=2,
            ),
        )
    )
    assert [(t.kind, t.amount) for t in several] == [
        (DEPOSIT, "500.00"),
        (REVENUE, "70.00"),
        (TRANSFER, "30.00"),
        (TRANSFER, "15.00"),
    ]


async def test_kinds_filter_that_matches_nothing_is_an_empty_last_page(transactions, info, new_id):
    """A user with accounts but no transaction of the asked kinds gets an empty page and no token."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="1"))
    response = await info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user, kinds=[REVENUE]))
    assert (list(response.transactions), response.next_page_token) == ([], "")


async def _eight_operations(transactions, new_id) -> tuple[int, list[types_pb2.Transaction]]:
    """A user with deposits and withdrawals at eight distinct, increasing moments."""
    user = new_id()
    written = []
    for kind in (DEPOSIT, DEPOSIT, WITHDRAWAL, DEPOSIT, WITHDRAWAL, DEPOSIT, DEPOSIT, WITHDRAWAL):
        if kind == DEPOSIT:
            response = await transactions.Deposit(pb.DepositRequest(user_id=user, amount="10.00"))
        else:
            response = await transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="1.00"))
        written.append(response.transaction)
    moments = [_moment(t) for t in written]
    assert moments == sorted(set(moments)), "the setup needs distinct, increasing created_at"
    return user, written


async def test_time_range_includes_from_time_and_excludes_to_time_across_pages(transactions, info, new_id):
    """from_time is inclusive and to_time exclusive, alone, together and with a kinds filter, across pages."""
    user, written = await _eight_operations(transactions, new_id)
    start, end = written[2].created_at, written[6].created_at

    async def listed(**filters: object) -> list[str]:
        request = info_pb.ListTransactionsRequest(user_id=user, page_size=2, **filters)
        return _ids(_rows(await _walk(info, request)))

    assert await listed(from_time=start, to_time=end, order=info_pb.SORT_ORDER_ASC) == _ids(written[2:6])
    assert await listed(from_time=start, to_time=end) == _ids(written[2:6][::-1])
    assert await listed(from_time=start) == _ids(written[2:][::-1])
    assert await listed(to_time=end, order=info_pb.SORT_ORDER_ASC) == _ids(written[:6])
    deposits = [t for t in written[2:6] if t.kind == DEPOSIT]
    assert await listed(from_time=start, to_time=end, kinds=[DEPOSIT], order=info_pb.SORT_ORDER_ASC) == _ids(deposits)
    assert await listed(
        from_time=start, to_time=end, sort_by=info_pb.SORT_FIELD_AMOUNT, order=info_pb.SORT_ORDER_ASC
    ) == _ids(sorted(written[2:6], key=_by_amount))


def _one_nanosecond_after(moment: timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=moment.seconds, nanos=moment.nanos + 1)


async def test_to_time_one_nanosecond_after_a_transaction_keeps_it(transactions, info, new_id):
    """A transaction at T is listed under to_time T + 1 ns: it was created before that bound."""
    user, written = await _eight_operations(transactions, new_id)
    request = info_pb.ListTransactionsRequest(
        user_id=user, to_time=_one_nanosecond_after(written[3].created_at), order=info_pb.SORT_ORDER_ASC
    )
    response = await info.ListTransactions(request)
    assert _ids(list(response.transactions)) == _ids(written[:4])


async def test_from_time_one_nanosecond_after_a_transaction_leaves_it_out(transactions, info, new_id):
    """A transaction at T is not listed under from_time T + 1 ns: it was created before that bound."""
    user, written = await _eight_operations(transactions, new_id)
    request = info_pb.ListTransactionsRequest(
        user_id=user, from_time=_one_nanosecond_after(written[3].created_at), order=info_pb.SORT_ORDER_ASC
    )
    response = await info.ListTransactions(request)
    assert _ids(list(response.transactions)) == _ids(written[4:])


def _token_query(user: int) -> info_pb.ListTransactionsRequest:
    return info_pb.ListTransactionsRequest(
        user_id=user,
        sort_by=info_pb.SORT_FIELD_DATE,
        order=info_pb.SORT_ORDER_DESC,
        kinds=[DEPOSIT, WITHDRAWAL],
        from_time=timestamp_pb2.Timestamp(seconds=0),
        to_time=timestamp_pb2.Timestamp(seconds=_FAR_FUTURE_SECONDS),
        page_size=1,
    )


async def _first_token(transactions, info, new_id) -> tuple[int, str]:
    """A user with three transactions, and the token after the first of them in _token_query's listing."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="10"))
    await transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="1"))
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="20"))
    first = await info.ListTransactions(_token_query(user))
    assert first.next_page_token != ""
    return user, first.next_page_token


def _other_user(request: info_pb.ListTransactionsRequest) -> None:
    request.user_id += 1


_CHANGES: dict[str, Callable[[info_pb.ListTransactionsRequest], None]] = {
    "sort_by": lambda request: setattr(request, "sort_by", info_pb.SORT_FIELD_AMOUNT),
    "order": lambda request: setattr(request, "order", info_pb.SORT_ORDER_ASC),
    "one_kind_less": lambda request: request.kinds.remove(WITHDRAWAL),
    "one_kind_more": lambda request: request.kinds.append(TRANSFER),
    "no_kinds": lambda request: request.ClearField("kinds"),
    "from_time": lambda request: setattr(request.from_time, "seconds", 1),
    "no_from_time": lambda request: request.ClearField("from_time"),
    "to_time": lambda request: setattr(request.to_time, "seconds", _FAR_FUTURE_SECONDS + 1),
    "no_to_time": lambda request: request.ClearField("to_time"),
    "user_id": _other_user,
}


async def test_token_continues_its_own_query(transactions, info, new_id):
    """The token given for a query, sent back with that query, yields the next row."""
    user, token = await _first_token(transactions, info, new_id)
    first = await info.ListTransactions(_token_query(user))
    request = _token_query(user)
    request.page_token = token
    second = await info.ListTransactions(request)
    assert len(second.transactions) == 1
    assert second.transactions[0].transaction_id != first.transactions[0].transaction_id


@pytest.mark.parametrize("change", list(_CHANGES))
async def test_token_used_with_another_query_is_invalid(transactions, info, new_id, change):
    """A token sent with another sort, order, kinds, time range or user is INVALID_ARGUMENT naming page_token."""
    user, token = await _first_token(transactions, info, new_id)
    request = _token_query(user)
    _CHANGES[change](request)
    request.page_token = token
    failure = await fails(info.ListTransactions(request))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["page_token"],
    )


def _forged(payload: bytes) -> str:
    """A token built the way the service builds one, around a payload of our choosing."""
    checksum = hashlib.sha256(payload).digest()[:6]
    return base64.urlsafe_b64encode(checksum + payload).decode().rstrip("=")


async def test_malformed_and_truncated_tokens_are_invalid(transactions, info, new_id):
    """Garbage, truncated, extended or overlong tokens are INVALID_ARGUMENT naming page_token."""
    user, token = await _first_token(transactions, info, new_id)
    malformed = [
        "garbage",
        "!!!!",
        "%00",
        "A" * 600,
        token[:-1],
        token[:-4],
        token[: len(token) // 2],
        token[1:],
        token + "A",
        token + "AAAA",
        token + token,
        _forged(b"not json"),
        _forged(b'[1,"0000000000000000",1]'),
        _forged(b'[2,"0000000000000000",1,"00000000000000000000000000000000"]'),
        _forged(b'[1,"0000000000000000","1","00000000000000000000000000000000"]'),
        _forged(b'[1,"0000000000000000",1,"not-a-uuid"]'),
    ]
    for bad in malformed:
        request = _token_query(user)
        request.page_token = bad
        failure = await fails(info.ListTransactions(request))
        assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"]), bad


async def test_token_with_any_meaningful_character_changed_is_invalid(transactions, info, new_id):
    """Changing any character of a token so that its bytes change is INVALID_ARGUMENT naming page_token."""
    user, token = await _first_token(transactions, info, new_id)
    for position, character in enumerate(token):
        index = _BASE64_ALPHABET.index(character)
        # The last character of an unpadded token carries unused low bits; flip its top bit instead.
        replacement = _BASE64_ALPHABET[index ^ 32 if position == len(token) - 1 else (index + 1) % 64]
        request = _token_query(user)
        request.page_token = token[:position] + replacement + token[position + 1 :]
        failure = await fails(info.ListTransactions(request))
        assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"]), position


async def test_token_with_its_last_character_changed_is_invalid(transactions, info, new_id):
    """A token whose last character is changed is INVALID_ARGUMENT, like any other altered token."""
    user, token = await _first_token(transactions, info, new_id)
    # Date tokens are 107 characters long: the last one carries two unused low bits.
    assert len(token) % 4 == 3
    last = _BASE64_ALPHABET.index(token[-1])
    request = _token_query(user)
    request.page_token = token[:-1] + _BASE64_ALPHABET[last ^ 1]
    failure = await fails(info.ListTransactions(request))
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])


@pytest.mark.parametrize(
    "request_fields",
    [
        {},
        {"sort_by": info_pb.SORT_FIELD_AMOUNT, "order": info_pb.SORT_ORDER_ASC},
        {"kinds": [DEPOSIT], "from_time": timestamp_pb2.Timestamp(seconds=0)},
    ],
    ids=["plain", "sorted", "filtered"],
)
async def test_user_without_accounts_is_not_found(info, new_id, request_fields):
    """Listing the history of a user who never had an account is NOT_FOUND (ACCOUNT_NOT_FOUND)."""
    failure = await fails(info.ListTransactions(info_pb.ListTransactionsRequest(user_id=new_id(), **request_fields)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"sort_by": 3}, "sort_by"),
        ({"sort_by": -1}, "sort_by"),
        ({"order": 3}, "order"),
        ({"order": 99}, "order"),
        ({"kinds": [7]}, "kinds"),
        ({"kinds": [DEPOSIT, 99]}, "kinds"),
        ({"kinds": [-2]}, "kinds"),
    ],
)
async def test_unknown_enum_numbers_are_invalid(transactions, info, new_id, request_fields, field):
    """A sort_by, order or kinds number outside its enum is INVALID_ARGUMENT naming that field."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="1"))
    failure = await fails(info.ListTransactions(info_pb.ListTransactionsRequest(user_id=user, **request_fields)))
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])
