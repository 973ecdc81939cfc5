"""The bundled Python client (blocking and asyncio) against a real server and PostgreSQL: every
method, exact Decimal amounts, lazy pagination, verified downloads, safe retries after a lost
answer, and one exception class per error reason.

Faults come from a second server on the same database whose interceptor (`Faults`) records each
call and injects the fault a call's `x-test-fault` metadata names."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

import balance_client
from balance.v1 import types_pb2
from balance_client import (
    AccountKind,
    AsyncBalanceClient,
    BalanceClient,
    OrderStatus,
    RetryPolicy,
    SortField,
    SortOrder,
    TransactionKind,
)
from balance_server import errors as server_errors
from balance_server import server, status

QUICK_RETRIES = RetryPolicy(attempts_max=3, delay_ms_base=1, delay_ms_max=10, deadline_seconds=10)


# A server that injects faults


@dataclass(frozen=True)
class Seen:
    """One call as the server received it."""

    method: str
    request: Any
    metadata: dict[str, str]


class Faults(aio.ServerInterceptor):
    """Records every call under its `x-test-tag` and injects the fault its `x-test-fault` names:

    - `lose-first-response`: the first call runs (and commits), then its answer is replaced by UNAVAILABLE;
    - `unavailable`: every call fails with UNAVAILABLE before it runs;
    - `slow-first:SECONDS`: the first call waits that long before it runs;
    - `error:REASON`: every call fails with the server's status for REASON (any other reason
      becomes a FAILED_PRECONDITION with it, as a newer server might send);
    - `internal`: every call fails with a bare INTERNAL;
    - `corrupt`: a download's first byte is flipped; `tamper-checksum`: its x-sha256 is replaced.
    """

    def __init__(self) -> None:
        self.port = 0
        self.seen: dict[str, list[Seen]] = collections.defaultdict(list)
        self._started: set[str] = set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def calls(self, tag: str, method: str) -> list[Seen]:
        return [seen for seen in self.seen[tag] if seen.method == method]

    def _first(self, metadata: dict[str, str]) -> bool:
        tag = metadata.get("x-test-tag", "")
        first = tag not in self._started
        self._started.add(tag)
        return first

    def _unary(self, behavior, method: str, metadata: dict[str, str]):
        fault = metadata.get("x-test-fault", "")

        async def call(request, context):
            self.seen[metadata.get("x-test-tag", "")].append(Seen(method, request, metadata))
            first = self._first(metadata)
            if fault == "unavailable":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the server cannot be reached")
            if fault == "internal":
                await context.abort(grpc.StatusCode.INTERNAL, "injected: internal error")
            if fault.startswith("error:"):
                await context.abort_with_status(_status_of(fault.removeprefix("error:")))
            if fault.startswith("slow-first:") and first:
                await asyncio.sleep(float(fault.removeprefix("slow-first:")))
            response = await behavior(request, context)
            if fault == "lose-first-response" and first:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the answer was lost after the commit")
            return response

        return call

    def _stream(self, behavior, method: str, metadata: dict[str, str]):
        fault = metadata.get("x-test-fault", "")

        async def call(request, context):
            self.seen[metadata.get("x-test-tag", "")].append(Seen(method, request, metadata))
            first_chunk = True
            async for chunk in behavior(request, context):
                if fault == "corrupt" and first_chunk:
                    data = bytearray(chunk.data)
                    data[0] ^= 0x01
                    chunk = type(chunk)(data=bytes(data))
                first_chunk = False
                yield chunk
            if fault == "tamper-checksum":
                context.set_trailing_metadata((("x-row-count", "0"), ("x-sha256", "0" * 64)))

        return call


_INJECTABLE = {
    error.reason: error
    for error in (
        server_errors.RetriesExhausted,
        server_errors.DatabaseUnavailable,
        server_errors.Overloaded,
        server_errors.BalanceLimitExceeded,
    )
}


def _status_of(reason: str) -> grpc.Status:
    if reason in _INJECTABLE:
        return status.to_status(_INJECTABLE[reason](f"injected {reason}", metadata={"injected": "true"}))
    rich = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=f"injected {reason}")
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="balance.v1", metadata={"injected": "true"}))
    rich.details.append(detail)
    return rpc_status.to_status(rich)


async def start_faulty_server(dsn, settings) -> tuple[Faults, server.Running]:
    faults = Faults()
    running = await server.start(settings, dsn, interceptors=[faults])
    faults.port = running.port
    return faults, running


@pytest.fixture(scope="module")
async def faults(dsn, settings) -> AsyncIterator[Faults]:
    injecting, running = await start_faulty_server(dsn, settings)
    yield injecting
    await running.stop(grace_seconds=1)


# Both clients behind one awaitable interface

_END = object()


class Threaded:
    """The blocking client with each method run in a worker thread, so that the event loop the
    test server runs on keeps serving while the client blocks."""

    def __init__(self, client: BalanceClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    async def iter_transactions(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        iterator = self.client.iter_transactions(*args, **kwargs)
        while (item := await asyncio.to_thread(next, iterator, _END)) is not _END:
            yield item

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)


@pytest.fixture(params=["blocking", "asyncio"])
async def connect(request) -> AsyncIterator[Callable[..., Any]]:
    """Call it with a port (and client options) for a client of the kind this test runs with."""
    opened: list[Any] = []

    def connect(port: int, **options: Any) -> Any:
        target = f"127.0.0.1:{port}"
        if request.param == "blocking":
            client: Any = Threaded(BalanceClient(target, **options))
        else:
            client = AsyncBalanceClient(target, **options)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        await client.close()


@pytest.fixture
def client(connect, running):
    return connect(running.port)


def tagged(connect, faults: Faults, fault: str = "", **options: Any) -> tuple[Any, str]:
    """A client of the fault-injecting server whose calls carry a fresh tag (and the fault)."""
    tag = uuid.uuid4().hex
    metadata = [("x-test-tag", tag), ("x-test-fault", fault)]
    options.setdefault("retry", QUICK_RETRIES)
    return connect(faults.port, metadata=metadata, **options), tag


async def _count(books, user: int, kind: str) -> int:
    return int(
        await books.value(
            "SELECT count(*) FROM transactions WHERE (from_user_id = %s OR to_user_id = %s) AND kind = %s",
            user,
            user,
            kind,
        )
    )


async def _placed(client, new_id, *, deposit: str = "100.00", amount: str = "60.00") -> tuple[int, int, int]:
    """A user who deposited and reserved for a new order: (user, service, order)."""
    user, service, order = new_id(), new_id(), new_id()
    await client.deposit(user, deposit)
    await client.reserve(user, service, order, amount, service_name="Delivery")
    return user, service, order


# Every method


async def test_deposit_withdraw_and_transfer_return_receipts_with_exact_balances(client, new_id):
    """Deposit, withdraw and transfer answer with typed receipts: the transaction and Decimal balances after it."""
    sender, receiver = new_id(), new_id()
    deposited = await client.deposit(sender, Decimal("100.00"), source="visa-4421", idempotency_key="k-" + str(sender))
    withdrawn = await client.withdraw(sender, "30.50", destination="iban-1")
    transferred = await client.transfer(sender, receiver, Decimal("19.5"), comment="rent")
    assert (deposited.transaction.kind, deposited.transaction.to_user_id) == (TransactionKind.DEPOSIT, sender)
    assert deposited.transaction.idempotency_key == f"k-{sender}"
    assert [(a.kind, a.balance) for a in deposited.accounts] == [
        (AccountKind.REGULAR, Decimal("100.00")),
        (AccountKind.RESERVE, Decimal("0.00")),
    ]
    assert (withdrawn.transaction.kind, withdrawn.balance()) == (TransactionKind.WITHDRAWAL, Decimal("69.50"))
    assert transferred.transaction.description == (
        f"Transfer of 19.50 USD from user {sender} to user {receiver} with comment 'rent'."
    )
    assert transferred.balance() == Decimal("50.00")
    assert [(a.kind, a.balance) for a in await client.get_balance(receiver)] == [
        (AccountKind.REGULAR, Decimal("19.50")),
        (AccountKind.RESERVE, Decimal("0.00")),
    ]


async def test_reserve_release_and_recognize_revenue_move_an_orders_money(client, new_id):
    """Reserve holds money for an order, release gives it back, revenue captures part and releases the rest."""
    user, service, cancelled = await _placed(client, new_id, deposit="100.00", amount="60.00")
    assert (await client.get_order(cancelled)).status == OrderStatus.RESERVED
    released = await client.release_reserve(cancelled)
    assert (released.transaction.kind, released.balance(), released.balance(AccountKind.RESERVE)) == (
        TransactionKind.RELEASE,
        Decimal("100.00"),
        Decimal("0.00"),
    )
    delivered = new_id()
    await client.reserve(user, service, delivered, Decimal("40"), service_name="Delivery")
    captured = await client.recognize_revenue(user, service, delivered, Decimal("25.00"))
    assert (captured.transaction.kind, captured.balance()) == (TransactionKind.REVENUE, Decimal("75.00"))
    order = await client.get_order(delivered)
    assert (order.status, order.reserved_amount, order.captured_amount, order.released_amount) == (
        OrderStatus.CAPTURED,
        Decimal("40.00"),
        Decimal("25.00"),
        Decimal("15.00"),
    )
    assert (order.user_id, order.service_id, order.service_name) == (user, service, "Delivery")


async def test_recognize_revenue_without_an_amount_captures_everything_reserved(client, new_id):
    """recognize_revenue with no amount captures all that the order reserved."""
    user, service, order = await _placed(client, new_id, amount="60.00")
    receipt = await client.recognize_revenue(user, service, order)
    assert receipt.transaction.amount == Decimal("60.00")
    assert (await client.get_order(order)).released_amount == Decimal("0.00")


async def test_get_transaction_returns_what_the_operation_returned(client, new_id):
    """get_transaction (by UUID or by string) returns the same transaction the deposit answered with."""
    receipt = await client.deposit(new_id(), "12.34", source="visa")
    by_uuid = await client.get_transaction(receipt.transaction.transaction_id)
    by_text = await client.get_transaction(str(receipt.transaction.transaction_id))
    assert by_uuid == by_text == receipt.transaction


async def test_list_transactions_filters_sorts_and_converts_times(client, new_id):
    """list_transactions passes kinds, sort, order and an aware since/until window, and returns aware datetimes."""
    user = new_id()
    for amount in ("3.00", "1.00", "2.00"):
        await client.deposit(user, amount)
    await client.withdraw(user, "0.50")
    deposits = await client.list_transactions(
        user, kinds=[TransactionKind.DEPOSIT], sort_by=SortField.AMOUNT, order=SortOrder.ASCENDING
    )
    assert [t.amount for t in deposits.transactions] == [Decimal("1.00"), Decimal("2.00"), Decimal("3.00")]
    assert deposits.next_page_token == ""
    assert all(t.created_at.tzinfo is not None for t in deposits.transactions)
    newest = deposits.transactions[0].created_at
    window = await client.list_transactions(
        user, since=newest - timedelta(hours=1), until=newest.astimezone(UTC) + timedelta(hours=1)
    )
    assert len(window.transactions) == 4
    empty = await client.list_transactions(user, until=newest - timedelta(hours=1))
    assert empty.transactions == ()


async def test_naive_datetimes_are_refused(client, new_id):
    """A datetime without a time zone names no instant: ValueError before any call."""
    with pytest.raises(ValueError, match="time zone"):
        await client.list_transactions(new_id(), since=datetime(2026, 1, 1))


async def test_results_are_frozen_and_keep_their_protobuf(client, new_id):
    """Results cannot be changed, and each keeps the protobuf message it was made from."""
    receipt = await client.deposit(new_id(), "5.00")
    with pytest.raises(FrozenInstanceError):
        receipt.transaction.amount = Decimal("500")  # type: ignore[misc]
    assert isinstance(receipt.transaction.proto, types_pb2.Transaction)
    assert receipt.transaction.proto.amount == "5.00"
    assert receipt.accounts[0].proto.balance == "5.00"
    assert receipt.proto.transaction.transaction_id == str(receipt.transaction.transaction_id)


async def test_check_health_reports_serving(client):
    """check_health asks grpc.health.v1 and reports SERVING for the server and for a service."""
    assert await client.check_health() == "SERVING"
    assert await client.check_health("balance.v1.TransactionService") == "SERVING"


def test_target_defaults_to_the_environment_then_to_the_local_port(monkeypatch):
    """Without a target the client uses $BALANCE_TARGET, else 127.0.0.1:50051."""
    monkeypatch.setenv("BALANCE_TARGET", "balance.example:443")
    with BalanceClient() as configured:
        assert configured.target == "balance.example:443"
    monkeypatch.delenv("BALANCE_TARGET")
    assert AsyncBalanceClient().target == "127.0.0.1:50051"  # Its channel opens at the first call only.


async def test_access_token_and_metadata_go_with_every_call(connect, faults, new_id):
    """The access token goes as `authorization: Bearer ...`, with the caller's metadata, on every call."""
    client, tag = tagged(connect, faults, access_token="s3cret")
    await client.deposit(new_id(), "1")
    await client.check_health()
    assert [seen.metadata["authorization"] for seen in faults.seen[tag]] == ["Bearer s3cret"] * 2


