"""Every limit of the service, named with its unit last. Tests exercise each one at its edge."""

from __future__ import annotations

from typing import Final

# Amounts.
AMOUNT_MINOR_UNITS_MAX: Final = 10**15
"""The largest amount of one operation, in minor units (10 trillion USD)."""
AMOUNT_TEXT_LENGTH_MAX: Final = 40
"""Longest amount string accepted before parsing: more digits than any valid amount has."""

# Free text given by callers.
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 128
MEMO_LENGTH_MAX: Final = 500
"""Deposit source, withdrawal destination and transfer comment, in characters."""
SERVICE_NAME_LENGTH_MAX: Final = 200

# Listing.
PAGE_SIZE_DEFAULT: Final = 50
PAGE_SIZE_MAX: Final = 1000
PAGE_TOKEN_LENGTH_MAX: Final = 512
PAGE_BYTES_MAX: Final = 1024 * 1024 - 64 * 1024
"""A page of history also ends before its transactions pass this many bytes, so that it fits in
one message (MESSAGE_BYTES_MAX) with room to spare."""
TRANSACTION_KINDS_FILTER_MAX: Final = 16

# Reports.
REPORT_CHUNK_BYTES_MAX: Final = 64 * 1024
REPORT_YEAR_MIN: Final = 2000
"""The first year a revenue report can be asked for; the last is next year."""

# Serializable transactions.
RETRY_ATTEMPTS_MAX: Final = 12
"""Attempts of one money operation before the caller gets ABORTED."""
CONNECTION_LOSSES_MAX: Final = 2
"""Times a keyed money operation is run again after losing its connection mid-call."""
RETRY_DELAY_MS_BASE: Final = 2
RETRY_DELAY_MS_MAX: Final = 200

# Transport.
MESSAGE_BYTES_MAX: Final = 1024 * 1024
"""Largest request and response message."""
CALLS_IN_FLIGHT_MAX: Final = 512
"""Calls served at once; the next one is refused with RESOURCE_EXHAUSTED instead of queueing."""
HEALTH_PING_SECONDS_MAX: Final = 2.0
"""How long a health ping of the database may take before it counts as failed."""
HEALTH_PING_FAILURES_MAX: Final = 3
"""Failed pings in a row that make health NOT_SERVING and calls fail fast with UNAVAILABLE."""
POOL_WAITERS_MAX: Final = 256
"""Calls waiting for a connection of one pool; the next is refused with RESOURCE_EXHAUSTED."""
POOL_WAIT_SECONDS_MAX: Final = 5.0
"""How long a call waits for a database connection before it fails with UNAVAILABLE."""
