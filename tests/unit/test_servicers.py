"""The servicers refuse bad requests before any database work, through grpcio-testing.

grpc_testing calls a servicer's methods synchronously, each in a thread of its own, while our
servicers are grpc.aio coroutines. `AsyncServicerAdapter` bridges the two: each call runs its
coroutine on an event loop in a background thread and waits for it, and hands the coroutine a
context whose async methods call grpc_testing's sync context.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status

from balance.v1 import info_service_pb2 as info_pb
from balance.v1 import transaction_service_pb2 as transaction_pb
from balance_server import limits
from balance_server.models import SortField
from balance_server.money import Currencies
from balance_server.pagination import HistoryQuery
from balance_server.servicers.edge import CallGate
from balance_server.servicers.info import InfoServicer
from balance_server.servicers.transactions import TransactionServicer

CURRENCIES = Currencies({"USD": 2, "JPY": 0, "KWD": 3}, "USD")
TRANSACTION_SERVICE = transaction_pb.DESCRIPTOR.services_by_name["TransactionService"]
INFO_SERVICE = info_pb.DESCRIPTOR.services_by_name["InfoService"]


class UntouchableDatabase:
    """Stands in for Database: any use of it is recorded and raises AssertionError."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.touched.append(name)
        raise AssertionError(f"the servicer used the database ({name}) for a request it should refuse")


class AsyncContext:
    """The part of grpc.aio.ServicerContext the servicers use, over grpc_testing's sync context.

    `abort` is grpc_testing's. But grpc_testing's own `abort_with_status` raises
    NotImplementedError, and its `abort` drops the trailing metadata where the rich status
    travels, so `abort_with_status` sets code, details and trailing metadata on the sync context
    instead. Both then end the coroutine like grpc.aio does, by raising AbortError; the adapter
    turns that into a normal return so grpc_testing completes the call with what was set.
    """

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self._code = status.code
        self._context.set_trailing_metadata(status.trailing_metadata)
        self._context.set_code(status.code)
        self._context.set_details(status.details)
        raise aio.AbortError()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        try:
            self._context.abort(code, details)
        except Exception:
            # grpc_testing's abort has ended the call; it then raises a bare Exception.
            raise aio.AbortError() from None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(metadata)


