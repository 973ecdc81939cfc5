"""Every RPC as data both clients run: its method path, the request built from Python arguments,
how to turn the response into the client's objects, and whether repeating it is safe after a
deadline passed. The blocking and the asyncio client differ only in how they send these."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from google.protobuf import descriptor, message
from grpc_health.v1 import health_pb2

from balance.v1 import (
    info_service_pb2,
    report_service_pb2,
    transaction_service_pb2,
    types_pb2,
)

from . import models
from .models import Amount, SortField, SortOrder, TransactionKind

Request = TypeVar("Request", bound=message.Message)
Response = TypeVar("Response", bound=message.Message)
Result = TypeVar("Result")

REPLAY_HEADER = "x-idempotent-replay"


@dataclass(frozen=True, slots=True)
class Unary(Generic[Request, Response, Result]):
    """One unary call, ready to send."""

    method: str
    request: Request
    response_type: type[Response]
    convert: Callable[[Response, Mapping[str, str]], Result]
    """The response and its trailing metadata to the result."""
    keyed: bool
    """True when the request carries an idempotency key (or is keyed by its order), so repeating
    it after DEADLINE_EXCEEDED cannot apply it twice."""


@dataclass(frozen=True, slots=True)
class Stream(Generic[Request]):
    """One download (a stream of ReportChunk)."""

    method: str
    request: Request


def serialize(value: message.Message) -> bytes:
    return value.SerializeToString()


def _path(service: descriptor.ServiceDescriptor, name: str) -> str:
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


_TRANSACTIONS = transaction_service_pb2.DESCRIPTOR.services_by_name["TransactionService"]
_INFO = info_service_pb2.DESCRIPTOR.services_by_name["InfoService"]
_REPORTS = report_service_pb2.DESCRIPTOR.services_by_name["ReportService"]
_SORT_FIELDS = {SortField.DATE: info_service_pb2.SORT_FIELD_DATE, SortField.AMOUNT: info_service_pb2.SORT_FIELD_AMOUNT}
_SORT_ORDERS = {
    SortOrder.DESCENDING: info_service_pb2.SORT_ORDER_DESC,
    SortOrder.ASCENDING: info_service_pb2.SORT_ORDER_ASC,
}


class _MoneyResponse(Protocol):
    @property
    def transaction(self) -> types_pb2.Transaction: ...
    @property
    def accounts(self) -> Iterable[types_pb2.Account]: ...


def _receipt(response: _MoneyResponse, trailing_metadata: Mapping[str, str]) -> models.Receipt:
    assert isinstance(response, message.Message)
    return models.Receipt(
        transaction=models.transaction(response.transaction),
        accounts=tuple(models.account(item) for item in response.accounts),
        replayed=trailing_metadata.get(REPLAY_HEADER) == "true",
        proto=response,
    )


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def deposit(
    user_id: int, amount: Amount, *, currency: str, source: str, idempotency_key: str | None
) -> Unary[transaction_service_pb2.DepositRequest, transaction_service_pb2.DepositResponse, models.Receipt]:
    request = transaction_service_pb2.DepositRequest(
        user_id=user_id,
        amount=models.wire_amount(amount),
        currency=currency,
        source=source,
        idempotency_key=idempotency_key or new_idempotency_key(),
    )
    return Unary(_path(_TRANSACTIONS, "Deposit"), request, transaction_service_pb2.DepositResponse, _receipt, True)


def withdraw(
    user_id: int, amount: Amount, *, currency: str, destination: str, idempotency_key: str | None
) -> Unary[transaction_service_pb2.WithdrawRequest, transaction_service_pb2.WithdrawResponse, models.Receipt]:
    request = transaction_service_pb2.WithdrawRequest(
        user_id=user_id,
        amount=models.wire_amount(amount),
        currency=currency,
        destination=destination,
        idempotency_key=idempotency_key or new_idempotency_key(),
    )
    return Unary(_path(_TRANSACTIONS, "Withdraw"), request, transaction_service_pb2.WithdrawResponse, _receipt, True)


def transfer(
    from_user_id: int, to_user_id: int, amount: Amount, *, currency: str, comment: str, idempotency_key: str | None
) -> Unary[transaction_service_pb2.TransferRequest, transaction_service_pb2.TransferResponse, models.Receipt]:
    request = transaction_service_pb2.TransferRequest(
        from_user_id=from_user_id,
        to_user_id=to_user_id,
        amount=models.wire_amount(amount),
        currency=currency,
        comment=comment,
        idempotency_key=idempotency_key or new_idempotency_key(),
    )
    return Unary(_path(_TRANSACTIONS, "Transfer"), request, transaction_service_pb2.TransferResponse, _receipt, True)


def reserve(
    user_id: int, service_id: int, order_id: int, amount: Amount, *, currency: str, service_name: str
) -> Unary[transaction_service_pb2.ReserveRequest, transaction_service_pb2.ReserveResponse, models.Receipt]:
    # The order id is the reserve's idempotency key: the same request again is a replay.
    request = transaction_service_pb2.ReserveRequest(
        user_id=user_id,
        service_id=service_id,
        order_id=order_id,
        amount=models.wire_amount(amount),
        currency=currency,
        service_name=service_name,
    )
    return Unary(_path(_TRANSACTIONS, "Reserve"), request, transaction_service_pb2.ReserveResponse, _receipt, True)


def release_reserve(
    order_id: int,
) -> Unary[
    transaction_service_pb2.ReleaseReserveRequest, transaction_service_pb2.ReleaseReserveResponse, models.Receipt
]:
    # Naturally idempotent: releasing a released order replays the release.
    request = transaction_service_pb2.ReleaseReserveRequest(order_id=order_id)
    response_type = transaction_service_pb2.ReleaseReserveResponse
    return Unary(_path(_TRANSACTIONS, "ReleaseReserve"), request, response_type, _receipt, True)


def recognize_revenue(
    user_id: int, service_id: int, order_id: int, amount: Amount | None
) -> Unary[
    transaction_service_pb2.RecognizeRevenueRequest, transaction_service_pb2.RecognizeRevenueResponse, models.Receipt
]:
    # Naturally idempotent: recognizing the same amount again replays the first recognition.
    request = transaction_service_pb2.RecognizeRevenueRequest(
        user_id=user_id, service_id=service_id, order_id=order_id, amount=models.wire_amount(amount)
    )
    response_type = transaction_service_pb2.RecognizeRevenueResponse
    return Unary(_path(_TRANSACTIONS, "RecognizeRevenue"), request, response_type, _receipt, True)


def _accounts(response: info_service_pb2.GetBalanceResponse, _: Mapping[str, str]) -> tuple[models.Account, ...]:
    return tuple(models.account(item) for item in response.accounts)


def get_balance(
    user_id: int, *, currency: str
) -> Unary[info_service_pb2.GetBalanceRequest, info_service_pb2.GetBalanceResponse, tuple[models.Account, ...]]:
    request = info_service_pb2.GetBalanceRequest(user_id=user_id, currency=currency)
    return Unary(_path(_INFO, "GetBalance"), request, info_service_pb2.GetBalanceResponse, _accounts, False)


def list_transactions(
    user_id: int,
    *,
    sort_by: SortField,
    order: SortOrder,
    page_size: int,
    page_token: str,
    kinds: Iterable[TransactionKind],
    since: datetime | None,
    until: datetime | None,
) -> Unary[info_service_pb2.ListTransactionsRequest, info_service_pb2.ListTransactionsResponse, models.TransactionPage]:
    request = info_service_pb2.ListTransactionsRequest(
        user_id=user_id,
        sort_by=_SORT_FIELDS[SortField(sort_by)],
        order=_SORT_ORDERS[SortOrder(order)],
        page_size=page_size,
        page_token=page_token,
        kinds=[models.TRANSACTION_KINDS[TransactionKind(kind)] for kind in kinds],
        from_time=models.timestamp(since) if since is not None else None,
        to_time=models.timestamp(until) if until is not None else None,
    )
    return Unary(
        _path(_INFO, "ListTransactions"),
        request,
        info_service_pb2.ListTransactionsResponse,
        lambda response, _: models.page(response),
        False,
    )


def next_page(
    call: Unary[info_service_pb2.ListTransactionsRequest, info_service_pb2.ListTransactionsResponse, Result],
    page_token: str,
) -> Unary[info_service_pb2.ListTransactionsRequest, info_service_pb2.ListTransactionsResponse, Result]:
    """The same query continued after a page (the token is bound to its filters and sort)."""
    request = info_service_pb2.ListTransactionsRequest()
    request.CopyFrom(call.request)
    request.page_token = page_token
    return Unary(call.method, request, call.response_type, call.convert, call.keyed)


def get_transaction(
    transaction_id: str | uuid.UUID,
) -> Unary[info_service_pb2.GetTransactionRequest, info_service_pb2.GetTransactionResponse, models.Transaction]:
    request = info_service_pb2.GetTransactionRequest(transaction_id=str(transaction_id))
    return Unary(
        _path(_INFO, "GetTransaction"),
        request,
        info_service_pb2.GetTransactionResponse,
        lambda response, _: models.transaction(response.transaction),
        False,
    )


def get_order(
    order_id: int,
) -> Unary[info_service_pb2.GetOrderRequest, info_service_pb2.GetOrderResponse, models.Order]:
    request = info_service_pb2.GetOrderRequest(order_id=order_id)
    return Unary(
        _path(_INFO, "GetOrder"),
        request,
        info_service_pb2.GetOrderResponse,
        lambda response, _: models.order(response.order),
        False,
    )


def revenue_report(
    year: int, month: int, *, currency: str, time_zone: str
) -> Stream[report_service_pb2.RevenueReportRequest]:
    request = report_service_pb2.RevenueReportRequest(year=year, month=month, currency=currency, time_zone=time_zone)
    return Stream(_path(_REPORTS, "GetRevenueReport"), request)


def statement(
    user_id: int, *, since: datetime | None, until: datetime | None, kinds: Iterable[TransactionKind]
) -> Stream[report_service_pb2.ExportTransactionsRequest]:
    request = report_service_pb2.ExportTransactionsRequest(
        user_id=user_id,
        from_time=models.timestamp(since) if since is not None else None,
        to_time=models.timestamp(until) if until is not None else None,
        kinds=[models.TRANSACTION_KINDS[TransactionKind(kind)] for kind in kinds],
    )
    return Stream(_path(_REPORTS, "ExportTransactions"), request)


REPORT_CHUNK = report_service_pb2.ReportChunk


def _serving_status(response: health_pb2.HealthCheckResponse, _: Mapping[str, str]) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def health(service: str) -> Unary[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, str]:
    """grpc.health.v1.Health/Check of one service ("" for the server as a whole)."""
    request = health_pb2.HealthCheckRequest(service=service)
    return Unary("/grpc.health.v1.Health/Check", request, health_pb2.HealthCheckResponse, _serving_status, False)
