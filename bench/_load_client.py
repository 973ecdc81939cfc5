"""The load generator: asyncio gRPC clients in processes of their own, each keeping a fixed number
of calls in flight (a closed loop) for a warm-up and then a measured window.

Raw grpc.aio stubs, requests built in place and latencies kept as floats: the generator must cost
little CPU next to the server it measures. A process runs one plan at a time and sends back a
Tally of the calls that ended inside the measured window.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

import grpc
from grpc import aio

from balance.v1 import (
    info_service_pb2,
    info_service_pb2_grpc,
    transaction_service_pb2,
    transaction_service_pb2_grpc,
)

CALL_SECONDS_MAX: Final = 10.0
"""Deadline of each call: a call that takes longer counts as DEADLINE_EXCEEDED."""
CALLS_PER_PROCESS_MAX: Final = 5_000_000
"""Latencies kept per process and plan, whatever the duration asked for."""
CHANNEL_READY_SECONDS_MAX: Final = 10.0
HOT_USERS: Final = 10
"""Users 1..10 are the hot ones of the `transfer_hot` scenario."""
AMOUNT_CENTS_MAX: Final = 1000
"""Money calls move 0.01 to 10.00 USD."""
ERROR_EXAMPLES_MAX: Final = 5


@dataclass(frozen=True)
class Plan:
    """What one client process runs."""

    scenario: str
    target: str
    process_index: int
    in_flight: int
    channels: int
    start_at: float
    """time.monotonic() when the load starts; the same clock in every process on Linux."""
    warmup_seconds: float
    duration_seconds: float
    bucket_seconds: float
    users: int
    history_user: int
    page_token: str
    order_id_first: int
    seed: int

    @property
    def measure_from(self) -> float:
        return self.start_at + self.warmup_seconds

    @property
    def measure_until(self) -> float:
        return self.measure_from + self.duration_seconds


@dataclass
class Tally:
    """Calls that ended inside the measured window: the statuses of all, the latencies of the
    successful ones."""

    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    statuses: dict[str, int] = field(default_factory=dict)
    """"Method CODE" -> calls."""
    error_examples: dict[str, str] = field(default_factory=dict)
    buckets: dict[int, int] = field(default_factory=dict)
    """Successful calls ended in each bucket_seconds of the window, by bucket index."""
    cpu_seconds: float = 0.0
    """This process's CPU time over the measured window."""
    started_late_seconds: float = 0.0


