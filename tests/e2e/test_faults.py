"""The server under faults, as a real process on a real PostgreSQL that the tests break: the
database going away and coming back, SIGKILL and SIGTERM under load, more calls than it may serve.
Each test runs its own server process (bench/cluster.py) on an embedded PostgreSQL the tests own,
whatever BALANCE_TEST_DSN says (stopping PostgreSQL needs that): a database of its own on this
module's PostgreSQL, or, for SIGTERM, the one the server starts itself. The workload and the final
checks of the SIGKILL and SIGTERM tests are those of the bank checker (bench/chaos.py)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balance.v1 import info_service_pb2, info_service_pb2_grpc, transaction_service_pb2, transaction_service_pb2_grpc
from bench import chaos, cluster
from tests.books import Books
from tests.rpc import fails, failure_of

pytestmark = pytest.mark.slow

CALL_SECONDS_MAX = 10.0
FAST_FAILURE_SECONDS_MAX = 2.0
HEALTH_NOTICE_SECONDS_MAX = 5.0
HEALTH_RECOVERY_SECONDS_MAX = 10.0
SHUTDOWN_GRACE_SECONDS = 5.0
CALLS_IN_FLIGHT_MAX = 32
BURST_CALLS = 2000
BURSTS = 3
BURST_DEADLINE_SECONDS = 30.0
BURST_SECONDS_MAX = 20.0
"""Every call of a burst, served or refused, is answered within this, well before its deadline
(2000 calls cost the client and the server seconds of CPU on a shared machine)."""
REFUSAL_SERVER_MS_MEDIAN_MAX = 5.0
"""The median time a handler takes to refuse a call past the limit."""
RSS_GROWTH_MB_MAX = 50.0
RSS_SAMPLE_SECONDS = 0.01
ACTIVE_WAIT_SECONDS_MAX = 30.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[cluster.Postgres]:
    """An embedded PostgreSQL that these tests may stop and start."""
    with tempfile.TemporaryDirectory(prefix="balance-faults-") as scratch:
        started = cluster.Postgres(Path(scratch) / "pgdata")
        started.start()
        try:
            yield started
        finally:
            if started.running():
                started.stop()


def _database(postgres: cluster.Postgres) -> str:
    return postgres.create_database(f"faults_{uuid.uuid4().hex[:12]}")


@contextlib.asynccontextmanager
async def _serving(log_dir: Path, *arguments: str) -> AsyncIterator[tuple[cluster.ServerProcess, aio.Channel]]:
    """The server as a process, serving; stopped at the end."""
    server = cluster.ServerProcess(cluster.free_port(), log_dir / "server.log", list(arguments))
    server.start()
    channel = cluster.open_channel(server.port)
    try:
        await server.wait_until_serving(channel)
        yield server, channel
    finally:
        await asyncio.to_thread(server.stop)
        await channel.close()


def _deposit(user_id: int, amount: str, key: str) -> transaction_service_pb2.DepositRequest:
    return transaction_service_pb2.DepositRequest(user_id=user_id, amount=amount, idempotency_key=key)


async def _timed_failure(call: Any) -> tuple[grpc.StatusCode, str, float]:
    started = time.monotonic()
    failure = await fails(call)
    return failure.code, failure.reason, time.monotonic() - started


async def test_while_the_database_is_down_calls_fail_fast_and_health_says_so_until_it_returns(postgres, tmp_path):
    """With PostgreSQL stopped, health turns NOT_SERVING within seconds and calls with a 10 s
    deadline fail with UNAVAILABLE (DATABASE_UNAVAILABLE) within 2 s; once it is back, health and
    calls recover in the same server process, and the refused deposit was never applied."""
    dsn = _database(postgres)
    async with _serving(tmp_path, "--dsn", dsn, "--health-check-interval", "0.2") as (server, channel):
        transactions = transaction_service_pb2_grpc.TransactionServiceStub(channel)
        info = info_service_pb2_grpc.InfoServiceStub(channel)
        await transactions.Deposit(_deposit(1, "10.00", "before"), timeout=CALL_SECONDS_MAX)
        await asyncio.to_thread(postgres.stop_immediately)
        try:
            await cluster.wait_for_health(channel, cluster.NOT_SERVING, timeout_seconds=HEALTH_NOTICE_SECONDS_MAX)
            failures = [
                await _timed_failure(transactions.Deposit(_deposit(1, "5.00", "during"), timeout=CALL_SECONDS_MAX)),
                await _timed_failure(
                    transactions.ReleaseReserve(
                        transaction_service_pb2.ReleaseReserveRequest(order_id=7), timeout=CALL_SECONDS_MAX
                    )
                ),
                await _timed_failure(
                    info.GetBalance(info_service_pb2.GetBalanceRequest(user_id=1), timeout=CALL_SECONDS_MAX)
                ),
            ]
        finally:
            await asyncio.to_thread(postgres.start_again)
        await cluster.wait_for_health(channel, cluster.SERVING, timeout_seconds=HEALTH_RECOVERY_SECONDS_MAX)
        retry = transactions.Deposit(_deposit(1, "5.00", "during"), timeout=CALL_SECONDS_MAX)
        await retry
        balance = await info.GetBalance(info_service_pb2.GetBalanceRequest(user_id=1), timeout=CALL_SECONDS_MAX)
        still_running = server.exit_code() is None
    for code, reason, seconds in failures:
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        assert seconds < FAST_FAILURE_SECONDS_MAX
    assert ("x-idempotent-replay", "true") not in tuple(await retry.trailing_metadata() or ())
    assert [account.balance for account in balance.accounts] == ["15.00", "0.00"]
    assert still_running


async def _until_money_operations_run(books: Books) -> None:
    """Returns as soon as PostgreSQL is running a money operation."""
    started = time.monotonic()
    while time.monotonic() - started < ACTIVE_WAIT_SECONDS_MAX:
        if await books.value(chaos.ACTIVE_OPERATIONS, "SELECT * FROM balance%"):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"no money operation ran within {ACTIVE_WAIT_SECONDS_MAX} s")


async def test_a_server_killed_mid_transaction_leaves_nothing_partial(postgres, tmp_path):
    """SIGKILL while money operations run in PostgreSQL: the books audit clean at once and after
    the restart, and at the end every acknowledged operation is in the books exactly once, every
    lost answer is told apart by a retry with its key, and nothing else is there."""
    dsn = _database(postgres)
    async with chaos.server_environment(postgres, dsn, tmp_path, pool_max_size=4) as environment:
        run = chaos.Chaos(chaos.Options(operations=2000, faults=()), environment)
        await run.open()
        load = asyncio.create_task(run.run_phase(chaos.Phase("load", (), 2000, 0, mixed=False)))
        await run.model.issued(600)
        async with Books(dsn) as books:
            await _until_money_operations_run(books)
            environment.server.kill()
            audit_at_kill = await books.audit()
            await run.supervisor.ensure_serving()
            audit_after_restart = await books.audit()
        await load
        await run.finish()
    assert audit_at_kill.clean
    assert audit_after_restart.clean
    assert run.model.anomalies == []
    assert run.stats.codes["UNAVAILABLE"] > 0, "calls were cut off by the kill"


async def _watch_for_not_serving(channel: aio.Channel) -> float:
    """When the health Watch stream said NOT_SERVING (time.monotonic())."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    async for update in watch:
        if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            noticed = time.monotonic()
            watch.cancel()  # an open stream would hold the server for its whole grace period
            return noticed
    raise AssertionError("the Watch stream ended without NOT_SERVING")


