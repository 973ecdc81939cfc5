"""Deposit, Withdraw and Transfer through a real server: results, balances, errors, idempotency."""

from __future__ import annotations

import grpc
import pytest

from balance.v1 import info_service_pb2 as info_pb
from balance.v1 import transaction_service_pb2 as pb
from balance.v1 import types_pb2
from tests.rpc import fails


async def test_first_deposit_creates_both_accounts_and_returns_them(transactions, info, new_id, key):
    """The first deposit creates regular and reserve accounts and answers with both."""
    user = new_id()
    response = await transactions.Deposit(
        pb.DepositRequest(user_id=user, amount="199.99", source="visa-4421", idempotency_key=key())
    )
    assert response.transaction.kind == types_pb2.TRANSACTION_KIND_DEPOSIT
    assert response.transaction.amount == "199.99"
    assert response.transaction.currency == "USD"
    assert response.transaction.to_user_id == user
    assert response.transaction.description == (
        f"Deposit of 199.99 USD to user {user} from payment source 'visa-4421'."
    )
    assert [(a.kind, a.balance) for a in response.accounts] == [
        (types_pb2.ACCOUNT_KIND_REGULAR, "199.99"),
        (types_pb2.ACCOUNT_KIND_RESERVE, "0.00"),
    ]
    balance = await info.GetBalance(info_pb.GetBalanceRequest(user_id=user))
    assert [(a.kind, a.balance, a.currency) for a in balance.accounts] == [
        (types_pb2.ACCOUNT_KIND_REGULAR, "199.99", "USD"),
        (types_pb2.ACCOUNT_KIND_RESERVE, "0.00", "USD"),
    ]


async def test_get_balance_before_first_deposit_is_not_found(info, new_id):
    """A user with no deposit yet has no accounts: NOT_FOUND with ACCOUNT_NOT_FOUND."""
    failure = await fails(info.GetBalance(info_pb.GetBalanceRequest(user_id=new_id())))
    assert (failure.code, failure.reason, failure.domain) == (
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "balance.v1",
    )


async def test_get_balance_filters_by_currency_and_lists_all_without_one(transactions, info, new_id):
    """Empty currency lists every currency the user holds; a currency selects its accounts only."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="10", currency="usd"))
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="500", currency="JPY"))
    everything = await info.GetBalance(info_pb.GetBalanceRequest(user_id=user))
    assert sorted((a.currency, a.kind, a.balance) for a in everything.accounts) == [
        ("JPY", types_pb2.ACCOUNT_KIND_REGULAR, "500"),
        ("JPY", types_pb2.ACCOUNT_KIND_RESERVE, "0"),
        ("USD", types_pb2.ACCOUNT_KIND_REGULAR, "10.00"),
        ("USD", types_pb2.ACCOUNT_KIND_RESERVE, "0.00"),
    ]
    yen = await info.GetBalance(info_pb.GetBalanceRequest(user_id=user, currency="jpy"))
    assert {a.currency for a in yen.accounts} == {"JPY"}
    failure = await fails(info.GetBalance(info_pb.GetBalanceRequest(user_id=user, currency="EUR")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_withdraw_debits_and_refuses_overdraft(transactions, new_id, books):
    """A withdrawal debits the regular account; one above the balance is INSUFFICIENT_FUNDS and moves nothing."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="100.00"))
    response = await transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="30.50", destination="iban-1"))
    assert response.transaction.kind == types_pb2.TRANSACTION_KIND_WITHDRAWAL
    assert response.transaction.from_user_id == user
    assert response.accounts[0].balance == "69.50"
    failure = await fails(transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="69.51")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert failure.metadata["available"] == "69.50"
    assert await books.balance(user) == 6950


async def test_withdraw_exactly_the_balance_leaves_zero(transactions, new_id):
    """Withdrawing the whole balance is allowed and leaves exactly zero."""
    user = new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="12.34"))
    response = await transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="12.34"))
    assert response.accounts[0].balance == "0.00"


async def test_withdraw_and_transfer_from_user_without_accounts_are_not_found(transactions, new_id):
    """Withdrawing or transferring from a user who never deposited is NOT_FOUND (ACCOUNT_NOT_FOUND)."""
    user, other = new_id(), new_id()
    for call in (
        transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="1")),
        transactions.Transfer(pb.TransferRequest(from_user_id=user, to_user_id=other, amount="1")),
    ):
        failure = await fails(call)
        assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_transfer_moves_money_and_creates_receiver_accounts(transactions, info, new_id, books):
    """A transfer debits the sender, credits a receiver who had no accounts, and answers with the sender's accounts."""
    sender, receiver = new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=sender, amount="500"))
    response = await transactions.Transfer(
        pb.TransferRequest(from_user_id=sender, to_user_id=receiver, amount="120.25", comment="rent")
    )
    assert response.transaction.kind == types_pb2.TRANSACTION_KIND_TRANSFER
    assert (response.transaction.from_user_id, response.transaction.to_user_id) == (sender, receiver)
    assert response.transaction.description == (
        f"Transfer of 120.25 USD from user {sender} to user {receiver} with comment 'rent'."
    )
    assert {a.user_id for a in response.accounts} == {sender}
    assert response.accounts[0].balance == "379.75"
    received = await info.GetBalance(info_pb.GetBalanceRequest(user_id=receiver))
    assert [a.balance for a in received.accounts] == ["120.25", "0.00"]
    assert (await books.audit()).clean


