"""Reads the books straight from PostgreSQL and checks the ledger's invariants."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg


@dataclass
class Audit:
    """What is wrong with the books; every list empty means they balance."""

    unbalanced_currencies: list[tuple[str, int]] = field(default_factory=list)
    unbalanced_transactions: list[str] = field(default_factory=list)
    stale_balances: list[tuple[int, int, int]] = field(default_factory=list)
    negative_balances: list[tuple[int, int]] = field(default_factory=list)
    unaccounted_reserves: list[tuple[int, str, int, int]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not any(
            (
                self.unbalanced_currencies,
                self.unbalanced_transactions,
                self.stale_balances,
                self.negative_balances,
                self.unaccounted_reserves,
            )
        )


class Books:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.connection: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def __aenter__(self) -> Books:
        self.connection = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.connection is not None
        await self.connection.close()

    async def rows(self, query: str, *parameters: object) -> list[tuple[object, ...]]:
        assert self.connection is not None
        cursor = await self.connection.execute(query, parameters)  # type: ignore[arg-type]
        return await cursor.fetchall()

    async def value(self, query: str, *parameters: object) -> object:
        return (await self.rows(query, *parameters))[0][0]

    async def audit(self) -> Audit:
        audit = Audit()
        audit.unbalanced_currencies = await self.rows(  # type: ignore[assignment]
            "SELECT a.currency, sum(e.amount) FROM entries e JOIN accounts a USING (account_id)"
            " GROUP BY a.currency HAVING sum(e.amount) <> 0"
        )
        audit.unbalanced_transactions = [
            str(row[0])
            for row in await self.rows(
                "SELECT t.transaction_id FROM transactions t LEFT JOIN entries e USING (transaction_id)"
                " GROUP BY t.transaction_id HAVING coalesce(sum(e.amount), 1) <> 0 OR count(e.*) < 2"
            )
        ]
        audit.stale_balances = await self.rows(  # type: ignore[assignment]
            "SELECT a.account_id, a.balance, coalesce(sum(e.amount), 0) FROM accounts a"
            " LEFT JOIN entries e USING (account_id) WHERE a.user_id IS NOT NULL"
            " GROUP BY a.account_id HAVING a.balance <> coalesce(sum(e.amount), 0)"
        )
        audit.negative_balances = await self.rows(  # type: ignore[assignment]
            "SELECT account_id, balance FROM accounts WHERE user_id IS NOT NULL AND balance < 0"
        )
        audit.unaccounted_reserves = await self.rows(  # type: ignore[assignment]
            "SELECT a.user_id, a.currency, a.balance, coalesce(sum(o.reserved_amount), 0)"
            " FROM accounts a LEFT JOIN orders o"
            "   ON o.user_id = a.user_id AND o.currency = a.currency AND o.status = 'reserved'"
            " WHERE a.kind = 'reserve' GROUP BY a.account_id"
            " HAVING a.balance <> coalesce(sum(o.reserved_amount), 0)"
        )
        return audit

    async def balance(self, user_id: int, currency: str = "USD", kind: str = "regular") -> int:
        """A user account's cached balance in minor units."""
        return int(
            await self.value(  # type: ignore[arg-type]
                "SELECT balance FROM accounts WHERE user_id = %s AND currency = %s AND kind = %s",
                user_id,
                currency,
                kind,
            )
        )

    async def transactions_of(self, user_id: int) -> int:
        return int(
            await self.value(  # type: ignore[arg-type]
                "SELECT count(*) FROM transactions WHERE from_user_id = %s OR to_user_id = %s", user_id, user_id
            )
        )
