"""Builds and runs the server. Start-up in order: settings, database, migrations, services, health,
serve; on SIGTERM or SIGINT the reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import psycopg
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from balance.v1 import (
    info_service_pb2,
    report_service_pb2,
    transaction_service_pb2,
)
from balance_server import ledger, limits
from balance_server.db import migrations
from balance_server.db.database import Database
from balance_server.db.embedded import EmbeddedPostgres
from balance_server.money import Currencies
from balance_server.servicers.edge import CallGate
from balance_server.servicers.info import InfoServicer
from balance_server.servicers.registry import add_service
from balance_server.servicers.reports import ReportServicer
from balance_server.servicers.transactions import TransactionServicer
from balance_server.settings import Settings

_log = logging.getLogger(__name__)

_SERVICES = {
    "InfoService": info_service_pb2.DESCRIPTOR.services_by_name["InfoService"],
    "TransactionService": transaction_service_pb2.DESCRIPTOR.services_by_name["TransactionService"],
    "ReportService": report_service_pb2.DESCRIPTOR.services_by_name["ReportService"],
}
SERVICE_NAMES = tuple(service.full_name for service in _SERVICES.values())
_WORKER_ENVIRONMENT_FLAG = "BALANCE_INTERNAL_WORKER"


@dataclass
class Running:
    """A started server and what it owns, for tests and for shutdown."""

    server: aio.Server
    port: int
    database: Database
    health: health.aio.HealthServicer
    gate: CallGate
    background: list[asyncio.Task[None]]

    async def stop(self, grace_seconds: float) -> None:
        # Health first, so load balancers stop sending calls; then refuse new calls and let
        # in-flight ones finish within the grace period; then close the pools.
        await self.health.enter_graceful_shutdown()
        # One turn of the event loop lets a health watcher send NOT_SERVING before the server
        # starts refusing new calls; without it a client could see a refusal before NOT_SERVING.
        await asyncio.sleep(0)
        await self.server.stop(grace_seconds)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.database.close()


@contextlib.asynccontextmanager
async def database_dsn(settings: Settings) -> AsyncIterator[str]:
    """The configured DSN, or an embedded PostgreSQL's for as long as the context lasts."""
    if settings.dsn is not None:
        yield settings.dsn
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    dsn = await asyncio.to_thread(embedded.start)
    print(f"balance-server: embedded PostgreSQL with its data in {embedded.data_dir}", file=sys.stderr, flush=True)
    try:
        yield dsn
    finally:
        await asyncio.to_thread(embedded.stop)


async def wait_for_database(dsn: str, settings: Settings) -> None:
    """Bounded waiting for the database at start-up (it may still be starting)."""
    for attempt in range(1, settings.db_connect_attempts + 1):
        try:
            connection = await psycopg.AsyncConnection.connect(dsn, connect_timeout=5)
            await connection.close()
            return
        except psycopg.OperationalError as error:
            if attempt == settings.db_connect_attempts:
                raise SystemExit(
                    f"balance-server: the database is unreachable after {attempt} attempts: {error}"
                ) from error
            _log.warning("database not reachable yet (attempt %d of %d)", attempt, settings.db_connect_attempts)
            await asyncio.sleep(settings.db_connect_interval_seconds)


async def start(
    settings: Settings,
    dsn: str,
    *,
    reuse_port: bool = False,
    interceptors: Sequence[aio.ServerInterceptor] = (),
) -> Running:
    """Connects, builds and starts the server on settings.listen; the caller stops it.
    `interceptors` wrap every call (tests use them to inject faults)."""
    database = Database(dsn, settings)
    await database.open()
    currencies = Currencies(await ledger.load_currencies(database), settings.default_currency)
    gate = CallGate(settings.max_calls_in_flight)
    server = aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", limits.MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", limits.MESSAGE_BYTES_MAX),
            # Off unless workers share the port on purpose: two servers started by mistake on
            # one port must not split the traffic silently.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    add_service(server, InfoServicer(database, currencies, gate), _SERVICES["InfoService"])
    add_service(server, TransactionServicer(database, currencies, gate), _SERVICES["TransactionService"])
    add_service(server, ReportServicer(database, currencies, gate), _SERVICES["ReportService"])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        await database.close()
        raise SystemExit(f"balance-server: cannot listen on {settings.listen}")
    await server.start()
    await _set_health(health_servicer, serving=True)
    background = [asyncio.create_task(_watch_database(database, health_servicer, settings))]
    if settings.idempotency_key_retention_days > 0:
        background.append(asyncio.create_task(_expire_idempotency_keys(database, settings)))
    return Running(server, port, database, health_servicer, gate, background)


