"""Reserve, ReleaseReserve, RecognizeRevenue and GetOrder through a real server: where the money
goes, what the order says, replays, refusals, and books that balance after each scenario."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from balance.v1 import info_service_pb2 as info_pb
from balance.v1 import transaction_service_pb2 as pb
from balance.v1 import types_pb2
from tests.rpc import fails

_REPLAY = ("x-idempotent-replay", "true")


@dataclass(frozen=True)
class Placed:
    """An order reserved for a user, and the request that reserved it."""

    user: int
    service: int
    order: int
    request: pb.ReserveRequest


async def _place(
    transactions, new_id, *, deposit: str = "100.00", amount: str = "100.00", currency: str = "", service_name: str = ""
) -> Placed:
    """A user who deposited `deposit` and reserved `amount` of it for a new order."""
    user, service, order = new_id(), new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount=deposit, currency=currency))
    request = pb.ReserveRequest(
        user_id=user, service_id=service, order_id=order, amount=amount, currency=currency, service_name=service_name
    )
    await transactions.Reserve(request)
    return Placed(user, service, order, request)


async def _order(info, order_id: int) -> types_pb2.Order:
    return (await info.GetOrder(info_pb.GetOrderRequest(order_id=order_id))).order


def _amounts(order: types_pb2.Order) -> tuple[int, str, str, str]:
    return (order.status, order.reserved_amount, order.captured_amount, order.released_amount)


def _revenue(placed: Placed, amount: str = "") -> pb.RecognizeRevenueRequest:
    return pb.RecognizeRevenueRequest(
        user_id=placed.user, service_id=placed.service, order_id=placed.order, amount=amount
    )


def _fields(request: pb.ReserveRequest) -> dict[str, object]:
    return {descriptor.name: value for descriptor, value in request.ListFields()}


async def test_reserve_moves_money_to_reserve_and_opens_the_order(transactions, info, new_id, books):
    """A reserve moves the amount from regular to reserve, describes itself, and GetOrder shows it RESERVED."""
    user, service, order = new_id(), new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="200000.00"))
    call = transactions.Reserve(
        pb.ReserveRequest(user_id=user, service_id=service, order_id=order, amount="170000.00", service_name="Taxi")
    )
    response = await call
    assert _REPLAY not in tuple(await call.trailing_metadata())
    transaction = response.transaction
    assert (transaction.kind, transaction.amount, transaction.currency) == (
        types_pb2.TRANSACTION_KIND_RESERVE,
        "170000.00",
        "USD",
    )
    assert (transaction.from_user_id, transaction.to_user_id) == (user, user)
    assert (transaction.order_id, transaction.service_id) == (order, service)
    assert transaction.description == f"Reserved 170000.00 USD of user {user} for order {order} (service {service})."
    assert [(a.kind, a.balance) for a in response.accounts] == [
        (types_pb2.ACCOUNT_KIND_REGULAR, "30000.00"),
        (types_pb2.ACCOUNT_KIND_RESERVE, "170000.00"),
    ]
    opened = await _order(info, order)
    assert (opened.order_id, opened.user_id, opened.service_id, opened.currency) == (order, user, service, "USD")
    assert _amounts(opened) == (types_pb2.ORDER_STATUS_RESERVED, "170000.00", "0.00", "0.00")
    assert (await books.balance(user), await books.balance(user, kind="reserve")) == (3_000_000, 17_000_000)
    assert (await books.audit()).clean


async def test_get_order_shows_the_service_name_given_at_reserve(transactions, info, new_id, books):
    """GetOrder shows the service_name sent with the reserve, and an empty one when none was sent."""
    named = await _place(transactions, new_id, service_name="Courier – Express 🚚")
    unnamed = await _place(transactions, new_id)
    assert (await _order(info, named.order)).service_name == "Courier – Express 🚚"
    assert (await _order(info, unnamed.order)).service_name == ""
    assert (await books.audit()).clean


async def test_get_order_of_unknown_order_is_not_found(info, new_id):
    """GetOrder of an order never reserved is NOT_FOUND (ORDER_NOT_FOUND)."""
    failure = await fails(info.GetOrder(info_pb.GetOrderRequest(order_id=new_id())))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")


async def test_reserve_replay_returns_the_original_and_moves_nothing(transactions, new_id, books):
    """The same reserve again, however its amount and currency are written, returns the original and moves nothing."""
    placed = await _place(transactions, new_id, deposit="300.00")
    original = await books.value("SELECT reserve_transaction_id::text FROM orders WHERE order_id = %s", placed.order)
    for again in (placed.request, pb.ReserveRequest(**{**_fields(placed.request), "amount": "100", "currency": "usd"})):
        call = transactions.Reserve(again)
        response = await call
        assert response.transaction.transaction_id == original
        assert _REPLAY in tuple(await call.trailing_metadata())
        assert [a.balance for a in response.accounts] == ["200.00", "100.00"]
    assert (await books.balance(placed.user), await books.balance(placed.user, kind="reserve")) == (20000, 10000)
    assert await books.transactions_of(placed.user) == 2
    assert (await books.audit()).clean


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_id", None),
        ("service_id", None),
        ("amount", "100.01"),
        ("currency", "EUR"),
        ("service_name", "Taxi Plus"),
    ],
)
async def test_reserve_of_an_existing_order_with_other_fields_is_already_exists(
    transactions, info, new_id, books, field, value
):
    """Reserving an existing order id with any field changed is ALREADY_EXISTS (ORDER_ALREADY_EXISTS); nothing moves."""
    placed = await _place(transactions, new_id, deposit="500.00", currency="USD", service_name="Taxi")
    changed = pb.ReserveRequest(**{**_fields(placed.request), field: new_id() if value is None else value})
    failure = await fails(transactions.Reserve(changed))
    assert (failure.code, failure.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ORDER_ALREADY_EXISTS")
    order = await _order(info, placed.order)
    assert (order.user_id, order.service_id, order.service_name, order.currency) == (
        placed.user,
        placed.service,
        "Taxi",
        "USD",
    )
    assert _amounts(order) == (types_pb2.ORDER_STATUS_RESERVED, "100.00", "0.00", "0.00")
    assert (await books.balance(placed.user), await books.balance(placed.user, kind="reserve")) == (40000, 10000)
    assert (await books.audit()).clean


async def test_reserve_above_balance_leaves_no_order_and_can_be_made_once_funded(transactions, info, new_id, books):
    """A reserve above the balance is INSUFFICIENT_FUNDS, leaves no order, and the same order succeeds once funded."""
    user, service, order = new_id(), new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="50.00"))
    request = pb.ReserveRequest(user_id=user, service_id=service, order_id=order, amount="80.00")
    failure = await fails(transactions.Reserve(request))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    missing = await fails(info.GetOrder(info_pb.GetOrderRequest(order_id=order)))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")
    assert (await books.balance(user), await books.balance(user, kind="reserve")) == (5000, 0)
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="50.00"))
    call = transactions.Reserve(request)
    response = await call
    assert _REPLAY not in tuple(await call.trailing_metadata())
    assert [a.balance for a in response.accounts] == ["20.00", "80.00"]
    assert (await _order(info, order)).status == types_pb2.ORDER_STATUS_RESERVED
    assert (await books.audit()).clean


async def test_reserve_without_accounts_in_the_currency_is_not_found(transactions, info, new_id, books):
    """A reserve by a user with no account in its currency is NOT_FOUND (ACCOUNT_NOT_FOUND) and leaves no order."""
    stranger, euro_less = new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=euro_less, amount="100.00", currency="USD"))
    for user, currency in ((stranger, "USD"), (euro_less, "EUR")):
        order = new_id()
        failure = await fails(
            transactions.Reserve(
                pb.ReserveRequest(user_id=user, service_id=new_id(), order_id=order, amount="1.00", currency=currency)
            )
        )
        assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        missing = await fails(info.GetOrder(info_pb.GetOrderRequest(order_id=order)))
        assert missing.reason == "ORDER_NOT_FOUND"
    assert (await books.audit()).clean


async def test_release_returns_the_money_and_marks_the_order_released(transactions, info, new_id, books):
    """A release moves the reserved amount back to regular and GetOrder shows it RELEASED with released_amount."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="40.00")
    call = transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=placed.order))
    response = await call
    assert _REPLAY not in tuple(await call.trailing_metadata())
    transaction = response.transaction
    assert (transaction.kind, transaction.amount) == (types_pb2.TRANSACTION_KIND_RELEASE, "40.00")
    assert (transaction.from_user_id, transaction.to_user_id) == (placed.user, placed.user)
    assert (transaction.order_id, transaction.service_id) == (placed.order, placed.service)
    assert [a.balance for a in response.accounts] == ["100.00", "0.00"]
    assert _amounts(await _order(info, placed.order)) == (types_pb2.ORDER_STATUS_RELEASED, "40.00", "0.00", "40.00")
    assert (await books.balance(placed.user), await books.balance(placed.user, kind="reserve")) == (10000, 0)
    assert (await books.audit()).clean


