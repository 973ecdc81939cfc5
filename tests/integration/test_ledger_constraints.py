"""The database itself refuses to corrupt the books, whatever a buggy caller sends it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import errors as pg_errors

from balance_server.db.database import Database
from balance_server.settings import Settings


@pytest.fixture
async def connection(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """A connection in one transaction that is rolled back at the end, so nothing a test writes stays."""
    opened = await psycopg.AsyncConnection.connect(dsn)
    try:
        yield opened
    finally:
        await opened.rollback()
        await opened.close()


async def _deposit(connection: psycopg.AsyncConnection[tuple[object, ...]], user_id: int, amount: int) -> uuid.UUID:
    """A deposit through the ledger's own function; the id of its transaction."""
    cursor = await connection.execute(
        "SELECT error_reason, transaction_id FROM balance_deposit(%s, 'USD', %s, '', NULL)", (user_id, amount)
    )
    error_reason, transaction_id = await cursor.fetchone()  # type: ignore[misc]
    assert error_reason is None
    return transaction_id  # type: ignore[no-any-return]


async def _account(connection: psycopg.AsyncConnection[tuple[object, ...]], user_id: int | None, kind: str) -> int:
    cursor = await connection.execute(
        "SELECT account_id FROM accounts WHERE user_id IS NOT DISTINCT FROM %s AND currency = 'USD' AND kind = %s",
        (user_id, kind),
    )
    row = await cursor.fetchone()
    assert row is not None
    return row[0]  # type: ignore[return-value]


async def test_a_user_balance_cannot_go_negative(connection, new_id):
    """UPDATE of a user account's balance to below zero is a CheckViolation."""
    user = new_id()
    await _deposit(connection, user, 100)
    with pytest.raises(pg_errors.CheckViolation, match="accounts_user_balance_not_negative"):
        await connection.execute("UPDATE accounts SET balance = -1 WHERE user_id = %s AND kind = 'regular'", (user,))


async def test_a_system_account_cannot_cache_a_balance(connection):
    """UPDATE of a system account's balance away from zero is a CheckViolation."""
    with pytest.raises(pg_errors.CheckViolation, match="accounts_system_balance_not_cached"):
        await connection.execute("UPDATE accounts SET balance = 5 WHERE user_id IS NULL AND currency = 'USD'")


async def _transaction_row(connection: psycopg.AsyncConnection[tuple[object, ...]], user_id: int) -> uuid.UUID:
    """A deposit transaction row written directly, without entries."""
    transaction_id = uuid.uuid4()
    await connection.execute(
        "INSERT INTO transactions (transaction_id, kind, amount, currency, description, to_user_id)"
        " VALUES (%s, 'deposit', 100, 'USD', 'written directly by a test', %s)",
        (transaction_id, user_id),
    )
    return transaction_id


@pytest.mark.parametrize("credited", [50, 150, None], ids=["credit-too-small", "credit-too-large", "debit-only"])
async def test_entries_that_do_not_sum_to_zero_are_refused(connection, new_id, credited):
    """INSERT of a transaction's entries whose amounts do not sum to zero is a check_violation from the trigger."""
    user = new_id()
    await _deposit(connection, user, 1)
    transaction_id = await _transaction_row(connection, user)
    world, regular = await _account(connection, None, "world"), await _account(connection, user, "regular")
    rows = [(transaction_id, world, -100)] + ([(transaction_id, regular, credited)] if credited else [])
    with pytest.raises(pg_errors.CheckViolation, match="do not sum to zero"):
        async with connection.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO entries (transaction_id, account_id, amount) VALUES (%s, %s, %s)", rows
            )


async def test_balanced_entries_written_directly_are_accepted(connection, new_id):
    """The trigger accepts a transaction's entries that do sum to zero (so the refusals above are its doing)."""
    user = new_id()
    await _deposit(connection, user, 1)
    transaction_id = await _transaction_row(connection, user)
    world, regular = await _account(connection, None, "world"), await _account(connection, user, "regular")
    await connection.execute(
        "INSERT INTO entries (transaction_id, account_id, amount) VALUES (%s, %s, -100), (%s, %s, 100)",
        (transaction_id, world, transaction_id, regular),
    )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE transactions SET memo = 'rewritten' WHERE transaction_id = %s",
        "UPDATE transactions SET amount = amount * 2 WHERE transaction_id = %s",
        "DELETE FROM transactions WHERE transaction_id = %s",
        "UPDATE entries SET amount = -amount WHERE transaction_id = %s",
        "DELETE FROM entries WHERE transaction_id = %s",
    ],
    ids=["update-transaction-memo", "update-transaction-amount", "delete-transaction", "update-entry", "delete-entry"],
)
async def test_written_transactions_and_entries_cannot_be_changed(connection, new_id, statement):
    """UPDATE or DELETE of a written transactions or entries row is refused with restrict_violation."""
    transaction_id = await _deposit(connection, new_id(), 100)
    with pytest.raises(pg_errors.RestrictViolation, match="append-only"):
        await connection.execute(statement, (transaction_id,))


async def test_entries_cannot_be_truncated(connection):
    """TRUNCATE of entries is refused with restrict_violation (transactions are kept by the foreign keys)."""
    with pytest.raises(pg_errors.RestrictViolation, match="append-only"):
        await connection.execute("TRUNCATE entries")