# Exact money


@pytest.mark.parametrize(
    ("currency", "given", "shown"),
    [("JPY", "1234", "1234"), ("USD", "1234.5", "1234.50"), ("KWD", "1.234", "1.234"), ("CLF", "1.2345", "1.2345")],
)
async def test_decimal_amounts_round_trip_at_every_currency_precision(client, new_id, currency, given, shown):
    """A Decimal (or str) amount comes back as the equal Decimal with the currency's minor digits."""
    user = new_id()
    deposited = await client.deposit(user, Decimal(given), currency=currency)
    assert isinstance(deposited.transaction.amount, Decimal)
    assert deposited.transaction.amount == Decimal(given)
    assert str(deposited.transaction.amount) == shown
    assert str(deposited.balance()) == shown
    withdrawn = await client.withdraw(user, shown, currency=currency)
    assert str(withdrawn.balance()) == str(Decimal(0).quantize(Decimal(shown)))


async def test_float_amounts_are_refused_before_any_call(client, new_id, books):
    """Every method taking an amount refuses a float with TypeError, and nothing reaches the ledger."""
    user, other = new_id(), new_id()
    for call in (
        lambda: client.deposit(user, 1.5),
        lambda: client.withdraw(user, 1.5),
        lambda: client.transfer(user, other, 1.5),
        lambda: client.reserve(user, new_id(), new_id(), 1.5),
        lambda: client.recognize_revenue(user, new_id(), new_id(), 1.5),
    ):
        with pytest.raises(TypeError, match="float"):
            await call()
    assert await books.transactions_of(user) == 0


