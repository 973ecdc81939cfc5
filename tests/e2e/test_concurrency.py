"""Real concurrency against real PostgreSQL: the books stay balanced, nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import random
import uuid
from decimal import Decimal

import grpc
from grpc import aio

from balance.v1 import transaction_service_pb2 as pb
from tests.rpc import failure_of

CALL_SECONDS_MAX = 60


async def _outcome(call):
    """The response, or the failure of a call that failed."""
    try:
        return await call
    except aio.AioRpcError as error:
        return failure_of(error)


async def test_six_concurrent_reserves_of_1000_on_5000_exactly_five_succeed(transactions, new_id, books):
    """Six reserves of 1000 racing on a balance of 5000: exactly five succeed, one is INSUFFICIENT_FUNDS."""
    user, service = new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="5000"))
    orders = [new_id() for _ in range(6)]
    outcomes = await asyncio.gather(
        *(
            _outcome(
                transactions.Reserve(
                    pb.ReserveRequest(user_id=user, service_id=service, order_id=order, amount="1000"),
                    timeout=CALL_SECONDS_MAX,
                )
            )
            for order in orders
        )
    )
    succeeded = [outcome for outcome in outcomes if isinstance(outcome, pb.ReserveResponse)]
    refused = [outcome for outcome in outcomes if not isinstance(outcome, pb.ReserveResponse)]
    assert len(succeeded) == 5
    assert [(failure.code, failure.reason) for failure in refused] == [
        (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    ]
    assert await books.balance(user) == 0
    assert await books.balance(user, kind="reserve") == 500000
    assert (await books.audit()).clean


async def test_storm_of_transfers_reserves_and_releases_keeps_the_books(transactions, new_id, books):
    """240 concurrent transfers among four users plus reserves and releases on one of them: the books
    balance, no balance is negative, every acknowledged transaction is recorded exactly once and
    every refused or aborted one not at all."""
    users = [new_id() for _ in range(4)]
    service = new_id()
    for user in users:
        await transactions.Deposit(pb.DepositRequest(user_id=user, amount="1000.00"))
    rng = random.Random(20221117)
    calls = []
    for _ in range(240):
        source, target = rng.sample(users, 2)
        amount = f"{rng.randint(1, 9000) / 100:.2f}"
        request = pb.TransferRequest(
            from_user_id=source, to_user_id=target, amount=amount, idempotency_key=uuid.uuid4().hex
        )
        calls.append(("transfer", request, transactions.Transfer))
    orders = [new_id() for _ in range(40)]
    for order in orders:
        request = pb.ReserveRequest(user_id=users[0], service_id=service, order_id=order, amount="5.00")
        calls.append(("reserve", request, transactions.Reserve))
    rng.shuffle(calls)

    async def run(kind, request, method):
        outcome = await _outcome(method(request, timeout=CALL_SECONDS_MAX))
        # Release half of the orders as soon as they are reserved, racing the transfers.
        if kind == "reserve" and not hasattr(outcome, "code") and request.order_id % 2 == 0:
            await transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=request.order_id))
        return kind, request, outcome

    results = await asyncio.gather(*(run(*call) for call in calls))

    acknowledged = [(request, outcome) for kind, request, outcome in results if not hasattr(outcome, "code")]
    failed = [(request, outcome) for kind, request, outcome in results if hasattr(outcome, "code")]
    assert acknowledged, "some operations must succeed"
    for _, failure in failed:
        assert failure.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED), failure
    for _request, outcome in acknowledged:
        count = await books.value(
            "SELECT count(*) FROM transactions WHERE transaction_id = %s", uuid.UUID(outcome.transaction.transaction_id)
        )
        assert count == 1
    for request, _ in failed:
        if isinstance(request, pb.TransferRequest):
            count = await books.value(
                "SELECT count(*) FROM transactions WHERE idempotency_key = %s", request.idempotency_key
            )
            assert count == 0
    recorded = await books.value(
        "SELECT count(*) FROM transactions WHERE kind = 'transfer' AND from_user_id = ANY(%s)", users
    )
    assert recorded == sum(1 for request, _ in acknowledged if isinstance(request, pb.TransferRequest))
    assert (await books.audit()).clean
    total = sum([await books.balance(user) + await books.balance(user, kind="reserve") for user in users])
    assert total == 4 * 100000


async def test_hot_account_storm_loses_and_doubles_nothing(transactions, new_id, books):
    """300 concurrent transfers into and out of one hot account: the hot balance equals its start plus
    what came in minus what went out, as acknowledged, with no negative balance."""
    hot = new_id()
    others = [new_id() for _ in range(10)]
    await transactions.Deposit(pb.DepositRequest(user_id=hot, amount="100.00"))
    for user in others:
        await transactions.Deposit(pb.DepositRequest(user_id=user, amount="100.00"))
    rng = random.Random(7)
    requests = []
    for _ in range(300):
        other = rng.choice(others)
        inbound = rng.random() < 0.5
        requests.append(
            pb.TransferRequest(
                from_user_id=other if inbound else hot,
                to_user_id=hot if inbound else other,
                amount=f"{rng.randint(1, 1500) / 100:.2f}",
                idempotency_key=uuid.uuid4().hex,
            )
        )
    outcomes = await asyncio.gather(
        *(_outcome(transactions.Transfer(request, timeout=CALL_SECONDS_MAX)) for request in requests)
    )
    expected = 10000
    for request, outcome in zip(requests, outcomes, strict=True):
        if hasattr(outcome, "code"):
            assert outcome.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED), outcome
            continue
        cents = int(Decimal(request.amount) * 100)
        expected += cents if request.to_user_id == hot else -cents
    assert await books.balance(hot) == expected
    assert (await books.audit()).clean