async def test_an_idempotency_key_is_stored_once(connection, key):
    """INSERT of an idempotency key that is already stored is a UniqueViolation."""
    same_key = key()
    insert = (
        "INSERT INTO idempotency_keys (idempotency_key, request, error_reason)"
        " VALUES (%s, '{}'::jsonb, 'INSUFFICIENT_FUNDS')"
    )
    await connection.execute(insert, (same_key,))
    with pytest.raises(pg_errors.UniqueViolation):
        await connection.execute(insert, (same_key,))


async def test_an_order_with_an_unknown_status_is_refused(connection, new_id):
    """INSERT of an order whose status is not reserved, captured or released is a CheckViolation."""
    with pytest.raises(pg_errors.CheckViolation, match="orders_status_check"):
        await connection.execute(
            # Every other column satisfies its checks, so only the status can be refused.
            "INSERT INTO orders (order_id, user_id, service_id, currency, status, reserved_amount,"
            " released_amount, reserve_transaction_id, final_transaction_id)"
            " VALUES (%s, %s, %s, 'USD', 'pending', 100, 100, %s, %s)",
            (new_id(), new_id(), new_id(), uuid.uuid4(), uuid.uuid4()),
        )


async def test_writer_connections_are_serializable_and_reader_connections_read_only(dsn):
    """The service's writer pool hands out SERIALIZABLE connections and its reader pool read-only ones."""
    database = Database(dsn, Settings(pool_min_size=1, pool_max_size=2, read_pool_max_size=1))
    await database.open()
    try:
        async with database.writer.connection() as writer:
            cursor = await writer.execute("SHOW transaction_isolation")
            assert await cursor.fetchone() == ("serializable",)
        async with database.reader.connection() as reader:
            cursor = await reader.execute("SHOW default_transaction_read_only")
            assert await cursor.fetchone() == ("on",)
            with pytest.raises(pg_errors.ReadOnlySqlTransaction):
                await reader.execute("UPDATE accounts SET updated_at = now() WHERE false")
    finally:
        await database.close()


async def test_reporter_connections_are_serializable_read_only_deferrable(dsn):
    """The reporter pool hands out SERIALIZABLE READ ONLY DEFERRABLE connections: long reads that never retry."""
    database = Database(dsn, Settings(pool_min_size=1, pool_max_size=2, read_pool_max_size=1))
    await database.open()
    try:
        async with database.reporter.connection() as reporter:
            shown = []
            for setting in ("transaction_isolation", "transaction_read_only", "transaction_deferrable"):
                cursor = await reporter.execute(f"SHOW {setting}")  # a fixed setting name, not input
                shown.append((await cursor.fetchone())[0])  # type: ignore[index]
            assert shown == ["serializable", "on", "on"]
    finally:
        await database.close()


async def test_the_money_functions_keep_the_books_balanced(dsn, books, new_id, key):
    """Deposit, withdraw, transfer, reserve, release and revenue each write entries that sum to zero, and
    every cached balance stays equal to the sum of its account's entries."""
    alice, bob, service = new_id(), new_id(), new_id()
    released_order, captured_order, partial_order = new_id(), new_id(), new_id()
    calls: list[tuple[str, tuple[object, ...]]] = [
        ("SELECT * FROM balance_deposit(%s, 'USD', %s, '', %s)", (alice, 100_000, key())),
        ("SELECT * FROM balance_deposit(%s, 'JPY', %s, 'card', %s)", (alice, 5_000, key())),
        ("SELECT * FROM balance_withdraw(%s, 'USD', %s, 'iban', %s)", (alice, 2_550, key())),
        ("SELECT * FROM balance_transfer(%s, %s, 'USD', %s, 'rent', %s)", (alice, bob, 30_000, key())),
        ("SELECT * FROM balance_transfer(%s, %s, 'USD', %s, '', NULL)", (bob, alice, 1)),
        ("SELECT * FROM balance_reserve(%s, %s, %s, 'USD', %s, 'shop')", (alice, service, released_order, 1_000)),
        ("SELECT * FROM balance_release_reserve(%s)", (released_order,)),
        ("SELECT * FROM balance_reserve(%s, %s, %s, 'USD', %s, 'shop')", (alice, service, captured_order, 2_000)),
        ("SELECT * FROM balance_recognize_revenue(%s, %s, %s, NULL)", (alice, service, captured_order)),
        ("SELECT * FROM balance_reserve(%s, %s, %s, 'USD', %s, 'shop')", (bob, service, partial_order, 3_000)),
        # Revenue of part of the reserve: a revenue and a release of the rest.
        ("SELECT * FROM balance_recognize_revenue(%s, %s, %s, 12.34)", (bob, service, partial_order)),
    ]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        for statement, parameters in calls:
            cursor = await connection.execute(statement, parameters)
            result = await cursor.fetchone()
            assert result is not None and result[0] is None, (statement, result)
    sums = await books.rows(
        "SELECT t.transaction_id, sum(e.amount), count(e.*) FROM transactions t JOIN entries e USING (transaction_id)"
        " WHERE t.from_user_id IN (%s, %s) OR t.to_user_id IN (%s, %s) GROUP BY t.transaction_id",
        alice,
        bob,
        alice,
        bob,
    )
    assert len(sums) == len(calls) + 1
    assert [(total, count >= 2) for _, total, count in sums] == [(0, True)] * len(sums)
    assert (await books.audit()).clean