# Pagination


async def test_iter_transactions_follows_page_tokens_lazily(connect, faults, new_id):
    """iter_transactions walks every page in order and asks for a page only when the previous one is used up."""
    client, tag = tagged(connect, faults)
    user = new_id()
    written = [(await client.deposit(user, f"{number}.00")).transaction for number in range(1, 8)]
    walk = client.iter_transactions(user, page_size=3)
    first = await anext(walk)
    assert len(faults.calls(tag, "ListTransactions")) == 1
    rest = [transaction async for transaction in walk]
    assert [first, *rest] == written[::-1]
    assert len(faults.calls(tag, "ListTransactions")) == 3


# Downloads


async def test_revenue_report_is_saved_under_its_name_with_the_checksum_verified(client, new_id, tmp_path):
    """A revenue report saved into a directory gets the server's file name, its SHA-256 and row count, and progress."""
    user, service, order = await _placed(client, new_id, amount="60.00")
    await client.recognize_revenue(user, service, order, "42.00")
    now = datetime.now(UTC)
    received: list[int] = []
    saved = await client.download_revenue_report(now.year, now.month, tmp_path, progress=received.append)
    data = (tmp_path / f"revenue_{now:%Y-%m}.csv").read_bytes()
    assert saved.path == tmp_path / f"revenue_{now:%Y-%m}.csv"
    assert saved.sha256 == hashlib.sha256(data).hexdigest()
    assert (saved.size_bytes, saved.row_count) == (len(data), data.count(b"\n") - 1)
    assert f"\n{service};Delivery;42.00;USD\n".encode() in data
    assert received == sorted(received)
    assert received[-1] == len(data)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"revenue_{now:%Y-%m}.csv"]