async def _load_until_stopped(run: chaos.Chaos, stopping: asyncio.Event, failures: list[float]) -> None:
    """One client sending single attempts; records when an answer says nothing definite."""
    while not stopping.is_set():
        for operation in run.plan.next_step():
            operation.attempts_max, operation.duplicate = 1, False
            await run.caller.execute(operation)
            if operation.state == chaos.LOST:
                failures.append(time.monotonic())
                await asyncio.sleep(0.01)


async def test_sigterm_under_load_turns_health_first_drains_calls_and_stops_its_postgres():
    """SIGTERM while 64 clients send money operations to a server with its own embedded
    PostgreSQL: health says NOT_SERVING before any call is refused, calls end OK or with
    UNAVAILABLE/CANCELLED (never UNKNOWN or INTERNAL), the process exits 0 within the grace
    period, its PostgreSQL is stopped, and every acknowledged operation is in the books."""
    with tempfile.TemporaryDirectory(prefix="balance-sigterm-") as scratch_name:
        scratch = Path(scratch_name)
        data_dir = scratch / "pgdata"
        port = cluster.free_port()
        embedded = cluster.ServerProcess(
            port, scratch / "server.log", ["--data-dir", str(data_dir), "--shutdown-grace", str(SHUTDOWN_GRACE_SECONDS)]
        )
        postgres = cluster.Postgres(data_dir)
        channel = cluster.open_channel(port)
        environment = chaos.Environment(postgres, "", embedded, channel)
        try:
            run = chaos.Chaos(chaos.Options(operations=1, faults=(), users=8, hot_users=2), environment)
            await run.open()
            stopping, failures = asyncio.Event(), list[float]()
            clients = [asyncio.create_task(_load_until_stopped(run, stopping, failures)) for _ in range(64)]
            watching = asyncio.create_task(_watch_for_not_serving(channel))
            await run.model.issued(400)
            signalled = time.monotonic()
            embedded.terminate()
            exit_code = await embedded.wait_exit()
            exit_seconds = time.monotonic() - signalled
            not_serving_at = await watching
            stopping.set()
            await asyncio.gather(*clients)
            postgres_stopped = not postgres.running()
            # The books, through a server on the same data folder: lost answers settled, then checked.
            environment.dsn = await asyncio.to_thread(postgres.start)
            environment.server = cluster.ServerProcess(
                port, scratch / "server.log", chaos.server_arguments(environment.dsn, 4)
            )
            await run.finish()
        finally:
            await asyncio.to_thread(environment.server.stop)
            await channel.close()
            if postgres.running():
                await asyncio.to_thread(postgres.stop)
    assert exit_code == 0
    assert exit_seconds < SHUTDOWN_GRACE_SECONDS
    assert postgres_stopped
    assert failures, "calls were refused once the server stopped"
    assert not_serving_at <= min(failures)
    assert set(run.stats.codes) <= {"OK", "FAILED_PRECONDITION", "UNAVAILABLE", "CANCELLED"}
    assert run.model.anomalies == []


