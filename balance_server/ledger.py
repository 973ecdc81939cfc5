"""The use cases: one async function each, owning its control flow. No gRPC here: callers pass
validated commands with amounts in minor units and get models or domain errors back."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, LiteralString

import psycopg

from balance_server.db import sql
from balance_server.db.database import Database, Work
from balance_server.errors import AccountNotFound, OrderNotFound, TransactionNotFound, ledger_error
from balance_server.models import (
    Account,
    AccountKind,
    Order,
    OrderStatus,
    Receipt,
    SortField,
    Transaction,
    TransactionKind,
    TransactionPage,
)
from balance_server.pagination import HistoryQuery, Position


@dataclass(frozen=True)
class Deposit:
    user_id: int
    currency: str
    amount: int
    source: str
    idempotency_key: str | None


@dataclass(frozen=True)
class Withdraw:
    user_id: int
    currency: str
    amount: int
    destination: str
    idempotency_key: str | None


@dataclass(frozen=True)
class Transfer:
    from_user_id: int
    to_user_id: int
    currency: str
    amount: int
    comment: str
    idempotency_key: str | None


@dataclass(frozen=True)
class Reserve:
    user_id: int
    service_id: int
    order_id: int
    currency: str
    amount: int
    service_name: str


@dataclass(frozen=True)
class RecognizeRevenue:
    user_id: int
    service_id: int
    order_id: int
    amount: Decimal | None
    """In the order's currency; None recognizes all that is reserved."""


async def deposit(database: Database, command: Deposit, *, deadline: float | None) -> Receipt:
    arguments = (command.user_id, command.currency, command.amount, command.source, command.idempotency_key)
    async with database.user_locks.hold(command.user_id):
        return await _operate(
            database, sql.DEPOSIT, arguments, deadline, repeatable=command.idempotency_key is not None
        )


async def withdraw(database: Database, command: Withdraw, *, deadline: float | None) -> Receipt:
    arguments = (command.user_id, command.currency, command.amount, command.destination, command.idempotency_key)
    async with database.user_locks.hold(command.user_id):
        return await _operate(
            database, sql.WITHDRAW, arguments, deadline, repeatable=command.idempotency_key is not None
        )


async def transfer(database: Database, command: Transfer, *, deadline: float | None) -> Receipt:
    arguments = (
        command.from_user_id,
        command.to_user_id,
        command.currency,
        command.amount,
        command.comment,
        command.idempotency_key,
    )
    async with database.user_locks.hold(command.from_user_id, command.to_user_id):
        return await _operate(
            database, sql.TRANSFER, arguments, deadline, repeatable=command.idempotency_key is not None
        )


async def reserve(database: Database, command: Reserve, *, deadline: float | None) -> Receipt:
    arguments = (
        command.user_id,
        command.service_id,
        command.order_id,
        command.currency,
        command.amount,
        command.service_name,
    )
    async with database.user_locks.hold(command.user_id):
        return await _operate(database, sql.RESERVE, arguments, deadline, repeatable=True)


async def release_reserve(database: Database, order_id: int, *, deadline: float | None) -> Receipt:
    return await _operate(database, sql.RELEASE_RESERVE, (order_id,), deadline, repeatable=True)


async def recognize_revenue(database: Database, command: RecognizeRevenue, *, deadline: float | None) -> Receipt:
    arguments = (command.user_id, command.service_id, command.order_id, command.amount)
    # The request names the order's user; if it names another, the ledger refuses it anyway.
    async with database.user_locks.hold(command.user_id):
        return await _operate(database, sql.RECOGNIZE_REVENUE, arguments, deadline, repeatable=True)


async def get_balance(database: Database, user_id: int, currency: str | None) -> tuple[Account, ...]:
    rows = await database.read(_fetch_all(sql.ACCOUNTS_OF_USER, {"user_id": user_id, "currency": currency}))
    if not rows:
        where = f" in {currency}" if currency else ""
        raise AccountNotFound(
            f"user {user_id} has no accounts{where}: they are created by the first deposit",
            metadata={"user_id": str(user_id), **({"currency": currency} if currency else {})},
        )
    return tuple(
        Account(user_id, AccountKind(kind), code, balance, updated) for user_id, kind, code, balance, updated in rows
    )


async def get_transaction(database: Database, transaction_id: uuid.UUID) -> Transaction:
    rows = await database.read(_fetch_all(sql.TRANSACTION_BY_ID, (transaction_id,)))
    if not rows:
        raise TransactionNotFound(
            f"transaction {transaction_id} does not exist", metadata={"transaction_id": str(transaction_id)}
        )
    return _transaction(rows[0])


async def get_order(database: Database, order_id: int) -> Order:
    rows = await database.read(_fetch_all(sql.ORDER_BY_ID, (order_id,)))
    if not rows:
        raise OrderNotFound(f"order {order_id} does not exist", metadata={"order_id": str(order_id)})
    (order_id, user_id, service_id, service_name, currency, status, reserved, captured, released, created, updated) = (
        rows[0]
    )
    return Order(
        order_id,
        user_id,
        service_id,
        service_name,
        currency,
        OrderStatus(status),
        reserved,
        captured,
        released,
        created,
        updated,
    )


