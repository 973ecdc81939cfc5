"""The data of the load benchmark: funded users, one user with a long history, and pgbench's tables.

Loaded once into a template database in the embedded PostgreSQL's data folder, with set-based SQL;
every invocation of bench/load.py works on a fresh copy of it (CREATE DATABASE ... TEMPLATE), so
each starts from the same books and a later invocation with the same --data-dir skips loading.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from balance_server.db import migrations
from bench._common import progress

TEMPLATE_DATABASE: Final = "balance_load_template"
COPY_DATABASE_PREFIX: Final = "balance_load_run_"
FUNDING_MINOR_UNITS: Final = 100_000_000
"""Each user's deposit: 1 000 000.00 USD, far more than a benchmark's transfers can move."""
FUNDING_TEXT: Final = "1000000.00"
SERVICES: Final = 100
"""Services the order cycle reserves for, created with the data so reserves never create them."""
COPY_ATTEMPTS_MAX: Final = 20
COPY_RETRY_SECONDS: Final = 1.0


@dataclass(frozen=True)
class Dataset:
    users: int
    """Funded users 1..users."""
    history: int
    """Transactions of the history user."""

    @property
    def history_user(self) -> int:
        """A user of their own after the funded ones, whose history no scenario changes."""
        return self.users + 1


# The service's books. Each INSERT into entries holds both entries of every transaction it
# writes, so the ledger's trigger finds each statement balanced.

CREATE_LOAD_INFO: Final = """
    CREATE TABLE bench_load_info (
        users        bigint NOT NULL,
        history      bigint NOT NULL,
        load_seconds double precision NOT NULL,
        loaded_at    timestamptz NOT NULL DEFAULT now(),
        -- The page token of the last history page, found once by following the tokens.
        page_number  bigint,
        page_token   text
    )
"""

INSERT_ACCOUNTS: Final = """
    INSERT INTO accounts (user_id, currency, kind, balance)
    SELECT u, 'USD', side.kind, CASE side.kind WHEN 'regular' THEN %(funding)s::bigint ELSE 0 END
    FROM generate_series(1, %(users)s::bigint) AS u
    CROSS JOIN (VALUES ('regular'), ('reserve')) AS side (kind)
"""

INSERT_FUNDING: Final = """
    INSERT INTO transactions (transaction_id, kind, amount, currency, created_at, description, to_user_id, memo)
    SELECT md5('funding:' || u)::uuid, 'deposit', %(funding)s::bigint, 'USD', '2023-12-01T00:00:00Z',
           'Deposit of ' || %(funding_text)s || ' USD to user ' || u || ' from payment source ''bench-funding''.',
           u, 'bench-funding'
    FROM generate_series(1, %(users)s::bigint) AS u
"""

INSERT_FUNDING_ENTRIES: Final = """
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    SELECT md5('funding:' || a.user_id)::uuid, side.account_id, side.amount, side.balance_after
    FROM accounts AS a
    CROSS JOIN (SELECT system_account('USD', 'world') AS account_id) AS world
    CROSS JOIN LATERAL (VALUES (world.account_id, -a.balance, NULL::bigint),
                               (a.account_id, a.balance, a.balance)) AS side (account_id, amount, balance_after)
    WHERE a.user_id BETWEEN 1 AND %(users)s AND a.currency = 'USD' AND a.kind = 'regular'
"""

INSERT_HISTORY_ACCOUNTS: Final = """
    INSERT INTO accounts (user_id, currency, kind, balance)
    VALUES (%(user)s, 'USD', 'regular', 0), (%(user)s, 'USD', 'reserve', 0)
"""

# Odd n: a deposit of 10.00-16.00 USD; even n: a withdrawal of 5.00-7.99 USD, so the balance only
# grows from pair to pair and never goes negative; one minute apart from 2024-01-01, so both sides
# of the history (from_user_id and to_user_id) hold half of the rows.
INSERT_HISTORY: Final = """
    INSERT INTO transactions (transaction_id, kind, amount, currency, created_at, description,
                              from_user_id, to_user_id, memo)
    SELECT md5('history:' || n)::uuid, CASE WHEN h.deposit THEN 'deposit' ELSE 'withdrawal' END, h.amount,
           'USD', '2024-01-01T00:00:00Z'::timestamptz + n * interval '1 minute',
           CASE WHEN h.deposit
                THEN 'Deposit of ' || h.amount / 100 || '.' || lpad((h.amount %% 100)::text, 2, '0')
                     || ' USD to user ' || %(user)s || ' from payment source ''card-' || n %% 97 || '''.'
                ELSE 'Withdrawal of ' || h.amount / 100 || '.' || lpad((h.amount %% 100)::text, 2, '0')
                     || ' USD from user ' || %(user)s || ' to payout destination ''bank-' || n %% 13 || '''.'
           END,
           CASE WHEN h.deposit THEN NULL ELSE %(user)s::bigint END,
           CASE WHEN h.deposit THEN %(user)s::bigint ELSE NULL END,
           CASE WHEN h.deposit THEN 'card-' || n %% 97 ELSE 'bank-' || n %% 13 END
    FROM generate_series(1, %(history)s::bigint) AS n
    CROSS JOIN LATERAL (SELECT n %% 2 = 1 AS deposit,
                               CASE WHEN n %% 2 = 1 THEN 1000 + 100 * (n %% 7) ELSE 500 + n %% 300 END AS amount) AS h
