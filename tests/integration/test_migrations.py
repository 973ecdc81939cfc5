"""The migrations runner against real PostgreSQL: idempotent, recorded, tamper-evident, one at a time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql

from balance_server.db import migrations
from balance_server.db.migrations import MigrationError


@pytest.fixture
async def fresh_dsn(dsn: str) -> AsyncIterator[str]:
    """An empty database of its own on the test server, dropped afterwards."""
    name = f"balance_migrations_{uuid.uuid4().hex[:12]}"
    admin_dsn = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
    finally:
        async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
            await admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def _recorded(dsn: str) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        return await cursor.fetchall()


def _shipped() -> list[tuple[object, ...]]:
    return [(migration.version, migration.name, migration.checksum) for migration in migrations.available()]


async def test_migrating_a_migrated_database_applies_nothing(dsn):
    """migrate on the already-migrated test database applies no migration and records nothing new."""
    before = await _recorded(dsn)
    assert await migrations.migrate(dsn) == []
    assert await _recorded(dsn) == before


async def test_every_migration_is_recorded_with_its_checksum(dsn):
    """schema_migrations holds one row per shipped file: its version, name and SHA-256 checksum."""
    assert await _recorded(dsn) == _shipped()


async def test_a_fresh_database_gets_every_migration_in_order(fresh_dsn):
    """On an empty database migrate applies every shipped file, in version order, and records each."""
    applied = await migrations.migrate(fresh_dsn)
    assert applied == [migration.name for migration in migrations.available()]
    assert await _recorded(fresh_dsn) == _shipped()


async def test_a_changed_migration_is_refused(fresh_dsn):
    """A recorded checksum that differs from the shipped file's makes migrate raise MigrationError."""
    await migrations.migrate(fresh_dsn)
    async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as connection:
        await connection.execute("UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 1")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrations.migrate(fresh_dsn)


async def test_a_migration_this_server_does_not_know_is_refused(fresh_dsn):
    """A database recording a migration version the server does not ship makes migrate raise MigrationError."""
    await migrations.migrate(fresh_dsn)
    async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as connection:
        await connection.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, '9999_future.sql', 'x')"
        )
    with pytest.raises(MigrationError, match="does not know"):
        await migrations.migrate(fresh_dsn)


async def test_concurrent_migrations_apply_each_file_once(fresh_dsn):
    """Two migrate() calls at once on a fresh database both succeed; the advisory lock makes one apply
    everything and the other nothing."""
    first, second = await asyncio.wait_for(
        asyncio.gather(migrations.migrate(fresh_dsn), migrations.migrate(fresh_dsn)), timeout=30
    )
    assert sorted([first, second], key=len) == [[], [migration.name for migration in migrations.available()]]
    assert await _recorded(fresh_dsn) == _shipped()