async def test_release_twice_returns_the_original_release(transactions, new_id, books):
    """A second release of the same order returns the first release's transaction and moves nothing."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="40.00")
    first = await transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=placed.order))
    call = transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=placed.order))
    again = await call
    assert again.transaction == first.transaction
    assert _REPLAY in tuple(await call.trailing_metadata())
    assert [a.balance for a in again.accounts] == ["100.00", "0.00"]
    assert await books.transactions_of(placed.user) == 3
    assert (await books.audit()).clean


async def test_release_and_revenue_of_an_unknown_order_are_not_found(transactions, new_id, books):
    """Releasing or recognizing revenue of an order never reserved is NOT_FOUND (ORDER_NOT_FOUND)."""
    order = new_id()
    for call in (
        transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=order)),
        transactions.RecognizeRevenue(
            pb.RecognizeRevenueRequest(user_id=new_id(), service_id=new_id(), order_id=order)
        ),
    ):
        failure = await fails(call)
        assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")
    assert (await books.audit()).clean


async def test_revenue_without_amount_captures_everything_reserved(transactions, info, new_id, books):
    """Revenue with an empty amount captures the whole reserve: one REVENUE transaction and nothing released."""
    placed = await _place(transactions, new_id, deposit="150.00", amount="100.00")
    response = await transactions.RecognizeRevenue(_revenue(placed))
    transaction = response.transaction
    assert (transaction.kind, transaction.amount) == (types_pb2.TRANSACTION_KIND_REVENUE, "100.00")
    assert (transaction.from_user_id, transaction.to_user_id) == (placed.user, 0)
    assert (transaction.order_id, transaction.service_id) == (placed.order, placed.service)
    assert [a.balance for a in response.accounts] == ["50.00", "0.00"]
    assert _amounts(await _order(info, placed.order)) == (types_pb2.ORDER_STATUS_CAPTURED, "100.00", "100.00", "0.00")
    kinds = await books.rows("SELECT kind FROM transactions WHERE order_id = %s ORDER BY kind", placed.order)
    assert kinds == [("reserve",), ("revenue",)]
    assert (await books.audit()).clean


async def test_partial_revenue_releases_the_rest(transactions, info, new_id, books):
    """Revenue of 70.00 on a 100.00 reserve captures 70.00 and writes a RELEASE of 30.00 back to regular."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="100.00")
    response = await transactions.RecognizeRevenue(_revenue(placed, "70.00"))
    assert (response.transaction.kind, response.transaction.amount) == (types_pb2.TRANSACTION_KIND_REVENUE, "70.00")
    assert [a.balance for a in response.accounts] == ["30.00", "0.00"]
    assert _amounts(await _order(info, placed.order)) == (types_pb2.ORDER_STATUS_CAPTURED, "100.00", "70.00", "30.00")
    history = await info.ListTransactions(
        info_pb.ListTransactionsRequest(user_id=placed.user, kinds=[types_pb2.TRANSACTION_KIND_RELEASE])
    )
    assert [(t.amount, t.order_id, t.from_user_id, t.to_user_id) for t in history.transactions] == [
        ("30.00", placed.order, placed.user, placed.user)
    ]
    assert history.transactions[0].created_at == response.transaction.created_at
    assert (await books.balance(placed.user), await books.balance(placed.user, kind="reserve")) == (3000, 0)
    assert (await books.audit()).clean