class Recorder:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tally = Tally()
        self.measure_from = plan.measure_from
        self.measure_until = plan.measure_until

    async def call(self, method: str, invoke: Any, request: Any) -> bool:
        """Makes one call and records it if it ended inside the window; whether it succeeded."""
        started = time.monotonic()
        code = "OK"
        try:
            await invoke(request, timeout=CALL_SECONDS_MAX)
        except aio.AioRpcError as error:
            code = error.code().name
            key = f"{method} {code}"
            if key not in self.tally.error_examples and len(self.tally.error_examples) < ERROR_EXAMPLES_MAX:
                self.tally.error_examples[key] = (error.details() or "")[:300]
        ended = time.monotonic()
        if self.measure_from <= ended < self.measure_until:
            key = f"{method} {code}"
            self.tally.statuses[key] = self.tally.statuses.get(key, 0) + 1
            # Throughput and latency are of answered calls: a server failing fast must not look fast.
            if code == "OK" and len(self.tally.latencies_ms) < CALLS_PER_PROCESS_MAX:
                self.tally.latencies_ms.append((ended - started) * 1000)
                bucket = int((ended - self.measure_from) // self.plan.bucket_seconds)
                self.tally.buckets[bucket] = self.tally.buckets.get(bucket, 0) + 1
        return code == "OK"


@dataclass
class Stubs:
    transactions: transaction_service_pb2_grpc.TransactionServiceStub
    info: info_service_pb2_grpc.InfoServiceStub


Step = Callable[[Recorder, Stubs, random.Random], Awaitable[None]]
"""One unit of a scenario's work: one call, or the two calls of an order."""


def _amount(rng: random.Random) -> str:
    cents = rng.randint(1, AMOUNT_CENTS_MAX)
    return f"{cents // 100}.{cents % 100:02d}"


def _two_users(rng: random.Random, users: int) -> tuple[int, int]:
    source = rng.randint(1, users)
    target = rng.randint(1, users - 1)
    return source, target + 1 if target >= source else target


def _key() -> str:
    return uuid.uuid4().hex


def make_step(plan: Plan) -> Step:
    """The scenario's step, closed over what the plan fixes."""
    users = plan.users
    order_ids = itertools.count(plan.order_id_first)
    transfer = transaction_service_pb2.TransferRequest
    list_request = info_service_pb2.ListTransactionsRequest

    async def transfer_uniform(recorder: Recorder, stubs: Stubs, rng: random.Random) -> None:
        source, target = _two_users(rng, users)
        request = transfer(
            from_user_id=source,
            to_user_id=target,
            amount=_amount(rng),
            currency="USD",
            idempotency_key=_key(),
            comment="bench",
        )
        await recorder.call("Transfer", stubs.transactions.Transfer, request)

    async def transfer_hot(recorder: Recorder, stubs: Stubs, rng: random.Random) -> None:
        # Exactly one hot user per call, sending or receiving with equal odds.
        hot, other = rng.randint(1, HOT_USERS), rng.randint(HOT_USERS + 1, users)
        source, target = (hot, other) if rng.random() < 0.5 else (other, hot)
        request = transfer(
            from_user_id=source,
            to_user_id=target,
            amount=_amount(rng),
            currency="USD",
            idempotency_key=_key(),
            comment="bench",
        )
        await recorder.call("Transfer", stubs.transactions.Transfer, request)

    async def deposit(recorder: Recorder, stubs: Stubs, rng: random.Random) -> None:
        request = transaction_service_pb2.DepositRequest(
            user_id=rng.randint(1, users), amount=_amount(rng), currency="USD", idempotency_key=_key(), source="bench"
        )
        await recorder.call("Deposit", stubs.transactions.Deposit, request)

    async def order_cycle(recorder: Recorder, stubs: Stubs, rng: random.Random) -> None:
        # The order id is the reserve's idempotency key: unique per process and plan.
        order_id, user, service = next(order_ids), rng.randint(1, users), rng.randint(1, 100)
        reserve = transaction_service_pb2.ReserveRequest(
            user_id=user,
            service_id=service,
            order_id=order_id,
            amount=_amount(rng),
            currency="USD",
            service_name=f"Service {service}",
        )
        if not await recorder.call("Reserve", stubs.transactions.Reserve, reserve):
            return
        if rng.random() < 0.5:
            revenue = transaction_service_pb2.RecognizeRevenueRequest(
                user_id=user, service_id=service, order_id=order_id
            )
            await recorder.call("RecognizeRevenue", stubs.transactions.RecognizeRevenue, revenue)
        else:
            release = transaction_service_pb2.ReleaseReserveRequest(order_id=order_id)
            await recorder.call("ReleaseReserve", stubs.transactions.ReleaseReserve, release)

    async def get_balance(recorder: Recorder, stubs: Stubs, rng: random.Random) -> None:
        request = info_service_pb2.GetBalanceRequest(user_id=rng.randint(1, users), currency="USD")
        await recorder.call("GetBalance", stubs.info.GetBalance, request)

    first_page = list_request(user_id=plan.history_user, page_size=50)
    last_page = list_request(user_id=plan.history_user, page_size=50, page_token=plan.page_token)

    async def list_first_page(recorder: Recorder, stubs: Stubs, rng: random.Random) -> None:
        await recorder.call("ListTransactions", stubs.info.ListTransactions, first_page)

    async def list_last_page(recorder: Recorder, stubs: Stubs, rng: random.Random) -> None:
        await recorder.call("ListTransactions", stubs.info.ListTransactions, last_page)

    steps: dict[str, Step] = {
        "transfer_uniform": transfer_uniform,
        "transfer_hot": transfer_hot,
        "deposit": deposit,
        "order_cycle": order_cycle,
        "get_balance": get_balance,
        "list_first_page": list_first_page,
        "list_last_page": list_last_page,
    }
    return steps[plan.scenario]


async def run_plan(plan: Plan) -> Tally:
    # A subchannel pool per channel: each channel gets a TCP connection of its own, so that with
    # --workers N the kernel spreads connections (and so calls) over the server processes.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [aio.insecure_channel(plan.target, options=options) for _ in range(plan.channels)]
    try:
        async with asyncio.timeout(CHANNEL_READY_SECONDS_MAX):
            await asyncio.gather(*(channel.channel_ready() for channel in channels))
        stubs = [
            Stubs(
                transaction_service_pb2_grpc.TransactionServiceStub(channel),
                info_service_pb2_grpc.InfoServiceStub(channel),
            )
            for channel in channels
        ]
        step = make_step(plan)
        recorder = Recorder(plan)
        recorder.tally.started_late_seconds = max(0.0, time.monotonic() - plan.start_at)
        await asyncio.sleep(max(0.0, plan.start_at - time.monotonic()))
        cpu = asyncio.create_task(_measure_cpu(plan, recorder.tally))
        loops = [
            _loop(step, recorder, stubs[index % len(stubs)], random.Random(plan.seed * 1000 + index), plan)
            for index in range(plan.in_flight)
        ]
        await asyncio.gather(*loops)
        await cpu
        return recorder.tally
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


async def _loop(step: Step, recorder: Recorder, stubs: Stubs, rng: random.Random, plan: Plan) -> None:
    while time.monotonic() < plan.measure_until:
        await step(recorder, stubs, rng)


async def _measure_cpu(plan: Plan, tally: Tally) -> None:
    await asyncio.sleep(max(0.0, plan.measure_from - time.monotonic()))
    started = time.process_time()
    await asyncio.sleep(max(0.0, plan.measure_until - time.monotonic()))
    tally.cpu_seconds = time.process_time() - started


def serve(connection: Connection) -> None:
    """A client process: runs the plans it receives until it receives None."""
    while True:
        plan = connection.recv()
        if plan is None:
            return
        try:
            connection.send(asyncio.run(run_plan(plan)))
        except (grpc.RpcError, OSError, TimeoutError) as error:
            connection.send(RuntimeError(f"client {plan.process_index}: {type(error).__name__}: {error}"))