"""

# The same rows as signed amounts, with the history user's balance after each as a running sum.
INSERT_HISTORY_ENTRIES: Final = """
    INSERT INTO entries (transaction_id, account_id, amount, balance_after)
    SELECT md5('history:' || h.n)::uuid, side.account_id, side.amount, side.balance_after
    FROM (SELECT n, signed, sum(signed) OVER (ORDER BY n) AS balance_after
          FROM generate_series(1, %(history)s::bigint) AS n
          CROSS JOIN LATERAL (SELECT CASE WHEN n %% 2 = 1 THEN 1000 + 100 * (n %% 7)
                                          ELSE -(500 + n %% 300) END AS signed) AS s) AS h
    CROSS JOIN (SELECT account_id FROM accounts
                WHERE user_id = %(user)s AND currency = 'USD' AND kind = 'regular') AS regular
    CROSS JOIN (SELECT system_account('USD', 'world') AS account_id) AS world
    CROSS JOIN LATERAL (VALUES (regular.account_id, h.signed, h.balance_after::bigint),
                               (world.account_id, -h.signed, NULL::bigint)) AS side (account_id, amount, balance_after)
"""

UPDATE_HISTORY_BALANCE: Final = """
    UPDATE accounts a SET balance = (SELECT sum(e.amount) FROM entries e WHERE e.account_id = a.account_id)
    WHERE a.user_id = %(user)s AND a.currency = 'USD' AND a.kind = 'regular'
"""

INSERT_SERVICES: Final = """
    INSERT INTO services (service_id, name)
    SELECT s, 'Service ' || s FROM generate_series(1, %(services)s::bigint) AS s
"""

# pgbench's own tables: the same transfer (conditional debit, credit, one transaction row with a
# random UUID, two entry rows with foreign keys and the balance after), without the service.

CREATE_BASELINE_TABLES: Final = """
    CREATE TABLE bench_accounts (
        account_id bigint PRIMARY KEY,
        balance    bigint NOT NULL CHECK (balance >= 0)
    );
    CREATE TABLE bench_transactions (
        transaction_id uuid PRIMARY KEY,
        from_account   bigint NOT NULL,
        to_account     bigint NOT NULL,
        amount         bigint NOT NULL CHECK (amount > 0),
        created_at     timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE bench_entries (
        transaction_id uuid NOT NULL REFERENCES bench_transactions (transaction_id),
        account_id     bigint NOT NULL REFERENCES bench_accounts (account_id),
        amount         bigint NOT NULL,
        balance_after  bigint NOT NULL,
        PRIMARY KEY (transaction_id, account_id)
    );
    CREATE FUNCTION bench_transfer(p_from bigint, p_to bigint, p_amount bigint) RETURNS boolean
    LANGUAGE plpgsql AS $$
    DECLARE
        new_transaction uuid := gen_random_uuid();
        from_after bigint;
        to_after bigint;
    BEGIN
        UPDATE bench_accounts SET balance = balance - p_amount
        WHERE account_id = p_from AND balance >= p_amount
        RETURNING balance INTO from_after;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        UPDATE bench_accounts SET balance = balance + p_amount WHERE account_id = p_to
        RETURNING balance INTO to_after;
        INSERT INTO bench_transactions (transaction_id, from_account, to_account, amount)
        VALUES (new_transaction, p_from, p_to, p_amount);
        INSERT INTO bench_entries (transaction_id, account_id, amount, balance_after)
        VALUES (new_transaction, p_from, -p_amount, from_after),
               (new_transaction, p_to, p_amount, to_after);
        RETURN true;
    END;
    $$;
"""

INSERT_BASELINE_ACCOUNTS: Final = """
    INSERT INTO bench_accounts (account_id, balance)
    SELECT a, %(funding)s::bigint FROM generate_series(1, %(users)s::bigint) AS a
"""


def prepare_template(admin_dsn: str, dataset: Dataset) -> None:
    """Leaves a loaded template database for `dataset`, loading it only when the one there was
    loaded for other sizes (or not at all); removes copies left by interrupted invocations."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        for (name,) in admin.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (COPY_DATABASE_PREFIX,)
        ).fetchall():
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # a name this script made
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE_DATABASE,)).fetchone()
    template_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=TEMPLATE_DATABASE)
    if exists and _loaded_for(template_dsn, dataset):
        # Migrations added since the data was loaded apply to the template too.
        asyncio.run(migrations.migrate(template_dsn))
        progress(f"reusing the data loaded in {TEMPLATE_DATABASE}")
        return
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DATABASE}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
    asyncio.run(migrations.migrate(template_dsn))
    seconds = load(template_dsn, dataset)
    progress(f"loaded {dataset.users:,} users and {dataset.history:,} history rows in {seconds:.1f} s")