@pytest.mark.parametrize(
    ("first", "again"),
    [("70.00", "70.00"), ("70.00", "70"), ("", ""), ("", "100.00")],
    ids=["partial", "partial-written-otherwise", "full", "full-then-explicit"],
)
async def test_revenue_twice_with_the_same_amount_returns_the_original(transactions, new_id, books, first, again):
    """Revenue repeated with the same amount returns the first REVENUE transaction and moves nothing."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="100.00")
    original = await transactions.RecognizeRevenue(_revenue(placed, first))
    written = await books.transactions_of(placed.user)
    call = transactions.RecognizeRevenue(_revenue(placed, again))
    replayed = await call
    assert replayed.transaction == original.transaction
    assert _REPLAY in tuple(await call.trailing_metadata())
    assert [a.balance for a in replayed.accounts] == [a.balance for a in original.accounts]
    assert await books.transactions_of(placed.user) == written
    assert (await books.audit()).clean


@pytest.mark.parametrize("again", ["60.00", "70.01", ""])
async def test_revenue_with_another_amount_after_capture_is_a_state_conflict(transactions, info, new_id, books, again):
    """Revenue with a different amount on a captured order is FAILED_PRECONDITION (ORDER_STATE_CONFLICT)."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="100.00")
    await transactions.RecognizeRevenue(_revenue(placed, "70.00"))
    failure = await fails(transactions.RecognizeRevenue(_revenue(placed, again)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_STATE_CONFLICT")
    assert _amounts(await _order(info, placed.order)) == (types_pb2.ORDER_STATUS_CAPTURED, "100.00", "70.00", "30.00")
    assert (await books.balance(placed.user), await books.balance(placed.user, kind="reserve")) == (3000, 0)
    assert (await books.audit()).clean


@pytest.mark.parametrize("amount", ["", "40.00"])
async def test_revenue_after_release_is_a_state_conflict(transactions, info, new_id, books, amount):
    """Revenue on a released order is FAILED_PRECONDITION (ORDER_STATE_CONFLICT) and the order stays released."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="40.00")
    await transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=placed.order))
    failure = await fails(transactions.RecognizeRevenue(_revenue(placed, amount)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_STATE_CONFLICT")
    assert _amounts(await _order(info, placed.order)) == (types_pb2.ORDER_STATUS_RELEASED, "40.00", "0.00", "40.00")
    assert await books.balance(placed.user) == 10000
    assert (await books.audit()).clean


@pytest.mark.parametrize("captured", ["", "25.00"], ids=["full", "partial"])
async def test_release_after_revenue_is_a_state_conflict(transactions, info, new_id, books, captured):
    """Releasing a captured order is FAILED_PRECONDITION (ORDER_STATE_CONFLICT) and moves nothing."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="40.00")
    await transactions.RecognizeRevenue(_revenue(placed, captured))
    before = _amounts(await _order(info, placed.order))
    regular = await books.balance(placed.user)
    failure = await fails(transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=placed.order)))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_STATE_CONFLICT")
    assert _amounts(await _order(info, placed.order)) == before
    assert before[0] == types_pb2.ORDER_STATUS_CAPTURED
    assert await books.balance(placed.user) == regular
    assert (await books.audit()).clean