async def test_statement_is_written_to_a_file_object(client, new_id):
    """export_transactions writes the user's statement, oldest first, into a binary file object."""
    user = new_id()
    first = await client.deposit(user, "10.00")
    second = await client.withdraw(user, "4.00")
    buffer = io.BytesIO()
    saved = await client.export_transactions(user, buffer, kinds=[TransactionKind.DEPOSIT, TransactionKind.WITHDRAWAL])
    lines = buffer.getvalue().decode().splitlines()
    assert lines[0].startswith("transaction_id;created_at;kind;amount")
    assert [line.split(";")[0] for line in lines[1:]] == [
        str(first.transaction.transaction_id),
        str(second.transaction.transaction_id),
    ]
    assert (saved.path, saved.row_count, saved.filename.startswith(f"statement_{user}_")) == (None, 2, True)


@pytest.mark.parametrize("fault", ["corrupt", "tamper-checksum"])
async def test_corrupted_download_is_detected_and_leaves_no_file(connect, faults, new_id, tmp_path, fault):
    """A flipped byte or a wrong trailing x-sha256 raises ChecksumMismatch, and the path holds no file."""
    client, _ = tagged(connect, faults, fault)
    user = new_id()
    await client.deposit(user, "10.00")
    with pytest.raises(balance_client.ChecksumMismatch) as caught:
        await client.export_transactions(user, tmp_path / "statement.csv")
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    assert list(tmp_path.iterdir()) == []


