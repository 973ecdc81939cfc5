"""Every SQL statement of the service, as constants: values are always bound parameters."""

from __future__ import annotations

from typing import Final, LiteralString

# Money operations: one function call each (see migrations/0003_operations.sql). They return one
# operation_result row.
DEPOSIT: Final = "SELECT * FROM balance_deposit(%s, %s, %s, %s, %s)"
WITHDRAW: Final = "SELECT * FROM balance_withdraw(%s, %s, %s, %s, %s)"
TRANSFER: Final = "SELECT * FROM balance_transfer(%s, %s, %s, %s, %s, %s)"
RESERVE: Final = "SELECT * FROM balance_reserve(%s, %s, %s, %s, %s, %s)"
RELEASE_RESERVE: Final = "SELECT * FROM balance_release_reserve(%s)"
RECOGNIZE_REVENUE: Final = "SELECT * FROM balance_recognize_revenue(%s, %s, %s, %s::numeric)"

CURRENCIES: Final = "SELECT code, minor_digits FROM currencies"

ACCOUNTS_OF_USER: Final = """
    SELECT user_id, kind, currency, balance, updated_at FROM accounts
    WHERE user_id = %(user_id)s AND (%(currency)s::text IS NULL OR currency = %(currency)s)
    ORDER BY currency, kind
"""

USER_HAS_ACCOUNTS: Final = "SELECT EXISTS (SELECT FROM accounts WHERE user_id = %s)"

TRANSACTION_COLUMNS: Final = """transaction_id, kind, amount, currency, created_at, description,
    from_user_id, to_user_id, order_id, service_id, idempotency_key"""

TRANSACTION_BY_ID: Final = "SELECT " + TRANSACTION_COLUMNS + " FROM transactions WHERE transaction_id = %s"

ORDER_BY_ID: Final = """
    SELECT order_id, user_id, service_id, service_name, currency, status, reserved_amount,
           captured_amount, released_amount, created_at, updated_at
    FROM orders WHERE order_id = %s
"""


def _history_side(
    side: LiteralString,
    sort_column: LiteralString,
    direction: LiteralString,
    comparison: LiteralString,
    time_bounds: LiteralString,
) -> LiteralString:
    return (
        "(SELECT " + TRANSACTION_COLUMNS + " FROM transactions"
        " WHERE " + side + " = %(user_id)s AND " + time_bounds + " AND kind = ANY(%(kinds)s)"
        " AND (" + sort_column + ", transaction_id) " + comparison + " (%(after_value)s, %(after_id)s)"
        " ORDER BY " + sort_column + " " + direction + ", transaction_id " + direction + " LIMIT %(limit)s)"
    )


def _history_page(
    sort_column: LiteralString, direction: LiteralString, comparison: LiteralString, time_bounds: LiteralString
) -> LiteralString:
    """A page of a user's history in one sort: each side of the user's transactions is an ordered
    index scan from the keyset position, and the two are merged; UNION drops the duplicates of
    transactions where the user is both sides (reserves, releases).

    In date order the bound on the side the scan starts from is not written here: the first
    page's keyset position carries it. Both bounds and the position would make PostgreSQL start
    the scan at the scalar bound and walk every row before the position, so page 10 000 would
    cost a thousand times page 1."""
    sides = [
        _history_side(side, sort_column, direction, comparison, time_bounds) for side in ("from_user_id", "to_user_id")
    ]
    return (
        "SELECT * FROM (" + sides[0] + " UNION " + sides[1] + ") AS page"
        " ORDER BY " + sort_column + " " + direction + ", transaction_id " + direction + " LIMIT %(limit)s"
    )


HISTORY_BY_DATE_DESC: Final = _history_page("created_at", "DESC", "<", "created_at >= %(from_time)s")
HISTORY_BY_DATE_ASC: Final = _history_page("created_at", "ASC", ">", "created_at < %(to_time)s")
HISTORY_BY_AMOUNT_DESC: Final = _history_page(
    "amount", "DESC", "<", "created_at >= %(from_time)s AND created_at < %(to_time)s"
)
HISTORY_BY_AMOUNT_ASC: Final = _history_page(
    "amount", "ASC", ">", "created_at >= %(from_time)s AND created_at < %(to_time)s"
)

DELETE_EXPIRED_IDEMPOTENCY_KEYS: Final = """
    DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(days => %s)
"""

PING: Final = "SELECT 1"

# Reports: COPY cannot take server-side parameters, so psycopg binds these values client-side,
# quoting each as a literal. The CSV is PostgreSQL's own (FORMAT csv quotes fields holding the
# delimiter, quotes or line breaks as RFC 4180 says).
REVENUE_REPORT: Final = """
    COPY (
        SELECT t.service_id AS service_id,
               coalesce(s.name, '') AS service_name,
               round(sum(t.amount) / power(10::numeric, c.minor_digits), c.minor_digits)::text AS revenue,
               t.currency AS currency
        FROM transactions t
        JOIN currencies c ON c.code = t.currency
        LEFT JOIN services s ON s.service_id = t.service_id
        WHERE t.kind = 'revenue' AND t.created_at >= %(start)s AND t.created_at < %(end)s
          AND (%(currency)s::text IS NULL OR t.currency = %(currency)s::text)
        GROUP BY t.service_id, s.name, t.currency, c.minor_digits
        ORDER BY t.service_id, t.currency
    ) TO STDOUT WITH (FORMAT csv, DELIMITER ';', HEADER true)
"""

STATEMENT: Final = """
    COPY (
        SELECT t.transaction_id AS transaction_id,
               to_char(t.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at,
               t.kind AS kind,
               round(t.amount / power(10::numeric, c.minor_digits), c.minor_digits)::text AS amount,
               t.currency AS currency,
               t.description AS description,
               t.order_id AS order_id,
               t.service_id AS service_id,
               CASE WHEN t.from_user_id IS DISTINCT FROM t.to_user_id THEN
                   CASE WHEN t.from_user_id = %(user_id)s THEN t.to_user_id ELSE t.from_user_id END
               END AS counterparty_user_id
        FROM transactions t
        JOIN currencies c ON c.code = t.currency
        WHERE (t.from_user_id = %(user_id)s OR t.to_user_id = %(user_id)s)
          AND t.created_at >= %(from_time)s AND t.created_at < %(to_time)s
          AND t.kind = ANY(%(kinds)s)
        ORDER BY t.created_at, t.transaction_id
    ) TO STDOUT WITH (FORMAT csv, DELIMITER ';', HEADER true)
"""