def _loaded_for(template_dsn: str, dataset: Dataset) -> bool:
    with psycopg.connect(template_dsn, autocommit=True) as connection:
        try:
            row = connection.execute("SELECT users, history FROM bench_load_info").fetchone()
        except psycopg.errors.UndefinedTable:
            return False
    return row == (dataset.users, dataset.history)


def load(dsn: str, dataset: Dataset) -> float:
    """Fills the migrated template with set-based SQL; returns the seconds it took."""
    started = time.perf_counter()
    parameters: dict[str, Any] = {
        "users": dataset.users,
        "funding": FUNDING_MINOR_UNITS,
        "funding_text": FUNDING_TEXT,
        "user": dataset.history_user,
        "history": dataset.history,
        "services": SERVICES,
    }
    with psycopg.connect(dsn, autocommit=True) as connection:
        # Loading only: a crash while loading just means loading again.
        connection.execute("SET synchronous_commit = off")
        with connection.transaction():
            connection.execute(INSERT_ACCOUNTS, parameters)
            connection.execute(INSERT_FUNDING, parameters)
            connection.execute(INSERT_FUNDING_ENTRIES, parameters)
        progress(f"{dataset.users:,} funded users ({time.perf_counter() - started:.1f} s)")
        with connection.transaction():
            connection.execute(INSERT_HISTORY_ACCOUNTS, parameters)
            connection.execute(INSERT_HISTORY, parameters)
            connection.execute(INSERT_HISTORY_ENTRIES, parameters)
            connection.execute(UPDATE_HISTORY_BALANCE, parameters)
        progress(
            f"{dataset.history:,} transactions of user {dataset.history_user} ({time.perf_counter() - started:.1f} s)"
        )
        with connection.transaction():
            connection.execute(INSERT_SERVICES, parameters)
            connection.execute(CREATE_BASELINE_TABLES)
            connection.execute(INSERT_BASELINE_ACCOUNTS, parameters)
        # Visibility map and statistics, as a database that has been running a while has them.
        connection.execute("VACUUM ANALYZE")
        seconds = time.perf_counter() - started
        connection.execute(CREATE_LOAD_INFO)
        connection.execute(
            "INSERT INTO bench_load_info (users, history, load_seconds) VALUES (%s, %s, %s)",
            (dataset.users, dataset.history, seconds),
        )
    return seconds


def copy_template(admin_dsn: str) -> str:
    """A fresh copy of the template for this invocation; returns its name."""
    name = f"{COPY_DATABASE_PREFIX}{os.getpid()}_{int(time.time())}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        for attempt in range(1, COPY_ATTEMPTS_MAX + 1):
            try:
                # FILE_COPY copies the files instead of writing them all to the WAL: seconds, not minutes.
                admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DATABASE}" STRATEGY FILE_COPY')
                return name
            except psycopg.errors.ObjectInUse:
                # Autovacuum may be visiting the template; it leaves soon.
                if attempt == COPY_ATTEMPTS_MAX:
                    raise
                time.sleep(COPY_RETRY_SECONDS)
    raise AssertionError("unreachable: the loop returns or raises")


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # a name this script made


def cached_page_token(admin_dsn: str) -> tuple[int, str] | None:
    template_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=TEMPLATE_DATABASE)
    with psycopg.connect(template_dsn, autocommit=True) as connection:
        row = connection.execute("SELECT page_number, page_token FROM bench_load_info").fetchone()
    if row is None or row[1] is None:
        return None
    return int(row[0]), str(row[1])


def cache_page_token(admin_dsn: str, page_number: int, token: str) -> None:
    """Keeps the token with the template, so later invocations need not follow 10 000 pages again."""
    template_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=TEMPLATE_DATABASE)
    with psycopg.connect(template_dsn, autocommit=True) as connection:
        connection.execute("UPDATE bench_load_info SET page_number = %s, page_token = %s", (page_number, token))