_HISTORY_QUERIES: dict[tuple[SortField, bool], LiteralString] = {
    (SortField.DATE, True): sql.HISTORY_BY_DATE_DESC,
    (SortField.DATE, False): sql.HISTORY_BY_DATE_ASC,
    (SortField.AMOUNT, True): sql.HISTORY_BY_AMOUNT_DESC,
    (SortField.AMOUNT, False): sql.HISTORY_BY_AMOUNT_ASC,
}
_ALL_KINDS = [kind.value for kind in TransactionKind]
_UUID_MAX = uuid.UUID(int=2**128 - 1)
_UUID_MIN = uuid.UUID(int=0)
_AMOUNT_BEYOND_ANY = 2**63 - 1


async def list_transactions(database: Database, query: HistoryQuery, after: Position | None) -> TransactionPage:
    """One page of the user's history, starting after `after` (None: the first page)."""
    first_page = after is None
    if after is None:
        after = _before_first(query)
    parameters = {
        "user_id": query.user_id,
        "from_time": query.from_time or datetime.min.replace(tzinfo=UTC),
        "to_time": query.to_time or datetime.max.replace(tzinfo=UTC),
        "kinds": sorted(kind.value for kind in query.kinds) or _ALL_KINDS,
        "after_value": after.value,
        "after_id": after.transaction_id,
        # One row more than the page tells whether another page follows.
        "limit": query.page_size + 1,
    }
    rows = await database.read(_fetch_all(_HISTORY_QUERIES[query.sort_by, query.descending], parameters))
    transactions = tuple(_transaction(row) for row in rows[: query.page_size])
    if first_page and not transactions and not await user_has_accounts(database, query.user_id):
        raise AccountNotFound(
            f"user {query.user_id} has no accounts: they are created by the first deposit",
            metadata={"user_id": str(query.user_id)},
        )
    return TransactionPage(transactions, more=len(rows) > query.page_size)


async def user_has_accounts(database: Database, user_id: int) -> bool:
    rows = await database.read(_fetch_all(sql.USER_HAS_ACCOUNTS, (user_id,)))
    return bool(rows[0][0])


def _before_first(query: HistoryQuery) -> Position:
    """A keyset position before every row in the query's order. In date order it also holds the
    time bound the scan starts from (see sql._history_page): newest first, (to_time, the least id)
    comes after every row created before to_time; oldest first, (from_time, the least id) comes
    before every row created at or after from_time (no transaction has the nil UUID)."""
    if query.sort_by is SortField.DATE:
        if query.descending:
            if query.to_time is not None:
                return Position(query.to_time, _UUID_MIN)
            return Position(datetime.max.replace(tzinfo=UTC), _UUID_MAX)
        return Position(query.from_time or datetime.min.replace(tzinfo=UTC), _UUID_MIN)
    if query.descending:
        return Position(_AMOUNT_BEYOND_ANY, _UUID_MAX)
    return Position(0, _UUID_MIN)


async def delete_expired_idempotency_keys(database: Database, retention_days: int) -> int:
    async def work(connection: psycopg.AsyncConnection[Any]) -> int:
        cursor = await connection.execute(sql.DELETE_EXPIRED_IDEMPOTENCY_KEYS, (retention_days,))
        return cursor.rowcount

    return await database.serializable(work, deadline=None, repeatable=True)


async def _operate(
    database: Database, query: LiteralString, arguments: Sequence[object], deadline: float | None, *, repeatable: bool
) -> Receipt:
    """Runs one ledger function. `repeatable`: running it twice cannot apply it twice (it is keyed)."""

    async def work(connection: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
        cursor = await connection.execute(query, arguments)
        row = await cursor.fetchone()
        assert row is not None, "a ledger function returns exactly one row"
        return tuple(row)

    row = await database.serializable(work, deadline=deadline, repeatable=repeatable)
    return _receipt(row)


def _receipt(row: tuple[Any, ...]) -> Receipt:
    (error_reason, error_metadata, replayed, *transaction_columns) = row[:14]
    if error_reason is not None:
        raise ledger_error(error_reason, error_metadata)
    transaction = _transaction(tuple(transaction_columns))
    user_id, regular_balance, regular_updated, reserve_balance, reserve_updated = row[14:19]
    accounts = (
        Account(user_id, AccountKind.REGULAR, transaction.currency, regular_balance, regular_updated),
        Account(user_id, AccountKind.RESERVE, transaction.currency, reserve_balance, reserve_updated),
    )
    return Receipt(transaction, accounts, bool(replayed))


def _transaction(row: Sequence[Any]) -> Transaction:
    (transaction_id, kind, amount, currency, created_at, description, from_user, to_user, order_id, service_id, key) = (
        row
    )
    return Transaction(
        transaction_id,
        TransactionKind(kind),
        amount,
        currency,
        created_at,
        description,
        from_user,
        to_user,
        order_id,
        service_id,
        key,
    )


def _fetch_all(query: LiteralString, parameters: Sequence[object] | dict[str, object]) -> Work[list[tuple[Any, ...]]]:
    async def work(connection: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        cursor = await connection.execute(query, parameters)
        return [tuple(row) for row in await cursor.fetchall()]

    return work


async def load_currencies(database: Database) -> dict[str, int]:
    rows = await database.read(_fetch_all(sql.CURRENCIES, ()))
    return {code: digits for code, digits in rows}