class _RssPeak:
    """The highest resident set size of a process while the context lasts, sampled every 10 ms."""

    def __init__(self, server: cluster.ServerProcess) -> None:
        self.server = server
        self.peak_kb = 0

    async def __aenter__(self) -> _RssPeak:
        self.peak_kb = self.server.rss_kb()
        self._sampling = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sampling.cancel()
        await asyncio.gather(self._sampling, return_exceptions=True)
        self.peak_kb = max(self.peak_kb, self.server.rss_kb())

    async def _sample(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, self.server.rss_kb())
            await asyncio.sleep(RSS_SAMPLE_SECONDS)


async def _burst(transactions, burst: int) -> list[tuple[str, str, float]]:
    """BURST_CALLS deposits at once on four users: (code, reason, seconds) of each."""

    async def one(index: int) -> tuple[str, str, float]:
        started = time.monotonic()
        request = _deposit(1 + index % 4, "1.00", f"burst-{burst}-{index}")
        try:
            await transactions.Deposit(request, timeout=BURST_DEADLINE_SECONDS)
            return "OK", "", time.monotonic() - started
        except aio.AioRpcError as error:
            failure = failure_of(error)
            return failure.code.name, failure.reason, time.monotonic() - started

    return await asyncio.gather(*(one(index) for index in range(BURST_CALLS)))


def _server_durations_ms(log: str, code: str) -> list[float]:
    """Durations the server logged for Deposit calls that ended with `code` (lines end with
    'Deposit CODE 1.2ms')."""
    durations = []
    for line in log.splitlines():
        words = line.split()
        if len(words) >= 3 and words[-3:-1] == ["Deposit", code]:
            durations.append(float(words[-1].removesuffix("ms")))
    return durations


async def test_past_max_calls_in_flight_the_server_refuses_at_once_and_its_memory_stays_bounded(postgres, tmp_path):
    """Three bursts of 2000 concurrent deposits at a server limited to 32 calls in flight: the
    calls past the limit are refused with RESOURCE_EXHAUSTED (TOO_MANY_CALLS) at once (a median
    under 5 ms in the handler, which a served call spends waiting its turn), every call is answered
    within 20 s of a 30 s deadline, the calls gRPC itself sheds as CANCELLED never reach a handler,
    exactly the served deposits are in the books, and the server's memory never grows by more than
    50 MB."""
    dsn = _database(postgres)
    arguments = ("--dsn", dsn, "--max-calls-in-flight", str(CALLS_IN_FLIGHT_MAX), "--log-level", "INFO")
    async with _serving(tmp_path, *arguments) as (server, channel):
        transactions = transaction_service_pb2_grpc.TransactionServiceStub(channel)
        for user_id in range(1, 5):
            await transactions.Deposit(_deposit(user_id, "1.00", f"warm-{user_id}"), timeout=CALL_SECONDS_MAX)
        baseline_kb = server.rss_kb()
        results, peaks_kb = [], []
        for burst in range(BURSTS):
            async with _RssPeak(server) as peak:
                results += await _burst(transactions, burst)
            peaks_kb.append(peak.peak_kb)
        log = server.log_path.read_text()
    codes = Counter((code, reason) for code, reason, _ in results)
    async with Books(dsn) as books:
        deposited = await books.value("SELECT count(*) FROM transactions WHERE idempotency_key LIKE %s", "burst-%")
    assert set(codes) <= {("OK", ""), ("RESOURCE_EXHAUSTED", "TOO_MANY_CALLS"), ("CANCELLED", "")}
    assert codes["RESOURCE_EXHAUSTED", "TOO_MANY_CALLS"] > codes["CANCELLED", ""]
    assert max(seconds for _, _, seconds in results) < BURST_SECONDS_MAX
    refusals_ms = _server_durations_ms(log, "RESOURCE_EXHAUSTED")
    served_ms = _server_durations_ms(log, "OK")
    assert len(refusals_ms) == codes["RESOURCE_EXHAUSTED", "TOO_MANY_CALLS"]
    assert statistics.median(refusals_ms) < REFUSAL_SERVER_MS_MEDIAN_MAX
    assert len(served_ms) == codes["OK", ""] + 4
    assert deposited == codes["OK", ""]
    assert max(peaks_kb) - baseline_kb < RSS_GROWTH_MB_MAX * 1024