class AsyncServicerAdapter:
    """A sync servicer for grpc_testing whose methods run an async servicer's on `loop`."""

    def __init__(self, servicer: object, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        method = getattr(self._servicer, name)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            future = asyncio.run_coroutine_threadsafe(method(request, AsyncContext(context)), self._loop)
            try:
                return future.result(timeout=10)
            except aio.AbortError:
                # The status is already set on the context; grpc_testing ends the call with it.
                return None

        return call


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    reason: str = ""
    domain: str = ""
    fields: list[str] = field(default_factory=list)


@dataclass
class _Call:
    """What rpc_status.from_call reads from a finished call."""

    _trailing_metadata: Any
    _code: grpc.StatusCode
    _details: str

    def trailing_metadata(self) -> Any:
        return self._trailing_metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, name="servicer-loop", daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(timeout=5)
    running.close()


@dataclass
class Harness:
    server: grpc_testing.Server
    database: UntouchableDatabase
    gate: CallGate

    def call(self, service: Any, method: str, request: Any) -> Outcome:
        """Invokes one unary RPC and reads its status, with the rich details of grpc-status-details-bin."""
        rpc = self.server.invoke_unary_unary(service.methods_by_name[method], (), request, None)
        _, trailing_metadata, code, details = rpc.termination()
        outcome = Outcome(code, details)
        rich = rpc_status.from_call(_Call(trailing_metadata, code, details))
        for detail in rich.details if rich is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                outcome.reason, outcome.domain = info.reason, info.domain
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                outcome.fields = [violation.field for violation in bad_request.field_violations]
        return outcome


@pytest.fixture
def harness(loop: asyncio.AbstractEventLoop) -> Harness:
    database, gate = UntouchableDatabase(), CallGate()
    servicers = {
        TRANSACTION_SERVICE: AsyncServicerAdapter(TransactionServicer(database, CURRENCIES, gate), loop),  # type: ignore[arg-type]
        INFO_SERVICE: AsyncServicerAdapter(InfoServicer(database, CURRENCIES, gate), loop),  # type: ignore[arg-type]
    }
    server = grpc_testing.server_from_dictionary(servicers, grpc_testing.strict_real_time())
    return Harness(server, database, gate)


def _timestamp(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


INVALID_REQUESTS = [
    pytest.param(
        TRANSACTION_SERVICE,
        "Deposit",
        transaction_pb.DepositRequest(
            user_id=-1, amount="1e5", source="s" * (limits.MEMO_LENGTH_MAX + 1), idempotency_key=" key"
        ),
        "INVALID_ARGUMENT",
        ["user_id", "amount", "source", "idempotency_key"],
        id="Deposit",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "Deposit",
        transaction_pb.DepositRequest(user_id=0, amount="x", currency="XXX"),
        "UNKNOWN_CURRENCY",
        ["currency", "user_id", "amount"],
        id="Deposit-unknown-currency",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "Withdraw",
        transaction_pb.WithdrawRequest(
            user_id=1,
            amount="0.001",
            destination="iban\x00",
            idempotency_key="k" * (limits.IDEMPOTENCY_KEY_LENGTH_MAX + 1),
        ),
        "INVALID_AMOUNT",
        ["amount", "destination", "idempotency_key"],
        id="Withdraw",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "Transfer",
        transaction_pb.TransferRequest(from_user_id=5, to_user_id=5, amount="1", comment="c" * 501),
        "INVALID_ARGUMENT",
        ["comment", "to_user_id"],
        id="Transfer-to-self",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "Transfer",
        transaction_pb.TransferRequest(from_user_id=0, to_user_id=-1, amount="", currency="usd"),
        "INVALID_ARGUMENT",
        ["from_user_id", "to_user_id", "amount"],
        id="Transfer",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "Reserve",
        transaction_pb.ReserveRequest(
            user_id=0,
            service_id=0,
            order_id=-1,
            amount="1.5",
            currency="JPY",
            service_name="n" * (limits.SERVICE_NAME_LENGTH_MAX + 1),
        ),
        "INVALID_ARGUMENT",
        ["user_id", "service_id", "order_id", "amount", "service_name"],
        id="Reserve",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "ReleaseReserve",
        transaction_pb.ReleaseReserveRequest(order_id=0),
        "INVALID_ARGUMENT",
        ["order_id"],
        id="ReleaseReserve",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "RecognizeRevenue",
        transaction_pb.RecognizeRevenueRequest(user_id=0, service_id=-2, order_id=0, amount="-1"),
        "INVALID_ARGUMENT",
        ["user_id", "service_id", "order_id", "amount"],
        id="RecognizeRevenue",
    ),
    pytest.param(
        INFO_SERVICE,
        "GetBalance",
        info_pb.GetBalanceRequest(user_id=0, currency="US"),
        "INVALID_ARGUMENT",
        ["user_id", "currency"],
        id="GetBalance",
    ),
    pytest.param(
        INFO_SERVICE,
        "ListTransactions",
        info_pb.ListTransactionsRequest(
            user_id=-3,
            sort_by=99,  # type: ignore[arg-type]
            order=99,  # type: ignore[arg-type]
            page_size=-1,
            kinds=[99],  # type: ignore[list-item]
            from_time=_timestamp(10**12),
        ),
        "INVALID_ARGUMENT",
        ["user_id", "sort_by", "order", "page_size", "kinds", "from_time"],
        id="ListTransactions",
    ),
    pytest.param(
        INFO_SERVICE,
        "ListTransactions",
        info_pb.ListTransactionsRequest(
            user_id=1,
            kinds=[1] * (limits.TRANSACTION_KINDS_FILTER_MAX + 1),
            from_time=_timestamp(20),
            to_time=_timestamp(10),
        ),
        "INVALID_ARGUMENT",
        ["kinds", "to_time"],
        id="ListTransactions-kinds-and-range",
    ),
    pytest.param(
        INFO_SERVICE,
        "ListTransactions",
        info_pb.ListTransactionsRequest(user_id=1, page_token="not-a-token"),
        "INVALID_PAGE_TOKEN",
        ["page_token"],
        id="ListTransactions-page-token",
    ),
    pytest.param(
        INFO_SERVICE,
        "GetTransaction",
        info_pb.GetTransactionRequest(transaction_id="not-a-uuid"),
        "INVALID_ARGUMENT",
        ["transaction_id"],
        id="GetTransaction",
    ),
    pytest.param(
        INFO_SERVICE,
        "GetTransaction",
        info_pb.GetTransactionRequest(transaction_id="0" * 37),
        "INVALID_ARGUMENT",
        ["transaction_id"],
        id="GetTransaction-too-long",
    ),
    pytest.param(
        INFO_SERVICE,
        "GetOrder",
        info_pb.GetOrderRequest(order_id=-7),
        "INVALID_ARGUMENT",
        ["order_id"],
        id="GetOrder",
    ),
]


@pytest.mark.parametrize(("service", "method", "request_message", "reason", "fields"), INVALID_REQUESTS)
def test_invalid_requests_are_refused_before_any_database_work(
    harness, service, method, request_message, reason, fields
):
    """Each RPC answers a bad request with INVALID_ARGUMENT naming every bad field, and never touches the database."""
    outcome = harness.call(service, method, request_message)
    assert (outcome.code, outcome.reason, outcome.domain) == (grpc.StatusCode.INVALID_ARGUMENT, reason, "balance.v1")
    assert sorted(outcome.fields) == sorted(fields)
    assert harness.database.touched == []


def test_a_refused_request_gives_its_gate_place_back(harness):
    """After a refused request the call gate counts no call in flight."""
    harness.call(TRANSACTION_SERVICE, "Deposit", transaction_pb.DepositRequest(user_id=0, amount="1"))
    assert harness.gate.in_flight == 0


VALID_REQUESTS = [
    pytest.param(TRANSACTION_SERVICE, "Deposit", transaction_pb.DepositRequest(user_id=1, amount="1"), id="Deposit"),
    pytest.param(TRANSACTION_SERVICE, "Withdraw", transaction_pb.WithdrawRequest(user_id=1, amount="1"), id="Withdraw"),
    pytest.param(
        TRANSACTION_SERVICE,
        "Transfer",
        transaction_pb.TransferRequest(from_user_id=1, to_user_id=2, amount="1"),
        id="Transfer",
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "Reserve",
        transaction_pb.ReserveRequest(user_id=1, service_id=2, order_id=3, amount="1"),
        id="Reserve",
    ),
    pytest.param(
        TRANSACTION_SERVICE, "ReleaseReserve", transaction_pb.ReleaseReserveRequest(order_id=3), id="ReleaseReserve"
    ),
    pytest.param(
        TRANSACTION_SERVICE,
        "RecognizeRevenue",
        transaction_pb.RecognizeRevenueRequest(user_id=1, service_id=2, order_id=3),
        id="RecognizeRevenue",
    ),
    pytest.param(INFO_SERVICE, "GetBalance", info_pb.GetBalanceRequest(user_id=1), id="GetBalance"),
    pytest.param(INFO_SERVICE, "ListTransactions", info_pb.ListTransactionsRequest(user_id=1), id="ListTransactions"),
    pytest.param(
        INFO_SERVICE,
        "GetTransaction",
        info_pb.GetTransactionRequest(transaction_id="0b7e6a2c-9c1d-4f1e-8a3b-2d5c7e9f1a2b"),
        id="GetTransaction",
    ),
    pytest.param(INFO_SERVICE, "GetOrder", info_pb.GetOrderRequest(order_id=3), id="GetOrder"),
]


@pytest.mark.parametrize(("service", "method", "request_message"), VALID_REQUESTS)
def test_valid_requests_reach_the_database_and_unexpected_errors_are_internal(
    harness, service, method, request_message
):
    """A valid request gets past validation to the database (so the refusals above are not vacuous);
    the stand-in's unexpected error becomes INTERNAL with a fixed message and no traceback."""
    outcome = harness.call(service, method, request_message)
    assert harness.database.touched != []
    assert (outcome.code, outcome.details, outcome.reason) == (
        grpc.StatusCode.INTERNAL,
        "internal error; see the server's log",
        "",
    )
    assert harness.gate.in_flight == 0


@pytest.mark.parametrize(
    ("service", "method", "request_message"),
    [
        (TRANSACTION_SERVICE, "Deposit", transaction_pb.DepositRequest(user_id=1, amount="1")),
        (TRANSACTION_SERVICE, "Deposit", transaction_pb.DepositRequest(user_id=0, amount="bad")),
        (INFO_SERVICE, "GetBalance", info_pb.GetBalanceRequest(user_id=1)),
    ],
    ids=["valid", "invalid", "read"],
)
def test_a_full_call_gate_refuses_at_once(harness, service, method, request_message):
    """With the gate at its limit every call, valid or not, is RESOURCE_EXHAUSTED (TOO_MANY_CALLS) without
    database work, and the refused call does not change the count."""
    harness.gate.in_flight = harness.gate.limit
    outcome = harness.call(service, method, request_message)
    assert (outcome.code, outcome.reason, outcome.domain) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_CALLS",
        "balance.v1",
    )
    assert harness.database.touched == []
    assert harness.gate.in_flight == harness.gate.limit


def test_one_place_below_the_limit_a_call_is_served(harness):
    """With one place left the call passes the gate (here to validation, which refuses it)."""
    harness.gate.in_flight = harness.gate.limit - 1
    outcome = harness.call(TRANSACTION_SERVICE, "Deposit", transaction_pb.DepositRequest(user_id=0, amount="1"))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.gate.in_flight == harness.gate.limit - 1


def test_a_forged_page_token_is_invalid_argument_not_internal(harness):
    """A page token with a correct checksum but a number for its transaction id is INVALID_ARGUMENT."""
    # The query a request with only user_id set asks for: newest first, every kind, any time.
    query = HistoryQuery(
        user_id=1,
        sort_by=SortField.DATE,
        descending=True,
        kinds=frozenset(),
        from_time=None,
        to_time=None,
        page_size=limits.PAGE_SIZE_DEFAULT,
    )
    payload = json.dumps([1, query.fingerprint(), 0, 5]).encode()
    token = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()[:6] + payload).decode().rstrip("=")
    request = info_pb.ListTransactionsRequest(user_id=1, page_token=token)
    outcome = harness.call(INFO_SERVICE, "ListTransactions", request)
    assert (outcome.code, outcome.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
    assert harness.database.touched == []