async def test_transfer_to_self_is_invalid(transactions, new_id):
    """A user cannot transfer to themselves: INVALID_ARGUMENT naming to_user_id."""
    user = new_id()
    failure = await fails(transactions.Transfer(pb.TransferRequest(from_user_id=user, to_user_id=user, amount="1")))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == ["to_user_id"]


async def test_transfer_above_balance_is_refused(transactions, new_id, books):
    """A transfer above the sender's balance is INSUFFICIENT_FUNDS and moves nothing."""
    sender, receiver = new_id(), new_id()
    await transactions.Deposit(pb.DepositRequest(user_id=sender, amount="5"))
    failure = await fails(
        transactions.Transfer(pb.TransferRequest(from_user_id=sender, to_user_id=receiver, amount="5.01"))
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert await books.balance(sender) == 500
    assert await books.transactions_of(receiver) == 0


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("0", ""),
        ("0.00", ""),
        ("-5", ""),
        ("+5", ""),
        ("1e5", ""),
        ("NaN", ""),
        ("Infinity", ""),
        ("0x10", ""),
        (" 5", ""),
        ("5 ", ""),
        ("5.", ""),
        (".5", ""),
        ("1,5", ""),
        ("١٢", ""),
        ("", ""),
        ("1.001", "USD"),
        ("1.5", "JPY"),
        ("1.0001", "KWD"),
        ("10000000000000.01", "USD"),
        ("1" * 41, ""),
    ],
)
async def test_invalid_amounts_are_refused(transactions, new_id, amount, currency):
    """Zero, negative, non-plain, too precise or too large amounts are INVALID_ARGUMENT naming amount."""
    failure = await fails(transactions.Deposit(pb.DepositRequest(user_id=new_id(), amount=amount, currency=currency)))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == ["amount"]
    assert failure.reason == "INVALID_AMOUNT"


async def test_amount_at_the_maximum_is_accepted(transactions, new_id):
    """The largest amount (AMOUNT_MINOR_UNITS_MAX) is accepted; one minor unit more is refused above."""
    response = await transactions.Deposit(pb.DepositRequest(user_id=new_id(), amount="10000000000000.00"))
    assert response.transaction.amount == "10000000000000.00"


@pytest.mark.parametrize(
    ("amount", "currency", "shown"), [("500", "JPY", "500"), ("1.234", "KWD", "1.234"), ("1.5000", "EUR", "1.50")]
)
async def test_currency_precision_is_kept_exactly(transactions, new_id, amount, currency, shown):
    """Each currency's minor digits decide how amounts are read and written; trailing zeros are not precision."""
    response = await transactions.Deposit(pb.DepositRequest(user_id=new_id(), amount=amount, currency=currency))
    assert response.transaction.amount == shown
    assert response.transaction.currency == currency


@pytest.mark.parametrize("currency", ["XXX", "US", "USDD", "usd1", "€€€", "U$D"])
async def test_unknown_currency_is_invalid(transactions, new_id, currency):
    """A code that is not an ISO 4217 currency the ledger knows is INVALID_ARGUMENT (UNKNOWN_CURRENCY)."""
    failure = await fails(transactions.Deposit(pb.DepositRequest(user_id=new_id(), amount="1", currency=currency)))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_CURRENCY",
        ["currency"],
    )


@pytest.mark.parametrize("user_id", [0, -1, -(2**63)])
async def test_ids_must_be_positive(transactions, user_id):
    """User ids of zero or below are INVALID_ARGUMENT naming user_id."""
    failure = await fails(transactions.Deposit(pb.DepositRequest(user_id=user_id, amount="1")))
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["user_id"])


async def test_every_violation_is_reported_at_once(transactions):
    """A request with several bad fields names each of them in one BadRequest."""
    failure = await fails(transactions.Transfer(pb.TransferRequest(from_user_id=0, to_user_id=-1, amount="x")))
    assert sorted(failure.fields) == ["amount", "from_user_id", "to_user_id"]