async def serve(settings: Settings) -> int:
    reuse_port = os.environ.get(_WORKER_ENVIRONMENT_FLAG) == "1"
    async with database_dsn(settings) as dsn:
        await wait_for_database(dsn, settings)
        if not reuse_port:
            await _migrate(dsn)
        running = await start(settings, dsn, reuse_port=reuse_port)
        host = settings.listen.rsplit(":", 1)[0]
        print(f"balance-server: serving gRPC on {host}:{running.port} (pid {os.getpid()})", file=sys.stderr, flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stopping.set)
        await stopping.wait()
        _log.info("stopping: in-flight calls get %.1f s", settings.shutdown_grace_seconds)
        await running.stop(settings.shutdown_grace_seconds)
    return 0


def serve_workers(settings: Settings) -> int:
    """N server processes on one port (SO_REUSEPORT); this process owns the database and migrations."""
    return asyncio.run(_run_workers(settings))


async def _run_workers(settings: Settings) -> int:
    async with database_dsn(settings) as dsn:
        await wait_for_database(dsn, settings)
        await _migrate(dsn)
        environment = {**os.environ, _WORKER_ENVIRONMENT_FLAG: "1", "BALANCE_DSN": dsn, "BALANCE_WORKERS": "1"}
        workers = [
            await asyncio.create_subprocess_exec(sys.executable, "-m", "balance_server", "serve", env=environment)
            for _ in range(settings.workers)
        ]
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stopping.set)
        # Until asked to stop, or until a worker dies: then all stop, so that a supervisor sees it.
        exits = [asyncio.create_task(worker.wait()) for worker in workers]
        stop_asked = asyncio.create_task(stopping.wait())
        await asyncio.wait([stop_asked, *exits], return_when=asyncio.FIRST_COMPLETED)
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*exits)
        stop_asked.cancel()
        return max(abs(code) for code in codes)


async def migrate_only(settings: Settings) -> int:
    async with database_dsn(settings) as dsn:
        await wait_for_database(dsn, settings)
        applied = await _migrate(dsn)
    print(f"balance-server: applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")
    return 0


async def _migrate(dsn: str) -> list[str]:
    try:
        return await migrations.migrate(dsn)
    except migrations.MigrationError as error:
        raise SystemExit(f"balance-server: {error}") from error


async def _set_health(servicer: health.aio.HealthServicer, *, serving: bool) -> None:
    state = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, state)


async def _watch_database(database: Database, servicer: health.aio.HealthServicer, settings: Settings) -> None:
    """Pings the database: after HEALTH_PING_FAILURES_MAX failed pings in a row, health is
    NOT_SERVING and calls fail at once with UNAVAILABLE; the first ping that passes brings both back.
    One slow ping is not an outage: on saturated cores a ping can miss its time limit."""
    serving, failures = True, 0
    while True:
        await asyncio.sleep(settings.health_check_interval_seconds)
        answered = await database.ping(timeout_seconds=limits.HEALTH_PING_SECONDS_MAX)
        failures = 0 if answered else failures + 1
        reachable = failures < limits.HEALTH_PING_FAILURES_MAX
        if reachable != serving:
            serving = reachable
            if reachable:
                await database.renew_connections()
            database.reachable = reachable
            _log.warning(
                "database %s: health is now %s",
                "reachable" if serving else "unreachable",
                "SERVING" if serving else "NOT_SERVING",
            )
            await _set_health(servicer, serving=serving)


async def _expire_idempotency_keys(database: Database, settings: Settings) -> None:
    while True:
        try:
            deleted = await ledger.delete_expired_idempotency_keys(database, settings.idempotency_key_retention_days)
            if deleted:
                _log.info(
                    "deleted %d idempotency keys older than %d days", deleted, settings.idempotency_key_retention_days
                )
        except Exception:
            _log.exception("deleting expired idempotency keys failed; trying again later")
        await asyncio.sleep(3600)
