"""Numbered .sql migrations, applied in order under an advisory lock and recorded with a checksum.

A migration is never edited once released: start-up refuses a database whose recorded checksum
differs from the file's, instead of running on a schema nobody can name.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

import psycopg

_log = logging.getLogger(__name__)

_LOCK_KEY: Final = 0x62616C616E6365  # "balance": one migrator at a time across processes
_NAME_PATTERN: Final = re.compile(r"(?P<version>\d{4})_[a-z0-9_]+\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    pass


def available() -> list[Migration]:
    """The migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files("balance_server.migrations").iterdir():
        match = _NAME_PATTERN.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group("version")), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3... without gaps: {versions}")
    return found


async def migrate(dsn: str) -> list[str]:
    """Applies the migrations the database lacks; returns their names."""
    applied_now = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cursor = await connection.execute("SELECT version, name, checksum FROM schema_migrations")
            recorded = {version: (name, checksum) for version, name, checksum in await cursor.fetchall()}
            for migration in available():
                if migration.version in recorded:
                    _check_unchanged(migration, *recorded[migration.version])
                    continue
                async with connection.transaction():
                    await connection.execute(migration.sql.encode())
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                _log.info("applied migration %s", migration.name)
                applied_now.append(migration.name)
            unknown = sorted(set(recorded) - {migration.version for migration in available()})
            if unknown:
                raise MigrationError(f"the database has migrations this server does not know: {unknown}")
        finally:
            await connection.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def _check_unchanged(migration: Migration, name: str, checksum: str) -> None:
    if checksum != migration.checksum:
        raise MigrationError(f"migration {name} was changed after it was applied (checksum differs)")