async def test_revenue_above_the_reserve_is_refused(transactions, info, new_id, books):
    """Revenue above the reserved amount is FAILED_PRECONDITION (AMOUNT_EXCEEDS_RESERVE); the order stays reserved."""
    placed = await _place(transactions, new_id, deposit="200.00", amount="100.00")
    failure = await fails(transactions.RecognizeRevenue(_revenue(placed, "100.01")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AMOUNT_EXCEEDS_RESERVE")
    assert failure.metadata["reserved"] == "100.00"
    assert _amounts(await _order(info, placed.order)) == (types_pb2.ORDER_STATUS_RESERVED, "100.00", "0.00", "0.00")
    assert (await books.balance(placed.user), await books.balance(placed.user, kind="reserve")) == (10000, 10000)
    assert (await books.audit()).clean


@pytest.mark.parametrize("wrong", ["user_id", "service_id"])
async def test_revenue_for_another_user_or_service_is_a_mismatch(transactions, info, new_id, books, wrong):
    """Revenue naming the order with the wrong user or service is FAILED_PRECONDITION (ORDER_MISMATCH)."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="100.00")
    request = _revenue(placed)
    setattr(request, wrong, new_id())
    failure = await fails(transactions.RecognizeRevenue(request))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_MISMATCH")
    assert _amounts(await _order(info, placed.order)) == (types_pb2.ORDER_STATUS_RESERVED, "100.00", "0.00", "0.00")
    assert (await books.audit()).clean


@pytest.mark.parametrize(
    ("currency", "reserved", "amount"),
    [("USD", "10.00", "1.001"), ("JPY", "500", "1.5"), ("KWD", "10.000", "1.0001")],
)
async def test_revenue_more_precise_than_the_order_currency_is_invalid(
    transactions, info, new_id, books, currency, reserved, amount
):
    """Revenue with more decimals than the order's currency allows is INVALID_ARGUMENT naming amount."""
    placed = await _place(transactions, new_id, deposit=reserved, amount=reserved, currency=currency)
    failure = await fails(transactions.RecognizeRevenue(_revenue(placed, amount)))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_AMOUNT",
        ["amount"],
    )
    assert (await _order(info, placed.order)).status == types_pb2.ORDER_STATUS_RESERVED
    assert (await books.audit()).clean


@pytest.mark.parametrize("amount", ["0", "0.00", "-1", "-0.01", "+1", "abc", "1e1", " 1", "1,5", "NaN", "1" * 41])
async def test_revenue_with_a_malformed_or_non_positive_amount_is_invalid(transactions, info, new_id, books, amount):
    """A zero, negative or malformed revenue amount is INVALID_ARGUMENT naming amount and captures nothing."""
    placed = await _place(transactions, new_id, deposit="100.00", amount="100.00")
    failure = await fails(transactions.RecognizeRevenue(_revenue(placed, amount)))
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["amount"])
    assert (await _order(info, placed.order)).status == types_pb2.ORDER_STATUS_RESERVED
    assert (await books.audit()).clean


@pytest.mark.parametrize("order_id", [0, -1, -(2**63)])
async def test_order_ids_must_be_positive(transactions, info, new_id, order_id):
    """An order_id of zero or below is INVALID_ARGUMENT naming order_id in every order RPC."""
    user, service = new_id(), new_id()
    for call in (
        transactions.Reserve(pb.ReserveRequest(user_id=user, service_id=service, order_id=order_id, amount="1")),
        transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=order_id)),
        transactions.RecognizeRevenue(pb.RecognizeRevenueRequest(user_id=user, service_id=service, order_id=order_id)),
        info.GetOrder(info_pb.GetOrderRequest(order_id=order_id)),
    ):
        failure = await fails(call)
        assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["order_id"])