# Safe retries


async def _prepared(setup, client, operation: str, user: int, new_id) -> tuple[Callable[[], Any], str]:
    """Prepares `user` through `setup`; returns the operation's call through `client` and the kind it writes."""
    if operation != "deposit":
        await setup.deposit(user, "100.00")
    service, order = new_id(), new_id()
    if operation in ("release", "revenue"):
        await setup.reserve(user, service, order, "60.00")
    calls = {
        "deposit": (lambda: client.deposit(user, "10.00"), "deposit"),
        "withdraw": (lambda: client.withdraw(user, "10.00"), "withdrawal"),
        "transfer": (lambda: client.transfer(user, new_id(), "10.00"), "transfer"),
        "reserve": (lambda: client.reserve(user, service, order, "10.00"), "reserve"),
        "release": (lambda: client.release_reserve(order), "release"),
        "revenue": (lambda: client.recognize_revenue(user, service, order, "60.00"), "revenue"),
    }
    return calls[operation]


@pytest.mark.parametrize("operation", ["deposit", "withdraw", "transfer", "reserve", "release", "revenue"])
async def test_lost_answer_is_retried_with_the_same_key_and_returns_the_original(
    client, connect, faults, new_id, books, operation
):
    """When the answer of a committed call is lost, the retry repeats the same request and gets the original back."""
    losing, tag = tagged(connect, faults, "lose-first-response")
    user = new_id()
    call, kind = await _prepared(client, losing, operation, user, new_id)
    receipt = await call()
    first, retry = faults.seen[tag]
    assert first.request == retry.request  # The same idempotency key (or order) on the retry.
    assert receipt.replayed
    assert await _count(books, user, kind) == 1
    recorded = await books.value(
        "SELECT transaction_id FROM transactions WHERE (from_user_id = %s OR to_user_id = %s) AND kind = %s",
        user,
        user,
        kind,
    )
    assert receipt.transaction.transaction_id == recorded


async def test_every_mutating_call_gets_a_uuid_key_unless_given_one(connect, faults, new_id):
    """Deposits, withdrawals and transfers carry a UUID idempotency key by default, or the caller's key."""
    client, tag = tagged(connect, faults)
    user = new_id()
    await client.deposit(user, "5.00")
    await client.withdraw(user, "1.00")
    await client.transfer(user, new_id(), "1.00", idempotency_key="mine-" + uuid.uuid4().hex)
    keys = [seen.request.idempotency_key for seen in faults.seen[tag]]
    assert [str(uuid.UUID(key)) for key in keys[:2]] == keys[:2]
    assert keys[2].startswith("mine-")


