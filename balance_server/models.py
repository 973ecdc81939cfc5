"""What the ledger returns: small immutable records with amounts in minor units."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime


class AccountKind(enum.StrEnum):
    REGULAR = "regular"
    RESERVE = "reserve"


class TransactionKind(enum.StrEnum):
    DEPOSIT = "deposit"
    WITHDRAWAL = "withdrawal"
    TRANSFER = "transfer"
    RESERVE = "reserve"
    RELEASE = "release"
    REVENUE = "revenue"


class OrderStatus(enum.StrEnum):
    RESERVED = "reserved"
    CAPTURED = "captured"
    RELEASED = "released"


class SortField(enum.StrEnum):
    DATE = "date"
    AMOUNT = "amount"


@dataclass(frozen=True)
class Account:
    user_id: int
    kind: AccountKind
    currency: str
    balance: int
    updated_at: datetime


@dataclass(frozen=True)
class Transaction:
    transaction_id: uuid.UUID
    kind: TransactionKind
    amount: int
    currency: str
    created_at: datetime
    description: str
    from_user_id: int | None
    to_user_id: int | None
    order_id: int | None
    service_id: int | None
    idempotency_key: str | None


@dataclass(frozen=True)
class Receipt:
    """The outcome of a money operation: the transaction and the affected user's accounts."""

    transaction: Transaction
    accounts: tuple[Account, ...]
    replayed: bool
    """True when the request repeated an earlier one and nothing moved this time."""


@dataclass(frozen=True)
class Order:
    order_id: int
    user_id: int
    service_id: int
    service_name: str
    currency: str
    status: OrderStatus
    reserved_amount: int
    captured_amount: int
    released_amount: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TransactionPage:
    transactions: tuple[Transaction, ...]
    more: bool
    """Whether rows follow this page in the query's order."""