async def test_free_text_limits(transactions, new_id):
    """Free text up to MEMO_LENGTH_MAX is kept byte-exact; longer text or NUL characters are refused."""
    from balance_server import limits

    user = new_id()
    prefix = "Zahlung – ünïcödé 💶 'quoted' ; \"x\""
    exact = prefix + "x" * (limits.MEMO_LENGTH_MAX - len(prefix))
    assert len(exact) == limits.MEMO_LENGTH_MAX
    response = await transactions.Deposit(pb.DepositRequest(user_id=user, amount="1", source=exact))
    assert exact in response.transaction.description
    for bad in ("x" * (limits.MEMO_LENGTH_MAX + 1), "a\x00b"):
        failure = await fails(transactions.Deposit(pb.DepositRequest(user_id=user, amount="1", source=bad)))
        assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["source"])


async def test_idempotent_deposit_replay_returns_the_original_and_moves_nothing(transactions, new_id, key, books):
    """The same key with the same request returns the original transaction; money moves once."""
    user, same_key = new_id(), key()
    request = pb.DepositRequest(user_id=user, amount="25.00", idempotency_key=same_key)
    first = await transactions.Deposit(request)
    call = transactions.Deposit(request)
    again = await call
    assert again.transaction == first.transaction
    assert ("x-idempotent-replay", "true") in tuple(await call.trailing_metadata())
    assert await books.balance(user) == 2500
    assert await books.transactions_of(user) == 1


async def test_idempotency_key_reused_for_another_request_is_already_exists(transactions, new_id, key, books):
    """The same key with a different request is ALREADY_EXISTS (IDEMPOTENCY_KEY_REUSED) and moves nothing."""
    user, same_key = new_id(), key()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="25.00", idempotency_key=same_key))
    for other in (
        transactions.Deposit(pb.DepositRequest(user_id=user, amount="25.01", idempotency_key=same_key)),
        transactions.Withdraw(pb.WithdrawRequest(user_id=user, amount="25.00", idempotency_key=same_key)),
    ):
        failure = await fails(other)
        assert (failure.code, failure.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await books.balance(user) == 2500


async def test_equal_amounts_written_differently_are_the_same_request(transactions, new_id, key):
    """ "25" and "25.00" are the same amount, so a replay written either way is the same request."""
    user, same_key = new_id(), key()
    first = await transactions.Deposit(pb.DepositRequest(user_id=user, amount="25", idempotency_key=same_key))
    again = await transactions.Deposit(pb.DepositRequest(user_id=user, amount="25.00", idempotency_key=same_key))
    assert again.transaction.transaction_id == first.transaction.transaction_id


async def test_refusal_is_remembered_under_its_key(transactions, new_id, key, books):
    """A refused withdrawal stays refused on retry with its key, even after money arrives."""
    user, same_key = new_id(), key()
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="10"))
    request = pb.WithdrawRequest(user_id=user, amount="50", idempotency_key=same_key)
    first = await fails(transactions.Withdraw(request))
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="100"))
    again = await fails(transactions.Withdraw(request))
    assert first.reason == again.reason == "INSUFFICIENT_FUNDS"
    assert await books.balance(user) == 11000


async def test_idempotency_key_length_limit(transactions, new_id):
    """Keys up to IDEMPOTENCY_KEY_LENGTH_MAX characters are accepted; longer ones are INVALID_ARGUMENT."""
    from balance_server import limits

    user = new_id()
    await transactions.Deposit(
        pb.DepositRequest(user_id=user, amount="1", idempotency_key="k" * limits.IDEMPOTENCY_KEY_LENGTH_MAX)
    )
    failure = await fails(
        transactions.Deposit(
            pb.DepositRequest(user_id=user, amount="1", idempotency_key="k" * (limits.IDEMPOTENCY_KEY_LENGTH_MAX + 1))
        )
    )
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["idempotency_key"])


async def test_get_transaction_by_id(transactions, info, new_id):
    """GetTransaction returns a written transaction; unknown ids are NOT_FOUND, malformed ones INVALID_ARGUMENT."""
    written = await transactions.Deposit(pb.DepositRequest(user_id=new_id(), amount="3"))
    read = await info.GetTransaction(info_pb.GetTransactionRequest(transaction_id=written.transaction.transaction_id))
    assert read.transaction == written.transaction
    missing = await fails(
        info.GetTransaction(info_pb.GetTransactionRequest(transaction_id="00000000-0000-4000-8000-000000000000"))
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "TRANSACTION_NOT_FOUND")
    for malformed in ("", "42", "not-a-uuid", "x" * 1000):
        failure = await fails(info.GetTransaction(info_pb.GetTransactionRequest(transaction_id=malformed)))
        assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["transaction_id"])