async def test_retries_stop_after_attempts_max(connect, faults, new_id):
    """UNAVAILABLE is retried until attempts_max calls were made; then Unavailable says how many."""
    client, tag = tagged(connect, faults, "unavailable")
    with pytest.raises(balance_client.Unavailable) as caught:
        await client.deposit(new_id(), "1.00")
    assert caught.value.attempts == 3
    assert len(faults.seen[tag]) == 3


async def test_retries_stop_at_the_calls_overall_deadline(connect, faults, new_id):
    """With attempts to spare, retries still stop once the call's overall deadline is near."""
    policy = RetryPolicy(attempts_max=1000, delay_ms_base=50, delay_ms_max=50, deadline_seconds=0.5)
    client, tag = tagged(connect, faults, "unavailable", retry=policy, timeout_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(balance_client.Unavailable) as caught:
        await client.get_balance(new_id())
    assert time.monotonic() - started < 1.5
    assert 1 < caught.value.attempts < 1000
    assert len(faults.seen[tag]) == caught.value.attempts


async def test_refusals_are_not_retried(connect, faults, new_id):
    """An answer such as INSUFFICIENT_FUNDS is final: one call, no retry."""
    client, tag = tagged(connect, faults)
    user = new_id()
    await client.deposit(user, "1.00")
    with pytest.raises(balance_client.InsufficientFunds) as caught:
        await client.withdraw(user, "2.00")
    assert caught.value.attempts == 1
    assert len(faults.calls(tag, "Withdraw")) == 1


async def test_deadline_exceeded_is_retried_only_for_calls_with_a_key(connect, faults, new_id, books):
    """A deposit whose first attempt timed out is retried (one transaction); a read that timed out is not."""
    keyed, keyed_tag = tagged(connect, faults, "slow-first:1.0", timeout_seconds=0.3)
    user = new_id()
    receipt = await keyed.deposit(user, "7.00")
    assert receipt.balance() == Decimal("7.00")
    assert len(faults.calls(keyed_tag, "Deposit")) == 2
    assert await books.transactions_of(user) == 1
    read, read_tag = tagged(connect, faults, "slow-first:1.0", timeout_seconds=0.3)
    with pytest.raises(balance_client.DeadlineExceeded) as caught:
        await read.get_balance(user)
    assert caught.value.attempts == 1
    assert len(faults.calls(read_tag, "GetBalance")) == 1


# One class per reason


async def _self_transfer(client, new_id):
    user = new_id()
    await client.transfer(user, user, "1")


async def _too_precise(client, new_id):
    await client.deposit(new_id(), "1.001", currency="USD")


async def _unknown_currency(client, new_id):
    await client.deposit(new_id(), "1", currency="XXX")


async def _altered_page_token(client, new_id):
    await client.list_transactions(new_id(), page_token="not-a-token")


async def _no_account(client, new_id):
    await client.get_balance(new_id())


async def _no_order(client, new_id):
    await client.get_order(new_id())


async def _no_transaction(client, new_id):
    await client.get_transaction(uuid.uuid4())


async def _overdraft(client, new_id):
    user = new_id()
    await client.deposit(user, "1.00")
    await client.withdraw(user, "2.00")


async def _revenue_after_release(client, new_id):
    user, service, order = await _placed(client, new_id)
    await client.release_reserve(order)
    await client.recognize_revenue(user, service, order)


async def _revenue_for_another_user(client, new_id):
    _, service, order = await _placed(client, new_id)
    await client.recognize_revenue(new_id(), service, order)


async def _revenue_above_reserve(client, new_id):
    user, service, order = await _placed(client, new_id, amount="60.00")
    await client.recognize_revenue(user, service, order, "60.01")


async def _key_reused(client, new_id):
    key = uuid.uuid4().hex
    await client.deposit(new_id(), "1.00", idempotency_key=key)
    await client.deposit(new_id(), "2.00", idempotency_key=key)


async def _order_reserved_again(client, new_id):
    user, service, order = await _placed(client, new_id, amount="10.00")
    await client.reserve(user, service, order, "11.00")


@pytest.mark.parametrize(
    ("scenario", "error_class", "code", "fields"),
    [
        (_self_transfer, balance_client.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, ("to_user_id",)),
        (_too_precise, balance_client.InvalidAmount, grpc.StatusCode.INVALID_ARGUMENT, ("amount",)),
        (_unknown_currency, balance_client.UnknownCurrency, grpc.StatusCode.INVALID_ARGUMENT, ("currency",)),
        (_altered_page_token, balance_client.InvalidPageToken, grpc.StatusCode.INVALID_ARGUMENT, ("page_token",)),
        (_no_account, balance_client.AccountNotFound, grpc.StatusCode.NOT_FOUND, ()),
        (_no_order, balance_client.OrderNotFound, grpc.StatusCode.NOT_FOUND, ()),
        (_no_transaction, balance_client.TransactionNotFound, grpc.StatusCode.NOT_FOUND, ()),
        (_overdraft, balance_client.InsufficientFunds, grpc.StatusCode.FAILED_PRECONDITION, ()),
        (_revenue_after_release, balance_client.OrderStateConflict, grpc.StatusCode.FAILED_PRECONDITION, ()),
        (_revenue_for_another_user, balance_client.OrderMismatch, grpc.StatusCode.FAILED_PRECONDITION, ()),
        (_revenue_above_reserve, balance_client.AmountExceedsReserve, grpc.StatusCode.FAILED_PRECONDITION, ()),
        (_key_reused, balance_client.IdempotencyKeyReused, grpc.StatusCode.ALREADY_EXISTS, ()),
        (_order_reserved_again, balance_client.OrderAlreadyExists, grpc.StatusCode.ALREADY_EXISTS, ()),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) and not isinstance(value, type) else None,
)
async def test_each_reason_raises_its_class(client, new_id, scenario, error_class, code, fields):
    """Each refusal of the real server raises the class of its reason, with its code, domain and fields."""
    with pytest.raises(balance_client.BalanceError) as caught:
        await scenario(client, new_id)
    error = caught.value
    assert type(error) is error_class
    assert (error.code, error.reason, error.domain, error.fields) == (code, error_class.REASON, "balance.v1", fields)
    assert error.message and error.message in str(error)


async def test_insufficient_funds_carries_its_metadata(client, new_id):
    """InsufficientFunds carries the ErrorInfo metadata: what was available and what was asked for."""
    with pytest.raises(balance_client.InsufficientFunds) as caught:
        await _overdraft(client, new_id)
    assert (caught.value.metadata["available"], caught.value.metadata["requested"]) == ("1.00", "2.00")


@pytest.mark.parametrize(
    ("reason", "error_class", "base_class"),
    [
        ("SERIALIZATION_RETRIES_EXHAUSTED", balance_client.RetriesExhausted, balance_client.Aborted),
        ("DATABASE_UNAVAILABLE", balance_client.DatabaseUnavailable, balance_client.Unavailable),
        ("TOO_MANY_CALLS", balance_client.TooManyCalls, balance_client.ResourceExhausted),
        ("BALANCE_LIMIT_EXCEEDED", balance_client.BalanceLimitExceeded, balance_client.FailedPrecondition),
        ("A_REASON_FROM_THE_FUTURE", balance_client.FailedPrecondition, balance_client.BalanceError),
    ],
)
async def test_reasons_the_server_rarely_gives_raise_their_class(
    connect, faults, new_id, reason, error_class, base_class
):
    """Injected statuses raise the class of their reason (an unknown one the class of its code), with metadata."""
    client, _ = tagged(connect, faults, f"error:{reason}")
    with pytest.raises(base_class) as caught:
        await client.deposit(new_id(), "1.00")
    assert type(caught.value) is error_class
    assert (caught.value.reason, caught.value.metadata) == (reason, {"injected": "true"})


async def test_status_without_details_falls_back_to_unexpected_error(connect, faults, new_id):
    """A bare INTERNAL (no ErrorInfo) raises UnexpectedError named after its code."""
    client, _ = tagged(connect, faults, "internal")
    with pytest.raises(balance_client.UnexpectedError) as caught:
        await client.get_order(new_id())
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
