"""What the client returns: small, frozen, typed objects with exact `Decimal` amounts and aware
`datetime`s, each keeping the protobuf message it came from in `.proto`. Also the conversions of
amounts and times into requests, the one place where the client touches either."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path

from google.protobuf import message, timestamp_pb2

from balance.v1 import info_service_pb2, types_pb2

Amount = Decimal | str | int
"""An amount as callers may give it: a `Decimal`, a plain decimal string such as "199.99", or an
int. Never a float: binary floating point cannot hold most decimal amounts exactly."""


class AccountKind(StrEnum):
    REGULAR = "regular"
    """Money the user can spend, withdraw or transfer."""
    RESERVE = "reserve"
    """Money held for the user's open orders."""


class TransactionKind(StrEnum):
    DEPOSIT = "deposit"
    WITHDRAWAL = "withdrawal"
    TRANSFER = "transfer"
    RESERVE = "reserve"
    RELEASE = "release"
    REVENUE = "revenue"


class OrderStatus(StrEnum):
    RESERVED = "reserved"
    CAPTURED = "captured"
    RELEASED = "released"


class SortField(StrEnum):
    DATE = "date"
    AMOUNT = "amount"


class SortOrder(StrEnum):
    DESCENDING = "desc"
    """Newest or largest first (the server's default)."""
    ASCENDING = "asc"


@dataclass(frozen=True, slots=True)
class Account:
    """One account of one user in one currency, as it was when the call answered."""

    user_id: int
    kind: AccountKind
    currency: str
    balance: Decimal
    updated_at: datetime
    proto: types_pb2.Account = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One money movement as the ledger recorded it. Ids the transaction does not have are None."""

    transaction_id: uuid.UUID
    kind: TransactionKind
    amount: Decimal
    currency: str
    created_at: datetime
    description: str
    from_user_id: int | None
    to_user_id: int | None
    order_id: int | None
    service_id: int | None
    idempotency_key: str | None
    proto: types_pb2.Transaction = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a money operation answers: the transaction it wrote and the affected user's accounts
    in its currency after it. `replayed` is True when the call repeated an earlier one (same key
    or same order) and so moved nothing this time: `transaction` is the original."""

    transaction: Transaction
    accounts: tuple[Account, ...]
    replayed: bool
    proto: message.Message = field(repr=False, compare=False)

    def balance(self, kind: AccountKind = AccountKind.REGULAR) -> Decimal:
        """The balance of the returned account of that kind (the regular one by default).

        Example::

            receipt = client.reserve(1, 7, 2, Decimal("170000"))
            print(receipt.balance(), receipt.balance(AccountKind.RESERVE))
        """
        for account in self.accounts:
            if account.kind == kind:
                return account.balance
        raise LookupError(f"the receipt holds no {kind} account")


@dataclass(frozen=True, slots=True)
class TransactionPage:
    """One page of a user's history; `next_page_token` is empty on the last page."""

    transactions: tuple[Transaction, ...]
    next_page_token: str
    proto: info_service_pb2.ListTransactionsResponse = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Order:
    """An order's reserved money and what became of it."""

    order_id: int
    user_id: int
    service_id: int
    service_name: str
    currency: str
    status: OrderStatus
    reserved_amount: Decimal
    captured_amount: Decimal
    released_amount: Decimal
    created_at: datetime
    updated_at: datetime
    proto: types_pb2.Order = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Download:
    """A downloaded CSV file whose SHA-256 matched the server's."""

    filename: str
    """The name the server gave the file (`content-disposition`)."""
    path: Path | None
    """Where it was saved, or None when it was written to a file object."""
    size_bytes: int
    row_count: int
    """Lines after the header, as the server counted them (`x-row-count`)."""
    sha256: str


