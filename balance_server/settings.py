"""Settings, read once at start-up from flags and BALANCE_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from balance_server import limits


@dataclass(frozen=True, kw_only=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    """host:port the gRPC server binds."""
    dsn: str | None = None
    """PostgreSQL connection string; None starts the embedded PostgreSQL."""
    data_dir: Path = Path(".balance-data")
    """Where the embedded PostgreSQL keeps its data (ignored with a DSN)."""
    pool_min_size: int = 4
    pool_max_size: int = 16
    """Connections for money operations. Well below PostgreSQL's max_connections: every
    SERIALIZABLE connection uses the server's shared conflict-tracking memory."""
    read_pool_max_size: int = 8
    """Connections for reads (balances, history, orders), so reads never wait behind writes."""
    report_pool_max_size: int = 2
    """Connections for reports: a few long downloads can never take the others' connections."""
    default_currency: str = "USD"
    log_level: str = "INFO"
    shutdown_grace_seconds: float = 10.0
    db_connect_attempts: int = 30
    db_connect_interval_seconds: float = 1.0
    health_check_interval_seconds: float = 1.0
    idempotency_key_retention_days: int = 0
    """0 keeps idempotency keys forever; N deletes keys older than N days."""
    max_calls_in_flight: int = limits.CALLS_IN_FLIGHT_MAX
    """Calls one server process serves at once; the next is refused with RESOURCE_EXHAUSTED."""
    workers: int = 1
    event_loop: str = "uvloop"
    """The asyncio event loop implementation: "uvloop" or "asyncio" (the standard library's)."""
