"""Shared fixtures: a real PostgreSQL (embedded, or the server BALANCE_TEST_DSN names) with a fresh
database for the run, migrated once; a real server on a free port; stubs over a real channel."""

from __future__ import annotations

import itertools
import os
import random
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from grpc import aio

from balance.v1 import info_service_pb2_grpc, report_service_pb2_grpc, transaction_service_pb2_grpc
from balance_server import server
from balance_server.db import migrations
from balance_server.db.embedded import EmbeddedPostgres
from balance_server.settings import Settings
from tests.books import Books


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A database of its own for this test run, dropped at the end."""
    external = os.environ.get("BALANCE_TEST_DSN")
    if external:
        name = f"balance_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(external, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')  # a generated identifier, not input
        try:
            yield psycopg.conninfo.make_conninfo(external, dbname=name)
        finally:
            with psycopg.connect(external, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    with tempfile.TemporaryDirectory(prefix="balance-test-") as scratch:
        embedded = EmbeddedPostgres(Path(scratch) / "pgdata")
        try:
            yield embedded.start()
        finally:
            embedded.stop()


@pytest.fixture(scope="session")
async def dsn(postgres_dsn: str) -> str:
    """The test database, migrated."""
    await migrations.migrate(postgres_dsn)
    return postgres_dsn


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(listen="127.0.0.1:0", pool_min_size=2, pool_max_size=16, read_pool_max_size=4)


@pytest.fixture(scope="session")
async def running(dsn: str, settings: Settings) -> AsyncIterator[server.Running]:
    started = await server.start(settings, dsn)
    yield started
    await started.stop(grace_seconds=1)


@pytest.fixture(scope="session")
async def channel(running: server.Running) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{running.port}") as opened:
        yield opened


@pytest.fixture(scope="session")
def transactions(channel: aio.Channel) -> transaction_service_pb2_grpc.TransactionServiceStub:
    return transaction_service_pb2_grpc.TransactionServiceStub(channel)


@pytest.fixture(scope="session")
def info(channel: aio.Channel) -> info_service_pb2_grpc.InfoServiceStub:
    return info_service_pb2_grpc.InfoServiceStub(channel)


@pytest.fixture(scope="session")
def reports(channel: aio.Channel) -> report_service_pb2_grpc.ReportServiceStub:
    return report_service_pb2_grpc.ReportServiceStub(channel)


@pytest.fixture(scope="session")
async def books(dsn: str) -> AsyncIterator[Books]:
    async with Books(dsn) as opened:
        yield opened


# Ids no other test uses, so tests share one database without seeing each other's money.
_ids = itertools.count(random.randrange(10**9, 2 * 10**9) * 1000)


@pytest.fixture
def new_id() -> Callable[[], int]:
    """Call it for a fresh user, order or service id."""
    return lambda: next(_ids)


@pytest.fixture
def key() -> Callable[[], str]:
    """Call it for a fresh idempotency key."""
    return lambda: uuid.uuid4().hex