_ACCOUNT_KINDS: Mapping[int, AccountKind] = {
    types_pb2.ACCOUNT_KIND_REGULAR: AccountKind.REGULAR,
    types_pb2.ACCOUNT_KIND_RESERVE: AccountKind.RESERVE,
}
TRANSACTION_KINDS: Mapping[TransactionKind, types_pb2.TransactionKind.ValueType] = {
    TransactionKind.DEPOSIT: types_pb2.TRANSACTION_KIND_DEPOSIT,
    TransactionKind.WITHDRAWAL: types_pb2.TRANSACTION_KIND_WITHDRAWAL,
    TransactionKind.TRANSFER: types_pb2.TRANSACTION_KIND_TRANSFER,
    TransactionKind.RESERVE: types_pb2.TRANSACTION_KIND_RESERVE,
    TransactionKind.RELEASE: types_pb2.TRANSACTION_KIND_RELEASE,
    TransactionKind.REVENUE: types_pb2.TRANSACTION_KIND_REVENUE,
}
_TRANSACTION_KINDS_FROM_PROTO: Mapping[int, TransactionKind] = {
    number: kind for kind, number in TRANSACTION_KINDS.items()
}
_ORDER_STATUSES: Mapping[int, OrderStatus] = {
    types_pb2.ORDER_STATUS_RESERVED: OrderStatus.RESERVED,
    types_pb2.ORDER_STATUS_CAPTURED: OrderStatus.CAPTURED,
    types_pb2.ORDER_STATUS_RELEASED: OrderStatus.RELEASED,
}


def wire_amount(amount: Amount | None) -> str:
    """The amount as the plain decimal string the API takes ("" for None). Refuses floats (and
    bools) with TypeError; the server judges everything else, so its INVALID_AMOUNT names the field."""
    if amount is None:
        return ""
    if isinstance(amount, Decimal):
        # "f" never writes an exponent: Decimal("1E+2") goes as "100", which the server accepts.
        return format(amount, "f")
    if isinstance(amount, str):
        return amount
    if isinstance(amount, int) and not isinstance(amount, bool):
        return str(amount)
    raise TypeError(
        f"an amount must be a Decimal, a str or an int, not {type(amount).__name__}: "
        "a float cannot hold most decimal amounts exactly"
    )


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime; a naive one is refused, since its instant is unknown."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no time zone: pass an aware datetime")
    message_ = timestamp_pb2.Timestamp()
    message_.FromDatetime(moment.astimezone(UTC))
    return message_


def _moment(value: timestamp_pb2.Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def account(proto: types_pb2.Account) -> Account:
    return Account(
        user_id=proto.user_id,
        kind=_ACCOUNT_KINDS[proto.kind],
        currency=proto.currency,
        balance=Decimal(proto.balance),
        updated_at=_moment(proto.updated_at),
        proto=proto,
    )


def transaction(proto: types_pb2.Transaction) -> Transaction:
    return Transaction(
        transaction_id=uuid.UUID(proto.transaction_id),
        kind=_TRANSACTION_KINDS_FROM_PROTO[proto.kind],
        amount=Decimal(proto.amount),
        currency=proto.currency,
        created_at=_moment(proto.created_at),
        description=proto.description,
        from_user_id=proto.from_user_id or None,
        to_user_id=proto.to_user_id or None,
        order_id=proto.order_id or None,
        service_id=proto.service_id or None,
        idempotency_key=proto.idempotency_key or None,
        proto=proto,
    )


def order(proto: types_pb2.Order) -> Order:
    return Order(
        order_id=proto.order_id,
        user_id=proto.user_id,
        service_id=proto.service_id,
        service_name=proto.service_name,
        currency=proto.currency,
        status=_ORDER_STATUSES[proto.status],
        reserved_amount=Decimal(proto.reserved_amount),
        captured_amount=Decimal(proto.captured_amount),
        released_amount=Decimal(proto.released_amount),
        created_at=_moment(proto.created_at),
        updated_at=_moment(proto.updated_at),
        proto=proto,
    )


def page(proto: info_service_pb2.ListTransactionsResponse) -> TransactionPage:
    return TransactionPage(
        transactions=tuple(transaction(item) for item in proto.transactions),
        next_page_token=proto.next_page_token,
        proto=proto,
    )
