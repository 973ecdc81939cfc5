"""Models -> protobuf messages. Amounts leave as exact decimal strings of their currency."""

from __future__ import annotations

import calendar
from datetime import datetime

from google.protobuf import timestamp_pb2

from balance.v1 import types_pb2
from balance_server import models
from balance_server.money import Currencies

ACCOUNT_KINDS = {
    models.AccountKind.REGULAR: types_pb2.ACCOUNT_KIND_REGULAR,
    models.AccountKind.RESERVE: types_pb2.ACCOUNT_KIND_RESERVE,
}
TRANSACTION_KINDS = {
    models.TransactionKind.DEPOSIT: types_pb2.TRANSACTION_KIND_DEPOSIT,
    models.TransactionKind.WITHDRAWAL: types_pb2.TRANSACTION_KIND_WITHDRAWAL,
    models.TransactionKind.TRANSFER: types_pb2.TRANSACTION_KIND_TRANSFER,
    models.TransactionKind.RESERVE: types_pb2.TRANSACTION_KIND_RESERVE,
    models.TransactionKind.RELEASE: types_pb2.TRANSACTION_KIND_RELEASE,
    models.TransactionKind.REVENUE: types_pb2.TRANSACTION_KIND_REVENUE,
}
TRANSACTION_KINDS_FROM_PROTO: dict[int, models.TransactionKind] = {
    int(number): kind for kind, number in TRANSACTION_KINDS.items()
}
ORDER_STATUSES = {
    models.OrderStatus.RESERVED: types_pb2.ORDER_STATUS_RESERVED,
    models.OrderStatus.CAPTURED: types_pb2.ORDER_STATUS_CAPTURED,
    models.OrderStatus.RELEASED: types_pb2.ORDER_STATUS_RELEASED,
}


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    # Built from the POSIX time directly: Timestamp.FromDatetime is pure Python and several times
    # slower, and every response carries a few timestamps.
    seconds = calendar.timegm(moment.utctimetuple()) if moment.tzinfo is None else int(moment.timestamp() // 1)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=moment.microsecond * 1000)


def account(value: models.Account, currencies: Currencies) -> types_pb2.Account:
    return types_pb2.Account(
        user_id=value.user_id,
        kind=ACCOUNT_KINDS[value.kind],
        currency=value.currency,
        balance=currencies.format(value.balance, value.currency),
        updated_at=timestamp(value.updated_at),
    )


def transaction(value: models.Transaction, currencies: Currencies) -> types_pb2.Transaction:
    return types_pb2.Transaction(
        transaction_id=str(value.transaction_id),
        kind=TRANSACTION_KINDS[value.kind],
        amount=currencies.format(value.amount, value.currency),
        currency=value.currency,
        created_at=timestamp(value.created_at),
        description=value.description,
        from_user_id=value.from_user_id or 0,
        to_user_id=value.to_user_id or 0,
        order_id=value.order_id or 0,
        service_id=value.service_id or 0,
        idempotency_key=value.idempotency_key or "",
    )


def order(value: models.Order, currencies: Currencies) -> types_pb2.Order:
    return types_pb2.Order(
        order_id=value.order_id,
        user_id=value.user_id,
        service_id=value.service_id,
        service_name=value.service_name,
        currency=value.currency,
        reserved_amount=currencies.format(value.reserved_amount, value.currency),
        captured_amount=currencies.format(value.captured_amount, value.currency),
        released_amount=currencies.format(value.released_amount, value.currency),
        status=ORDER_STATUSES[value.status],
        created_at=timestamp(value.created_at),
        updated_at=timestamp(value.updated_at),
    )
