"""The bank checker: many concurrent clients move money while the harness breaks things, then proves
the books stayed right.

Starts an embedded PostgreSQL in a temporary folder and the real server as a subprocess on it
(money pool of 4 connections, far fewer than the calls in flight). Clients deposit, withdraw,
transfer, reserve, release and recognize revenue (full and partial) over a set of users of which a
few are hot; every call carries an idempotency key (Reserve: its order id; releases and revenue are
keyed by their order) and is retried with the same key until it gets a definite answer or its
attempts run out. Meanwhile faults are injected, first each kind on its own, then all mixed:

    server_kill         the server is killed with SIGKILL and started again
    postgres_restart    PostgreSQL is restarted in immediate mode (a crash, then crash recovery)
    backend_terminate   random database connections are terminated (pg_terminate_backend)
    client_cancel       calls are cancelled by the client mid-call
    tiny_deadline       calls are sent with deadlines of a few milliseconds

During the run a reader checks, through the API, that balances stay within what acknowledged and
in-flight operations allow, that orders are in a state their operations allow, and that
acknowledged transactions stay readable after every fault (Jepsen-style reads). At the end every
operation whose answer was lost is settled by retrying it with its key (checking that the database
and the retry agree on whether it had been applied), and the books are checked from PostgreSQL and
through the API. Prints the figures; exits 1 if any anomaly was found.

    python bench/chaos.py [--operations N] [--concurrency N] [--faults all|none|KIND,...] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import grpc
import psycopg
from grpc import aio

REPOSITORY: Final = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from balance.v1 import (  # noqa: E402  (after the repository is importable)
    info_service_pb2,
    info_service_pb2_grpc,
    transaction_service_pb2,
    transaction_service_pb2_grpc,
    types_pb2,
)
from balance_server.db import migrations  # noqa: E402
from bench import cluster  # noqa: E402
from tests.books import Books  # noqa: E402
from tests.rpc import failure_of  # noqa: E402

RESULTS_PATH: Final = REPOSITORY / "bench" / "results" / "chaos.json"

# Operations and fault kinds.
DEPOSIT: Final = "deposit"
WITHDRAW: Final = "withdraw"
TRANSFER: Final = "transfer"
RESERVE: Final = "reserve"
RELEASE: Final = "release"
REVENUE: Final = "revenue"
KEYED_KINDS: Final = (DEPOSIT, WITHDRAW, TRANSFER)
"""Kinds carrying an idempotency key; the others are keyed by their order."""
FINAL_KINDS: Final = (RELEASE, REVENUE)

SERVER_KILL: Final = "server_kill"
POSTGRES_RESTART: Final = "postgres_restart"
BACKEND_TERMINATE: Final = "backend_terminate"
CLIENT_CANCEL: Final = "client_cancel"
TINY_DEADLINE: Final = "tiny_deadline"
FAULT_KINDS: Final = (SERVER_KILL, POSTGRES_RESTART, BACKEND_TERMINATE, CLIENT_CANCEL, TINY_DEADLINE)
CLIENT_FAULTS: Final = (CLIENT_CANCEL, TINY_DEADLINE)

# The workload.
CONCURRENCY_DEFAULT: Final = 96
USERS_DEFAULT: Final = 40
HOT_USERS_DEFAULT: Final = 3
HOT_SHARE: Final = 0.8
"""Share of user picks that fall on a hot user."""
KIND_WEIGHTS: Final = {DEPOSIT: 18, WITHDRAW: 14, TRANSFER: 30, RESERVE: 18, "final": 20}
FULL_REVENUE_SHARE: Final = 0.3
PARTIAL_REVENUE_SHARE: Final = 0.3
"""The rest of an order's final operations are releases."""
CONFLICT_SHARE: Final = 0.15
"""Orders that get two competing final operations at once: exactly one may win."""
DUPLICATE_SHARE: Final = 0.02
"""Operations sent twice at once with the same key, as a client racing its own retry would."""
IMPATIENT_SHARE: Final = 0.05
"""Operations whose client gives up after one attempt whatever the answer: a lost answer stays
lost until the end of the run, when the checker comes back with the same key."""
OPENING_DEPOSIT_MINOR: Final = 50_000
DEPOSIT_MINOR_MAX: Final = 20_000
DEBIT_MINOR_MAX: Final = 20_000
RESERVE_MINOR_MAX: Final = 10_000
SERVICES: Final = 5
ORDER_ID_FIRST: Final = 1_000_000
POOL_MAX_SIZE_DEFAULT: Final = 4
READ_POOL_MAX_SIZE: Final = 4

# Calls and retries.
ATTEMPTS_MAX: Final = 12
RETRY_DELAY_MS_BASE: Final = 20
RETRY_DELAY_MS_MAX: Final = 1000
CALL_SECONDS_MAX: Final = 10.0
TINY_DEADLINE_MS_MAX: Final = 40
CANCEL_AFTER_MS_MAX: Final = 40
DEFINITE_CODES: Final = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
"""Answers that say the operation was refused and nothing moved."""
RETRY_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Answers after which the same request, with the same key, is sent again. Any other code
(UNKNOWN, INTERNAL, ...) is an anomaly, and is retried too so that the run can still settle."""
EXPECTED_REFUSALS: Final = {
    DEPOSIT: frozenset[str](),
    WITHDRAW: frozenset({"INSUFFICIENT_FUNDS"}),
    TRANSFER: frozenset({"INSUFFICIENT_FUNDS"}),
    RESERVE: frozenset({"INSUFFICIENT_FUNDS"}),
    RELEASE: frozenset[str](),
    REVENUE: frozenset[str](),
}
"""Besides ORDER_STATE_CONFLICT for a final operation that competed with another one."""

# Faults.
SINGLE_PHASE_SHARE: Final = 0.1
"""Share of the operations run under each fault kind on its own; the rest run with all mixed."""
OPERATIONS_PER_FAULT: Final = 2000
BURST_SECONDS: Final = 1.5
BURST_SHARE: Final = 0.5
"""Share of calls cancelled (or sent with a tiny deadline) during a burst of that fault."""
BACKGROUND_CLIENT_FAULT_SHARE: Final = 0.01
"""Share of calls hit by each client fault throughout the mixed phase."""
BACKENDS_TERMINATED_MAX: Final = 4
POST_FAULT_SAMPLE_RECENT: Final = 50
POST_FAULT_SAMPLE_RANDOM: Final = 50
RECOVERY_SECONDS_MAX: Final = 90.0
SERVER_STARTS_MAX: Final = 10

# Reads and the end.
READ_INTERVAL_SECONDS: Final = 0.5
READ_ORDERS_SAMPLE: Final = 5
READ_TRANSACTIONS_SAMPLE: Final = 5
READ_ATTEMPTS_MAX: Final = 5
QUIESCE_SECONDS_MAX: Final = 30.0
RESOLVE_ATTEMPTS_MAX: Final = 20
HISTORY_PAGE_SIZE: Final = 1000
API_ORDERS_SAMPLE: Final = 500
ANOMALIES_PRINTED_MAX: Final = 50
STOP_SECONDS_MAX: Final = 30.0

PENDING: Final = "pending"
ACKNOWLEDGED: Final = "acknowledged"
REFUSED: Final = "refused"
LOST: Final = "lost"

REGULAR: Final = "regular"
RESERVED: Final = "reserve"

TRANSACTION_KINDS: Final = {
    DEPOSIT: types_pb2.TRANSACTION_KIND_DEPOSIT,
    WITHDRAW: types_pb2.TRANSACTION_KIND_WITHDRAWAL,
    TRANSFER: types_pb2.TRANSACTION_KIND_TRANSFER,
    RESERVE: types_pb2.TRANSACTION_KIND_RESERVE,
    RELEASE: types_pb2.TRANSACTION_KIND_RELEASE,
    REVENUE: types_pb2.TRANSACTION_KIND_REVENUE,
}
DATABASE_KINDS: Final = {
    DEPOSIT: "deposit",
    WITHDRAW: "withdrawal",
    TRANSFER: "transfer",
    RESERVE: "reserve",
    RELEASE: "release",
    REVENUE: "revenue",
}
ORDER_STATUSES: Final = {
    "reserved": types_pb2.ORDER_STATUS_RESERVED,
    "captured": types_pb2.ORDER_STATUS_CAPTURED,
    "released": types_pb2.ORDER_STATUS_RELEASED,
}

Account = tuple[int, str]
"""(user id, REGULAR or RESERVED)."""


def money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def minor_units(text: str) -> int:
    """USD minor units of an amount the server returned (Decimal only at this edge)."""
    return int(Decimal(text) * 100)


# The model: what the checker sent, what it was told, and what that allows.


@dataclass(eq=False)
class Operation:
    number: int
    kind: str
    request: Any
    effects: dict[Account, int]
    """What the operation does to user accounts if it is applied, in minor units."""
    user_id: int
    amount: int
    """The transaction's amount: for revenue, what is captured."""
    order_id: int = 0
    key: str = ""
    """The idempotency key (deposits, withdrawals, transfers)."""
    attempts_max: int = ATTEMPTS_MAX
    duplicate: bool = False
    conflicting: bool = False
    state: str = PENDING
    transaction_id: str = ""
    refusal: str = ""
    attempts: int = 0
    lost_answers: int = 0
    """Attempts whose answer did not say whether the operation was applied."""
    resolved: str = ""
    """How the end settled an operation whose answer was lost: 'applied' or 'not applied'."""

    def __str__(self) -> str:
        target = f"order {self.order_id}" if self.order_id else f"key {self.key}"
        return f"{self.kind} #{self.number} ({target}, {money(self.amount)})"


@dataclass(eq=False)
class OrderModel:
    order_id: int
    user_id: int
    service_id: int
    amount: int
    reserve: Operation
    finals: list[Operation] = field(default_factory=list)


@dataclass(eq=False)
class Window:
    """A read of one user's balances: what was acknowledged when it began, and every operation
    that may or may not have been applied when it happened."""

    user_id: int
    acknowledged: dict[str, int]
    pending: set[Operation]

    def bounds(self, account_kind: str) -> tuple[int, int]:
        account = (self.user_id, account_kind)
        changes = [operation.effects.get(account, 0) for operation in self.pending]
        base = self.acknowledged[account_kind]
        return base + sum(min(0, change) for change in changes), base + sum(max(0, change) for change in changes)


class Model:
    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self.acknowledged: dict[Account, int] = defaultdict(int)
        self.unsettled: dict[Account, set[Operation]] = defaultdict(set)
        self.windows: list[Window] = []
        self.orders: dict[int, OrderModel] = {}
        self.open_orders: list[int] = []
        self.acknowledged_log: list[Operation] = []
        self.anomalies: list[str] = []
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self.database_faults: list[list[float]] = []
        """[start, end] of each PostgreSQL restart and backend termination (end: inf until done)."""
        self.replays_inside_server = 0

    def anomaly(self, text: str) -> None:
        self.anomalies.append(text)
        if len(self.anomalies) <= ANOMALIES_PRINTED_MAX:
            print(f"ANOMALY: {text}", file=sys.stderr, flush=True)

    def issue(self, operation: Operation) -> None:
        self.operations.append(operation)
        for account in operation.effects:
            self.unsettled[account].add(operation)
        for window in self.windows:
            if any(user_id == window.user_id for user_id, _ in operation.effects):
                window.pending.add(operation)
        reached = [entry for entry in self._waiting if entry[0] <= len(self.operations)]
        for entry in reached:
            self._waiting.remove(entry)
            entry[1].set_result(None)

    def database_fault_during(self, start: float, end: float) -> bool:
        return any(fault_start <= end and start <= fault_end for fault_start, fault_end in self.database_faults)

    async def issued(self, count: int) -> None:
        """Returns once `count` operations have been issued."""
        if len(self.operations) < count:
            waiting = asyncio.get_running_loop().create_future()
            self._waiting.append((count, waiting))
            await waiting

    def settle(self, operation: Operation, state: str) -> None:
        operation.state = state
        if state == LOST:
            return
        for account, change in operation.effects.items():
            self.unsettled[account].discard(operation)
            if state == ACKNOWLEDGED:
                self.acknowledged[account] += change
        if state == ACKNOWLEDGED:
            self.acknowledged_log.append(operation)
            if operation.kind == RESERVE:
                self.open_orders.append(operation.order_id)

    def open_window(self, user_id: int) -> Window:
        pending = self.unsettled[(user_id, REGULAR)] | self.unsettled[(user_id, RESERVED)]
        acknowledged = {kind: self.acknowledged[(user_id, kind)] for kind in (REGULAR, RESERVED)}
        window = Window(user_id, acknowledged, set(pending))
        self.windows.append(window)
        return window

    def close_window(self, window: Window) -> None:
        self.windows.remove(window)

    def lost(self) -> list[Operation]:
        return [operation for operation in self.operations if operation.state == LOST]


# The workload.


class Plan:
    """Draws the next random operations: users (mostly hot ones), kinds, amounts, keys."""

    def __init__(self, rng: random.Random, model: Model, users: int, hot_users: int, seed: int) -> None:
        self.rng = rng
        self.model = model
        self.users = list(range(1, users + 1))
        self.hot = self.users[:hot_users]
        self.seed = seed
        self.numbers = 0
        self.next_order_id = ORDER_ID_FIRST

    def opening_deposits(self) -> list[Operation]:
        return [self._deposit(user_id, OPENING_DEPOSIT_MINOR) for user_id in self.users]

    def next_step(self) -> list[Operation]:
        """One operation, or two competing final operations on one order."""
        kind = self.rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        if kind == "final" and self.model.open_orders:
            step = self._finals()
        elif kind == DEPOSIT:
            step = [self._deposit(self._user(), self.rng.randint(1, DEPOSIT_MINOR_MAX))]
        elif kind == WITHDRAW:
            step = [self._withdraw()]
        elif kind == TRANSFER:
            step = [self._transfer()]
        else:
            step = [self._reserve()]
        for operation in step:
            operation.duplicate = len(step) == 1 and self.rng.random() < DUPLICATE_SHARE
            operation.attempts_max = 1 if self.rng.random() < IMPATIENT_SHARE else ATTEMPTS_MAX
        return step

    def _user(self) -> int:
        return self.rng.choice(self.hot) if self.rng.random() < HOT_SHARE else self.rng.choice(self.users)

    def _number(self) -> int:
        self.numbers += 1
        return self.numbers

    def _key(self, number: int) -> str:
        return f"chaos-{self.seed}-{number}"

    def _deposit(self, user_id: int, amount: int) -> Operation:
        number = self._number()
        request = transaction_service_pb2.DepositRequest(
            user_id=user_id, amount=money(amount), source="chaos", idempotency_key=self._key(number)
        )
        return Operation(number, DEPOSIT, request, {(user_id, REGULAR): amount}, user_id, amount, key=self._key(number))

    def _withdraw(self) -> Operation:
        number, user_id, amount = self._number(), self._user(), self.rng.randint(1, DEBIT_MINOR_MAX)
        request = transaction_service_pb2.WithdrawRequest(
            user_id=user_id, amount=money(amount), destination="chaos", idempotency_key=self._key(number)
        )
        effects = {(user_id, REGULAR): -amount}
        return Operation(number, WITHDRAW, request, effects, user_id, amount, key=self._key(number))

    def _transfer(self) -> Operation:
        number, source, amount = self._number(), self._user(), self.rng.randint(1, DEBIT_MINOR_MAX)
        target = self._user()
        while target == source:
            target = self._user()
        request = transaction_service_pb2.TransferRequest(
            from_user_id=source, to_user_id=target, amount=money(amount), idempotency_key=self._key(number)
        )
        effects = {(source, REGULAR): -amount, (target, REGULAR): amount}
        return Operation(number, TRANSFER, request, effects, source, amount, key=self._key(number))

    def _reserve(self) -> Operation:
        number, user_id, amount = self._number(), self._user(), self.rng.randint(1, RESERVE_MINOR_MAX)
        order_id, service_id = self.next_order_id, self.rng.randint(1, SERVICES)
        self.next_order_id += 1
        request = transaction_service_pb2.ReserveRequest(
            user_id=user_id,
            service_id=service_id,
            order_id=order_id,
            amount=money(amount),
            service_name=f"Service {service_id}",
        )
        effects = {(user_id, REGULAR): -amount, (user_id, RESERVED): amount}
        operation = Operation(number, RESERVE, request, effects, user_id, amount, order_id=order_id)
        self.model.orders[order_id] = OrderModel(order_id, user_id, service_id, amount, operation)
        return operation

    def _finals(self) -> list[Operation]:
        order_ids = self.model.open_orders
        index = self.rng.randrange(len(order_ids))
        order_ids[index], order_ids[-1] = order_ids[-1], order_ids[index]
        order = self.model.orders[order_ids.pop()]
        captures = self._captures(order, 2 if self.rng.random() < CONFLICT_SHARE else 1)
        finals = [self._final(order, captured) for captured in captures]
        for final in finals:
            final.conflicting = len(finals) > 1
            order.finals.append(final)
        return finals

    def _captures(self, order: OrderModel, count: int) -> list[int | None]:
        """Distinct outcomes for an order: None releases it, 0 captures all, N captures N."""
        choices: list[int | None] = [None, 0]
        if order.amount > 1:
            choices.append(self.rng.randint(1, order.amount - 1))
        weights = [1 - FULL_REVENUE_SHARE - PARTIAL_REVENUE_SHARE, FULL_REVENUE_SHARE, PARTIAL_REVENUE_SHARE]
        first = self.rng.choices(choices, weights=weights[: len(choices)])[0]
        others = [choice for choice in choices if choice != first]
        return [first, self.rng.choice(others)][:count]

    def _final(self, order: OrderModel, captured: int | None) -> Operation:
        number, user_id, reserved = self._number(), order.user_id, order.amount
        if captured is None:
            request: Any = transaction_service_pb2.ReleaseReserveRequest(order_id=order.order_id)
            effects = {(user_id, RESERVED): -reserved, (user_id, REGULAR): reserved}
            return Operation(number, RELEASE, request, effects, user_id, reserved, order_id=order.order_id)
        amount = captured or reserved
        request = transaction_service_pb2.RecognizeRevenueRequest(
            user_id=user_id,
            service_id=order.service_id,
            order_id=order.order_id,
            amount=money(captured) if captured else "",
        )
        effects = {(user_id, RESERVED): -reserved}
        if reserved > amount:
            effects[(user_id, REGULAR)] = reserved - amount
        return Operation(number, REVENUE, request, effects, user_id, amount, order_id=order.order_id)


# Calls.


@dataclass
class Answer:
    code: grpc.StatusCode | None
    """None when the call succeeded."""
    reason: str = ""
    transaction: Any = None
    replayed: bool = False
    started: float = 0.0
    """When the call was sent (time.monotonic()); `ended` when its answer came."""
    ended: float = 0.0

    @property
    def definite(self) -> bool:
        return self.code is None or self.code in DEFINITE_CODES


@dataclass
class Stats:
    calls: int = 0
    retries: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    client_faults: Counter[str] = field(default_factory=Counter)
    """Calls cancelled or sent with a tiny deadline, by kind."""
    faults: Counter[str] = field(default_factory=Counter)
    """Fault episodes by kind."""
    backends_terminated: int = 0
    failed_server_starts: int = 0
    reads: Counter[str] = field(default_factory=Counter)
    post_fault_checks: int = 0


class Caller:
    """Sends operations with the same key until a definite answer or ATTEMPTS_MAX attempts."""

    def __init__(self, channel: aio.Channel, rng: random.Random, stats: Stats, model: Model) -> None:
        stub = transaction_service_pb2_grpc.TransactionServiceStub(channel)
        self.methods: dict[str, Any] = {
            DEPOSIT: stub.Deposit,
            WITHDRAW: stub.Withdraw,
            TRANSFER: stub.Transfer,
            RESERVE: stub.Reserve,
            RELEASE: stub.ReleaseReserve,
            REVENUE: stub.RecognizeRevenue,
        }
        self.rng = rng
        self.stats = stats
        self.model = model
        self.client_fault_shares = dict.fromkeys(CLIENT_FAULTS, 0.0)

    async def execute(self, operation: Operation) -> None:
        self.model.issue(operation)
        runs = 2 if operation.duplicate else 1
        answers = await asyncio.gather(
            *(self.settle(operation, attempts_max=operation.attempts_max) for _ in range(runs))
        )
        conclude(self.model, operation, [answer for answer in answers if answer is not None])

    async def settle(
        self, operation: Operation, *, attempts_max: int = ATTEMPTS_MAX, faults: bool = True
    ) -> Answer | None:
        """The definite answer, or None when every attempt's answer was lost."""
        for attempt in range(1, attempts_max + 1):
            answer = await self.call(operation, faults=faults)
            operation.attempts += 1
            self.stats.calls += 1
            self.stats.retries += attempt > 1
            self.stats.codes[answer.code.name if answer.code else "OK"] += 1
            if answer.definite:
                return answer
            operation.lost_answers += 1
            if answer.code not in RETRY_CODES:
                self.model.anomaly(f"{operation}: {answer.code} {answer.reason!r}")
            if attempt < attempts_max:
                await asyncio.sleep(_backoff_seconds(self.rng, attempt))
        return None

    async def call(self, operation: Operation, *, faults: bool = True) -> Answer:
        fault = self._client_fault() if faults else ""
        timeout = CALL_SECONDS_MAX
        if fault == TINY_DEADLINE:
            timeout = self.rng.uniform(1, TINY_DEADLINE_MS_MAX) / 1000
        started = time.monotonic()
        call = self.methods[operation.kind](operation.request, timeout=timeout)
        cancelling = None
        if fault == CLIENT_CANCEL:
            delay = self.rng.uniform(0, CANCEL_AFTER_MS_MAX) / 1000
            cancelling = asyncio.get_running_loop().call_later(delay, call.cancel)
        try:
            response = await call
            trailing = await call.trailing_metadata()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if call.cancelled() and current is not None and current.cancelling() == 0:
                return Answer(grpc.StatusCode.CANCELLED)
            raise
        except aio.AioRpcError as error:
            return Answer(error.code(), failure_of(error).reason)
        finally:
            if cancelling is not None:
                cancelling.cancel()
        replayed = ("x-idempotent-replay", "true") in tuple(trailing or ())
        return Answer(
            None, transaction=response.transaction, replayed=replayed, started=started, ended=time.monotonic()
        )

    def _client_fault(self) -> str:
        roll = self.rng.random()
        for kind, share in self.client_fault_shares.items():
            if roll < share:
                self.stats.client_faults[kind] += 1
                return kind
            roll -= share
        return ""


def _backoff_seconds(rng: random.Random, attempt: int) -> float:
    ceiling_ms = min(RETRY_DELAY_MS_MAX, RETRY_DELAY_MS_BASE * 2**attempt)
    return rng.uniform(ceiling_ms / 2, ceiling_ms) / 1000


def conclude(model: Model, operation: Operation, answers: list[Answer]) -> None:
    """Checks the definite answers an operation got (two when it was sent twice) and settles it."""
    acknowledged = [answer for answer in answers if answer.code is None]
    refused = [answer for answer in answers if answer.code is not None]
    if not answers:
        model.settle(operation, LOST)
        return
    if not acknowledged:
        reasons = {answer.reason for answer in refused}
        if len(reasons) > 1 and operation.kind != RESERVE:
            model.anomaly(f"{operation}: one key, different refusals {sorted(reasons)}")
        _check_refusal(model, operation, refused[0])
        operation.refusal = refused[0].reason
        model.settle(operation, REFUSED)
        return
    identifiers = {answer.transaction.transaction_id for answer in acknowledged}
    if len(identifiers) > 1:
        model.anomaly(f"{operation}: one key, different transactions {sorted(identifiers)}")
    if refused and operation.kind != RESERVE:
        model.anomaly(f"{operation}: one key both applied and refused ({refused[0].reason})")
    for answer in acknowledged:
        if answer.replayed and operation.lost_answers == 0 and not operation.duplicate:
            _check_replay_inside_server(model, operation, answer)
    _check_transaction(model, operation, acknowledged[0].transaction)
    operation.transaction_id = acknowledged[0].transaction.transaction_id
    model.settle(operation, ACKNOWLEDGED)


def _check_replay_inside_server(model: Model, operation: Operation, answer: Answer) -> None:
    """A replay on the first attempt is the server's own doing: its database connection was lost
    after the commit (a terminated backend, a crashed PostgreSQL), and it ran the keyed operation
    again, which found it applied. Anywhere else it would mean something applied it before."""
    if model.database_fault_during(answer.started, answer.ended):
        model.replays_inside_server += 1
    else:
        model.anomaly(f"{operation}: a replay although nothing could have applied it before")


def _check_refusal(model: Model, operation: Operation, answer: Answer) -> None:
    expected = EXPECTED_REFUSALS[operation.kind]
    if operation.conflicting:
        expected = expected | {"ORDER_STATE_CONFLICT"}
    if answer.code != grpc.StatusCode.FAILED_PRECONDITION or answer.reason not in expected:
        model.anomaly(f"{operation}: unexpected refusal {answer.code} {answer.reason}")


def _check_transaction(model: Model, operation: Operation, transaction: Any) -> None:
    """The transaction an operation was acknowledged with is the one it asked for."""
    problems = []
    if transaction.kind != TRANSACTION_KINDS[operation.kind]:
        problems.append(f"kind {transaction.kind}")
    if minor_units(transaction.amount) != operation.amount:
        problems.append(f"amount {transaction.amount}")
    if operation.order_id and transaction.order_id != operation.order_id:
        problems.append(f"order {transaction.order_id}")
    if operation.key and transaction.idempotency_key != operation.key:
        problems.append(f"key {transaction.idempotency_key!r}")
    if operation.user_id not in (transaction.from_user_id, transaction.to_user_id):
        problems.append(f"users {transaction.from_user_id} -> {transaction.to_user_id}")
    if problems:
        model.anomaly(f"{operation}: acknowledged with another transaction: {', '.join(problems)}")


# Reads during the run.


class Reader:
    """Jepsen-style reads through the API while operations and faults go on."""

    def __init__(self, channel: aio.Channel, model: Model, plan: Plan, stats: Stats, rng: random.Random) -> None:
        self.info = info_service_pb2_grpc.InfoServiceStub(channel)
        self.model = model
        self.plan = plan
        self.stats = stats
        self.rng = rng

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.read_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), READ_INTERVAL_SECONDS)

    async def read_once(self) -> None:
        users = self.plan.hot + self.rng.sample(self.plan.users, 2)
        reserved = [order for order in self.model.orders.values() if order.reserve.state == ACKNOWLEDGED]
        orders = self.rng.sample(reserved, min(READ_ORDERS_SAMPLE, len(reserved)))
        log = self.model.acknowledged_log
        transactions = self.rng.sample(log, min(READ_TRANSACTIONS_SAMPLE, len(log)))
        await asyncio.gather(
            *(self.read_balance(user_id) for user_id in users),
            *(self.read_order(order) for order in orders),
            *(self.expect_transaction(operation, "while running") for operation in transactions),
        )

    async def read_balance(self, user_id: int) -> None:
        """Each balance lies between what the acknowledged operations left and what the ones in
        flight (or with lost answers) could add or take."""
        window = self.model.open_window(user_id)
        try:
            response = await self._read(self.info.GetBalance, info_service_pb2.GetBalanceRequest(user_id=user_id))
        finally:
            self.model.close_window(window)
        if response is None:
            return
        self.stats.reads["balance"] += 1
        balances = _balances_of(response)
        for kind in (REGULAR, RESERVED):
            low, high = window.bounds(kind)
            if not max(0, low) <= balances[kind] <= high:
                self.model.anomaly(
                    f"user {user_id} {kind} balance read {money(balances[kind])}, outside"
                    f" [{money(max(0, low))}, {money(high)}] that the operations allow"
                )

    async def read_order(self, order: OrderModel) -> None:
        """An order is reserved, or in the state of a final operation sent for it; once one was
        acknowledged, in exactly that state."""
        acknowledged = [final for final in order.finals if final.state == ACKNOWLEDGED]
        response = await self._read(self.info.GetOrder, info_service_pb2.GetOrderRequest(order_id=order.order_id))
        if response is None:
            return
        self.stats.reads["order"] += 1
        if acknowledged:
            allowed = {_final_state(acknowledged[0])}
        else:
            allowed = {(types_pb2.ORDER_STATUS_RESERVED, 0)} | {_final_state(final) for final in order.finals}
        seen = (response.order.status, minor_units(response.order.captured_amount))
        if seen not in allowed or minor_units(response.order.reserved_amount) != order.amount:
            self.model.anomaly(f"order {order.order_id} read as {response.order}, allowed only {sorted(allowed)}")

    async def expect_transaction(self, operation: Operation, when: str) -> None:
        """An acknowledged transaction stays in the books, as it was acknowledged."""
        request = info_service_pb2.GetTransactionRequest(transaction_id=operation.transaction_id)
        response = await self._read(self.info.GetTransaction, request, missing_is_anomaly=f"{operation} {when}")
        if response is None:
            return
        self.stats.reads["transaction"] += 1
        found = response.transaction
        if found.kind != TRANSACTION_KINDS[operation.kind] or minor_units(found.amount) != operation.amount:
            self.model.anomaly(f"{operation} reads back {when} as another transaction: {found}")

    async def _read(self, method: Any, request: Any, *, missing_is_anomaly: str = "") -> Any:
        """The response, or None when the read failed for a reason faults explain."""
        for attempt in range(1, READ_ATTEMPTS_MAX + 1):
            try:
                return await method(request, timeout=CALL_SECONDS_MAX)
            except aio.AioRpcError as error:
                code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                self.model.anomaly(f"{missing_is_anomaly or request}: NOT_FOUND")
                return None
            if code not in RETRY_CODES:
                self.model.anomaly(f"a read of {type(request).__name__} failed with {code}")
                return None
            await asyncio.sleep(_backoff_seconds(self.rng, attempt))
        self.stats.reads["failed"] += 1
        return None


def _balances_of(response: Any) -> dict[str, int]:
    balances = {REGULAR: 0, RESERVED: 0}
    for account in response.accounts:
        kind = REGULAR if account.kind == types_pb2.ACCOUNT_KIND_REGULAR else RESERVED
        balances[kind] = minor_units(account.balance)
    return balances


def _final_state(final: Operation) -> tuple[int, int]:
    if final.kind == RELEASE:
        return types_pb2.ORDER_STATUS_RELEASED, 0
    return types_pb2.ORDER_STATUS_CAPTURED, final.amount


# The processes and the faults.


@dataclass
class Environment:
    postgres: cluster.Postgres
    dsn: str
    server: cluster.ServerProcess
    channel: aio.Channel


def server_arguments(dsn: str, pool_max_size: int) -> list[str]:
    return [
        *("--dsn", dsn, "--log-level", "WARNING", "--shutdown-grace", "5"),
        *("--pool-min-size", str(min(2, pool_max_size)), "--pool-max-size", str(pool_max_size)),
        *("--read-pool-max-size", str(READ_POOL_MAX_SIZE), "--health-check-interval", "0.2"),
        *("--db-connect-attempts", "300", "--db-connect-interval", "0.2"),
    ]


@contextlib.asynccontextmanager
async def environment(scratch: Path, pool_max_size: int) -> AsyncIterator[Environment]:
    """An embedded PostgreSQL of its own in `scratch`, migrated, and a server (not started yet)."""
    postgres = cluster.Postgres(scratch / "pgdata")
    dsn = await asyncio.to_thread(postgres.start)
    try:
        async with server_environment(postgres, dsn, scratch, pool_max_size) as started:
            yield started
    finally:
        await asyncio.to_thread(postgres.stop)


@contextlib.asynccontextmanager
async def server_environment(
    postgres: cluster.Postgres, dsn: str, scratch: Path, pool_max_size: int
) -> AsyncIterator[Environment]:
    """The database of `dsn` on `postgres`, migrated, and a server for it (not started yet),
    stopped at the end."""
    await migrations.migrate(dsn)
    arguments = server_arguments(dsn, pool_max_size)
    server = cluster.ServerProcess(cluster.free_port(), scratch / "server.log", arguments)
    channel = cluster.open_channel(server.port)
    started = Environment(postgres, dsn, server, channel)
    try:
        yield started
    finally:
        await asyncio.to_thread(started.server.stop)
        await channel.close()


class Supervisor:
    """Keeps the environment's server running: starts it again after a kill or a failed start.
    An exit that nobody caused is an anomaly."""

    def __init__(self, environment: Environment, model: Model, stats: Stats) -> None:
        self.environment = environment
        self.model = model
        self.stats = stats
        self.lock = asyncio.Lock()

    async def ensure_serving(self) -> None:
        async with self.lock:
            await self._serve()

    async def kill_and_restart(self) -> None:
        async with self.lock:
            self.environment.server.kill()
            await self._serve()

    async def watch(self) -> None:
        server = self.environment.server
        while True:
            await asyncio.sleep(cluster.HEALTH_POLL_SECONDS * 4)
            code = server.exit_code()
            if code is not None and not self.lock.locked():
                self.model.anomaly(f"the server exited on its own with {code}:\n{server.log_tail()}")
                await self.ensure_serving()

    async def _serve(self) -> None:
        server = self.environment.server
        for _ in range(SERVER_STARTS_MAX):
            if server.process is None or server.exit_code() is not None:
                server.start()
            try:
                await server.wait_until_serving(self.environment.channel, RECOVERY_SECONDS_MAX)
                return
            except cluster.ServerExited:
                # It could not reach the database while starting (PostgreSQL was restarting).
                self.stats.failed_server_starts += 1
        raise RuntimeError(f"the server did not start in {SERVER_STARTS_MAX} tries:\n{server.log_tail()}")


@dataclass(frozen=True)
class Phase:
    name: str
    kinds: tuple[str, ...]
    operations: int
    faults: int
    mixed: bool


def plan_phases(operations: int, kinds: tuple[str, ...], faults_per_phase: int, mixed_faults: int) -> list[Phase]:
    """Each fault kind on its own, then all of them mixed (overlapping) for the rest."""
    if not kinds:
        return [Phase("no faults", (), operations, 0, mixed=False)]
    single = max(1, int(operations * SINGLE_PHASE_SHARE))
    phases = [Phase(kind, (kind,), single, faults_per_phase, mixed=False) for kind in kinds]
    rest = operations - single * len(kinds)
    if rest > 0:
        phases.append(Phase("mixed", kinds, rest, mixed_faults, mixed=True))
    return phases


class Faults:
    """Injects the faults of a phase at evenly spaced points of its operations."""

    def __init__(
        self, environment: Environment, supervisor: Supervisor, caller: Caller, reader: Reader, rng: random.Random
    ) -> None:
        self.environment = environment
        self.supervisor = supervisor
        self.caller = caller
        self.reader = reader
        self.model = caller.model
        self.stats = caller.stats
        self.rng = rng
        self.postgres_lock = asyncio.Lock()
        self.bursts = Counter[str]()
        self.background_share = 0.0

    async def run_phase(self, phase: Phase, first: int) -> None:
        self.background_share = BACKGROUND_CLIENT_FAULT_SHARE if phase.mixed else 0.0
        self._apply_client_shares()
        overlapping = []
        for index in range(phase.faults):
            threshold = first + (index + 0.5) * phase.operations / phase.faults
            await self.model.issued(math.ceil(threshold))
            kind = self.rng.choice(phase.kinds)
            if phase.mixed:
                overlapping.append(asyncio.create_task(self.inject(kind)))
            else:
                await self.inject(kind)
        await asyncio.gather(*overlapping)

    def stop(self) -> None:
        self.background_share = 0.0
        self._apply_client_shares()

    async def inject(self, kind: str) -> None:
        self.stats.faults[kind] += 1
        if kind in CLIENT_FAULTS:
            await self._burst(kind)
            return
        acknowledged_before = len(self.model.acknowledged_log)
        if kind == SERVER_KILL:
            await self.supervisor.kill_and_restart()
        else:
            interval = [time.monotonic(), math.inf]
            self.model.database_faults.append(interval)
            if kind == POSTGRES_RESTART:
                async with self.postgres_lock:
                    await asyncio.to_thread(self.environment.postgres.restart_immediately)
            else:
                await self._terminate_backends()
            interval[1] = time.monotonic()
        await self.supervisor.ensure_serving()
        await self.check_acknowledged(acknowledged_before, kind)

    async def check_acknowledged(self, count: int, after: str) -> None:
        """Operations acknowledged before a fault are still there after it (the most recent ones,
        which a lost commit would take first, and a random sample of the others)."""
        before = self.model.acknowledged_log[:count]
        older = before[:-POST_FAULT_SAMPLE_RECENT]
        sample = before[-POST_FAULT_SAMPLE_RECENT:] + self.rng.sample(older, min(POST_FAULT_SAMPLE_RANDOM, len(older)))
        await asyncio.gather(*(self.reader.expect_transaction(operation, f"after {after}") for operation in sample))
        self.stats.post_fault_checks += 1

    async def _terminate_backends(self) -> None:
        try:
            terminated = await cluster.terminate_backends(
                self.environment.dsn, self.rng.randint(1, BACKENDS_TERMINATED_MAX)
            )
        except psycopg.OperationalError:
            terminated = 0  # PostgreSQL itself was restarting (mixed faults)
        self.stats.backends_terminated += terminated

    async def _burst(self, kind: str) -> None:
        self.bursts[kind] += 1
        self._apply_client_shares()
        try:
            await asyncio.sleep(BURST_SECONDS)
        finally:
            self.bursts[kind] -= 1
            self._apply_client_shares()

    def _apply_client_shares(self) -> None:
        for kind in CLIENT_FAULTS:
            share = BURST_SHARE if self.bursts[kind] else self.background_share
            self.caller.client_fault_shares[kind] = share


# The end: settling lost answers, then the books from PostgreSQL and through the API.

ACTIVE_OPERATIONS: Final = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE %s
"""
KEY_OUTCOME: Final = "SELECT transaction_id, error_reason FROM idempotency_keys WHERE idempotency_key = %s"
ORDER_OUTCOME: Final = """
    SELECT status, captured_amount, reserve_transaction_id, final_transaction_id FROM orders WHERE order_id = %s
"""


async def quiesce(books: Books) -> None:
    """Waits until no money operation is still running in PostgreSQL (one whose caller gave up,
    or whose server was killed, may still be finishing)."""
    started = time.monotonic()
    while time.monotonic() - started < QUIESCE_SECONDS_MAX:
        if await books.value(ACTIVE_OPERATIONS, "SELECT * FROM balance%") == 0:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"money operations still running after {QUIESCE_SECONDS_MAX} s")


async def database_outcome(books: Books, operation: Operation) -> tuple[str, str]:
    """Whether the books hold the operation: ('applied', transaction id), ('refused', reason) or
    ('absent', '')."""
    if operation.kind in KEYED_KINDS:
        rows = await books.rows(KEY_OUTCOME, operation.key)
        if rows and rows[0][0] is not None:
            return "applied", str(rows[0][0])
        return ("refused", str(rows[0][1])) if rows else ("absent", "")
    rows = await books.rows(ORDER_OUTCOME, operation.order_id)
    if not rows:
        return "absent", ""
    status, captured, reserve_transaction, final_transaction = rows[0]
    if operation.kind == RESERVE:
        return "applied", str(reserve_transaction)
    if (operation.kind == RELEASE and status == "released") or (
        operation.kind == REVENUE and status == "captured" and captured == operation.amount
    ):
        return "applied", str(final_transaction)
    return "absent", ""


async def settle_lost(caller: Caller, books: Books) -> None:
    """Every operation whose answer was lost is sent again with its key: the answer must agree
    with the books on whether it had been applied (a replay of exactly that transaction)."""
    await quiesce(books)
    lost = sorted(caller.model.lost(), key=lambda operation: (operation.kind in FINAL_KINDS, operation.number))
    for operation in lost:
        before, detail = await database_outcome(books, operation)
        answer = await caller.settle(operation, attempts_max=RESOLVE_ATTEMPTS_MAX, faults=False)
        if answer is None:
            caller.model.anomaly(f"{operation}: no definite answer even at the end")
            continue
        replayed = answer.code is None and answer.replayed
        told = answer.transaction.transaction_id if answer.code is None else answer.reason
        if (
            (before == "applied" and (not replayed or told != detail))
            or (before == "refused" and told != detail)
            or (before == "absent" and replayed)
        ):
            caller.model.anomaly(f"{operation}: the books say {before} {detail!r}, a retry says {told!r}")
        operation.resolved = "applied" if before == "applied" else "not applied"
        conclude(caller.model, operation, [answer])


@dataclass
class Snapshot:
    """The books as PostgreSQL holds them at the end."""

    transactions: dict[str, tuple[Any, ...]]
    """id -> (kind, amount, from user, to user, order id, idempotency key)"""
    keys: dict[str, tuple[str | None, str | None]]
    orders: dict[int, tuple[Any, ...]]
    """id -> (user, status, reserved, captured, released, reserve transaction, final transaction)"""
    balances: dict[Account, int]

    @classmethod
    async def read(cls, books: Books) -> Snapshot:
        transactions = await books.rows(
            "SELECT transaction_id, kind, amount, from_user_id, to_user_id, order_id, idempotency_key FROM transactions"
        )
        keys = await books.rows("SELECT idempotency_key, transaction_id, error_reason FROM idempotency_keys")
        orders = await books.rows(
            "SELECT order_id, user_id, status, reserved_amount, captured_amount, released_amount,"
            " reserve_transaction_id, final_transaction_id FROM orders"
        )
        balances = await books.rows("SELECT user_id, kind, balance FROM accounts WHERE user_id IS NOT NULL")
        return cls(
            {str(row[0]): tuple(row[1:]) for row in transactions},
            {str(row[0]): (None if row[1] is None else str(row[1]), row[2]) for row in keys},  # type: ignore[misc]
            {int(row[0]): (*row[1:6], *(None if value is None else str(value) for value in row[6:])) for row in orders},  # type: ignore[call-overload]
            {(int(row[0]), str(row[1])): int(row[2]) for row in balances},  # type: ignore[call-overload]
        )


async def verify(model: Model, books: Books, channel: aio.Channel, users: list[int]) -> None:
    audit = await books.audit()
    for name, problems in asdict(audit).items():
        if problems:
            model.anomaly(f"books audit: {name}: {problems[:10]}")
    snapshot = await Snapshot.read(books)
    _verify_keys(model, snapshot)
    _verify_transactions(model, snapshot)
    _verify_orders(model, snapshot)
    _verify_balances(model, snapshot, users)
    await _verify_through_api(model, snapshot, channel, users)


def _verify_keys(model: Model, snapshot: Snapshot) -> None:
    """One transaction per key at most; no key the checker did not send; each keyed operation's
    key maps to the transaction it was acknowledged with, or to the refusal it got."""
    per_key = Counter(row[5] for row in snapshot.transactions.values() if row[5] is not None)
    issued = {operation.key for operation in model.operations if operation.key}
    for key, count in per_key.items():
        if count > 1 or key not in issued:
            model.anomaly(f"key {key!r} has {count} transactions and {'was' if key in issued else 'was not'} sent")
    for key in set(snapshot.keys) - issued:
        model.anomaly(f"the books hold key {key!r}, which the checker never sent")
    for operation in model.operations:
        if not operation.key:
            continue
        recorded = snapshot.keys.get(operation.key)
        expected = (operation.transaction_id or None, operation.refusal or None)
        if recorded != expected:
            model.anomaly(f"{operation} ({operation.state}): its key records {recorded}, expected {expected}")


def _verify_transactions(model: Model, snapshot: Snapshot) -> None:
    """Every acknowledged operation is in the books once, as acknowledged; nothing else is, but the
    release of the rest of each partially captured order."""
    acknowledged: dict[str, Operation] = {}
    for operation in model.operations:
        if operation.state == ACKNOWLEDGED:
            if operation.transaction_id in acknowledged:
                model.anomaly(f"{operation} and {acknowledged[operation.transaction_id]} share a transaction")
            acknowledged[operation.transaction_id] = operation
    for transaction_id, operation in acknowledged.items():
        row = snapshot.transactions.get(transaction_id)
        if row is None or row[0] != DATABASE_KINDS[operation.kind] or row[1] != operation.amount:
            model.anomaly(f"{operation} was acknowledged as {transaction_id}, which the books hold as {row}")
    partial = {
        operation.order_id
        for operation in acknowledged.values()
        if operation.kind == REVENUE and operation.amount < model.orders[operation.order_id].amount
    }
    rests = Counter[int]()
    for transaction_id, row in snapshot.transactions.items():
        if transaction_id in acknowledged:
            continue
        if row[0] == "release" and row[4] in partial:
            rests[row[4]] += 1
        else:
            model.anomaly(f"transaction {transaction_id} {row} was never acknowledged")
    for order_id in partial:
        if rests[order_id] != 1:
            model.anomaly(f"order {order_id} was captured in part and has {rests[order_id]} releases of the rest")


def _verify_orders(model: Model, snapshot: Snapshot) -> None:
    """Each order is in the one state its acknowledged operations put it in, its money accounted for."""
    expected = {order_id: order for order_id, order in model.orders.items() if order.reserve.state == ACKNOWLEDGED}
    for order_id in set(snapshot.orders) - set(expected):
        model.anomaly(f"order {order_id} is in the books but its reserve was not acknowledged")
    for order_id, order in expected.items():
        finals = [final for final in order.finals if final.state == ACKNOWLEDGED]
        if len(finals) > 1:
            model.anomaly(f"order {order_id}: {len(finals)} final operations acknowledged: {finals}")
        state: tuple[Any, ...] = ("reserved", order.amount, 0, 0, order.reserve.transaction_id, None)
        if finals and finals[0].kind == RELEASE:
            state = ("released", order.amount, 0, order.amount, order.reserve.transaction_id, finals[0].transaction_id)
        elif finals:
            captured = finals[0].amount
            state = ("captured", order.amount, captured, order.amount - captured)
            state += (order.reserve.transaction_id, finals[0].transaction_id)
        row = snapshot.orders.get(order_id)
        if row is None or row[0] != order.user_id or row[1:] != state:
            model.anomaly(f"order {order_id} is {row} in the books, expected user {order.user_id} and {state}")


def _verify_balances(model: Model, snapshot: Snapshot, users: list[int]) -> None:
    for account, operations in model.unsettled.items():
        if operations:
            model.anomaly(f"account {account} has {len(operations)} operations that never settled")
    for user_id in users:
        for kind in (REGULAR, RESERVED):
            expected, actual = model.acknowledged[(user_id, kind)], snapshot.balances.get((user_id, kind))
            if actual != expected:
                model.anomaly(f"user {user_id} {kind}: the books hold {actual}, the acknowledged make {expected}")


async def _verify_through_api(model: Model, snapshot: Snapshot, channel: aio.Channel, users: list[int]) -> None:
    """Each user's history, replayed from ListTransactions, gives their balances from GetBalance,
    which are what the acknowledged operations make; every transaction is in someone's history."""
    info = info_service_pb2_grpc.InfoServiceStub(channel)
    seen: set[str] = set()
    for user_id in users:
        request = info_service_pb2.GetBalanceRequest(user_id=user_id)
        response = await _ask(
            model, f"GetBalance of user {user_id}", info.GetBalance(request, timeout=CALL_SECONDS_MAX)
        )
        balances = _balances_of(response) if response is not None else None
        replayed = await _replay_history(model, info, user_id, seen)
        expected = {kind: model.acknowledged[(user_id, kind)] for kind in (REGULAR, RESERVED)}
        if not balances == replayed == expected:
            model.anomaly(f"user {user_id}: GetBalance {balances}, history {replayed}, acknowledged {expected}")
    if seen != set(snapshot.transactions):
        model.anomaly(f"histories hold {len(seen)} transactions, the books {len(snapshot.transactions)}")
    acknowledged = [order for order in model.orders.values() if order.reserve.state == ACKNOWLEDGED]
    for order in acknowledged[:: max(1, len(acknowledged) // API_ORDERS_SAMPLE)]:
        request_order = info_service_pb2.GetOrderRequest(order_id=order.order_id)
        found = await _ask(model, f"order {order.order_id}", info.GetOrder(request_order, timeout=CALL_SECONDS_MAX))
        row = snapshot.orders.get(order.order_id)
        if found is None or row is None:
            continue
        if (found.order.status, minor_units(found.order.captured_amount)) != (ORDER_STATUSES[row[1]], row[3]):
            model.anomaly(f"order {order.order_id} reads as {found.order}, the books hold {row}")


async def _ask(model: Model, what: str, call: Any) -> Any:
    """The response of a call at the end, when nothing is broken; a failure is an anomaly."""
    try:
        return await call
    except aio.AioRpcError as error:
        model.anomaly(f"{what}: {error.code()} {error.details()}")
        return None


async def _replay_history(model: Model, info: Any, user_id: int, seen: set[str]) -> dict[str, int] | None:
    balances = {REGULAR: 0, RESERVED: 0}
    own: set[str] = set()
    token = ""
    while True:
        request = info_service_pb2.ListTransactionsRequest(
            user_id=user_id, page_size=HISTORY_PAGE_SIZE, order=info_service_pb2.SORT_ORDER_ASC, page_token=token
        )
        page = await _ask(model, f"history of user {user_id}", info.ListTransactions(request, timeout=CALL_SECONDS_MAX))
        if page is None:
            return None
        for transaction in page.transactions:
            if transaction.transaction_id in own:
                model.anomaly(f"user {user_id}'s history lists {transaction.transaction_id} twice")
            own.add(transaction.transaction_id)
            for kind, change in _effects_on(user_id, transaction).items():
                balances[kind] += change
        token = page.next_page_token
        if not token:
            seen |= own
            return balances


def _effects_on(user_id: int, transaction: Any) -> dict[str, int]:
    """What one transaction of a user's history did to that user's two accounts."""
    amount = minor_units(transaction.amount)
    kind = transaction.kind
    if kind == types_pb2.TRANSACTION_KIND_RESERVE:
        return {REGULAR: -amount, RESERVED: amount}
    if kind == types_pb2.TRANSACTION_KIND_RELEASE:
        return {REGULAR: amount, RESERVED: -amount}
    if kind == types_pb2.TRANSACTION_KIND_REVENUE:
        return {RESERVED: -amount}
    change = 0
    if transaction.to_user_id == user_id:
        change += amount
    if transaction.from_user_id == user_id:
        change -= amount
    return {REGULAR: change}


# The run.


@dataclass(frozen=True, kw_only=True)
class Options:
    operations: int = 100_000
    concurrency: int = CONCURRENCY_DEFAULT
    users: int = USERS_DEFAULT
    hot_users: int = HOT_USERS_DEFAULT
    seed: int = 1
    faults: tuple[str, ...] = FAULT_KINDS
    faults_per_phase: int = 0
    """Faults of each kind on its own; 0: one per OPERATIONS_PER_FAULT operations of its phase."""
    mixed_faults: int = 0
    """Faults in the mixed phase; 0: one per OPERATIONS_PER_FAULT operations of the phase."""
    pool_max_size: int = POOL_MAX_SIZE_DEFAULT

    def phases(self) -> list[Phase]:
        single = max(1, int(self.operations * SINGLE_PHASE_SHARE))
        rest = self.operations - single * len(self.faults)
        return plan_phases(
            self.operations,
            self.faults,
            self.faults_per_phase or max(1, single // OPERATIONS_PER_FAULT),
            self.mixed_faults or max(len(self.faults), rest // OPERATIONS_PER_FAULT),
        )


@dataclass
class Report:
    options: Options
    operations: int = 0
    opening_deposits: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    lost_then_settled: Counter[str] = field(default_factory=Counter)
    replays_inside_server: int = 0
    duplicates: int = 0
    competing_finals: int = 0
    stats: Stats = field(default_factory=Stats)
    anomalies: list[str] = field(default_factory=list)
    workload_seconds: float = 0.0
    total_seconds: float = 0.0
    server_exit_code: int | None = None

    @property
    def throughput(self) -> float:
        return self.operations / self.workload_seconds if self.workload_seconds else 0.0


class Chaos:
    def __init__(self, options: Options, environment: Environment) -> None:
        self.options = options
        self.environment = environment
        self.rng = random.Random(options.seed)
        self.model = Model()
        self.stats = Stats()
        self.plan = Plan(self.rng, self.model, options.users, options.hot_users, options.seed)
        self.caller = Caller(environment.channel, self.rng, self.stats, self.model)
        self.reader = Reader(environment.channel, self.model, self.plan, self.stats, self.rng)
        self.supervisor = Supervisor(environment, self.model, self.stats)
        self.faults = Faults(environment, self.supervisor, self.caller, self.reader, self.rng)

    async def run(self) -> Report:
        started = time.monotonic()
        opening = await self.open()
        watcher = asyncio.create_task(self.supervisor.watch())
        stopping = asyncio.Event()
        reading = asyncio.create_task(self.reader.run(stopping))
        workload_started = time.monotonic()
        for phase in self.options.phases():
            await self.run_phase(phase)
        workload_seconds = time.monotonic() - workload_started
        self.faults.stop()
        stopping.set()
        await reading
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await self.finish()
        report = self.report(opening, workload_seconds)
        report.server_exit_code = await self.stop_server()
        report.total_seconds = time.monotonic() - started
        return report

    async def open(self) -> int:
        """Starts the server and gives every user an opening deposit; returns how many."""
        await self.supervisor.ensure_serving()
        opening = self.plan.opening_deposits()
        await asyncio.gather(*(self.caller.execute(operation) for operation in opening))
        return len(opening)

    async def finish(self) -> None:
        """Settles every lost answer, then checks the books; anomalies go to the model."""
        await self.supervisor.ensure_serving()
        async with Books(self.environment.dsn) as books:
            await settle_lost(self.caller, books)
            await verify(self.model, books, self.environment.channel, self.plan.users)

    async def run_phase(self, phase: Phase) -> None:
        started, first, budget = time.monotonic(), len(self.model.operations), phase.operations

        async def client() -> None:
            nonlocal budget
            while budget > 0:
                step = self.plan.next_step()
                budget -= len(step)
                await asyncio.gather(*(self.caller.execute(operation) for operation in step))

        injecting = asyncio.create_task(self.faults.run_phase(phase, first))
        await asyncio.gather(*(client() for _ in range(self.options.concurrency)))
        await injecting
        _progress(
            f"phase {phase.name}: {len(self.model.operations) - first} operations, {phase.faults} faults,"
            f" {time.monotonic() - started:.1f} s, anomalies so far {len(self.model.anomalies)}"
        )

    async def stop_server(self) -> int:
        """SIGTERM: the server must stop on its own, with exit code 0."""
        server = self.environment.server
        server.terminate()
        code = await server.wait_exit(STOP_SECONDS_MAX)
        if code != 0:
            self.model.anomaly(f"the server exited with {code} on SIGTERM:\n{server.log_tail()}")
        return code

    def report(self, opening_deposits: int, workload_seconds: float) -> Report:
        operations = self.model.operations[opening_deposits:]
        report = Report(self.options, len(operations), opening_deposits, stats=self.stats)
        report.outcomes = Counter(operation.state for operation in operations)
        report.refusals = Counter(operation.refusal for operation in operations if operation.refusal)
        report.lost_then_settled = Counter(operation.resolved for operation in operations if operation.resolved)
        report.replays_inside_server = self.model.replays_inside_server
        report.duplicates = sum(operation.duplicate for operation in operations)
        report.competing_finals = sum(operation.conflicting for operation in operations)
        report.anomalies = self.model.anomalies
        report.workload_seconds = workload_seconds
        return report


async def run(options: Options, scratch: Path) -> Report:
    """One checker run on an embedded PostgreSQL and a server of its own, in `scratch`."""
    async with environment(scratch, options.pool_max_size) as started:
        return await Chaos(options, started).run()


# Output.


def print_report(report: Report) -> None:
    options, stats = report.options, report.stats
    faults = ", ".join(f"{kind} {stats.faults[kind]}" for kind in FAULT_KINDS if kind in options.faults) or "none"
    lines = [
        f"seed {options.seed}; {options.concurrency} clients in flight; {options.users} users, {options.hot_users}"
        f" hot ({HOT_SHARE:.0%} of picks); money pool of {options.pool_max_size} connections",
        f"operations attempted:  {report.operations:,} (+{report.opening_deposits} opening deposits;"
        f" {report.duplicates:,} sent twice at once, {report.competing_finals:,} competing final operations)",
        f"acknowledged:          {report.outcomes[ACKNOWLEDGED]:,}",
        f"refused:               {report.outcomes[REFUSED]:,} ({_counts(report.refusals)})",
        f"answers lost, settled at the end by a retry with the same key: {sum(report.lost_then_settled.values()):,}"
        f" ({_counts(report.lost_then_settled)})",
        f"answers lost inside the server (database connection lost after the commit), replayed by its own"
        f" re-run with the key: {report.replays_inside_server:,}",
        f"calls:                 {stats.calls:,}; retries {stats.retries:,} ({_counts(stats.codes)})",
        f"faults injected:       {faults}",
        f"  backends terminated {stats.backends_terminated}; calls cancelled {stats.client_faults[CLIENT_CANCEL]:,};"
        f" calls with tiny deadlines {stats.client_faults[TINY_DEADLINE]:,};"
        f" server starts that failed while PostgreSQL was down {stats.failed_server_starts}",
        f"reads during the run:  {_counts(stats.reads)}; checks after faults {stats.post_fault_checks}",
        f"server exit code on SIGTERM at the end: {report.server_exit_code}",
        f"anomalies:             {len(report.anomalies)}",
        f"throughput:            {report.throughput:,.0f} operations/s ({report.operations:,} in"
        f" {report.workload_seconds:.1f} s with faults; {report.total_seconds:.1f} s in all)",
    ]
    print("\n".join(lines))
    for anomaly in report.anomalies[:ANOMALIES_PRINTED_MAX]:
        print(f"  ANOMALY: {anomaly}")


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in counter.most_common()) or "none"


def write_results(report: Report) -> None:
    results = {
        "recorded_at": datetime.now(UTC).isoformat(),
        "options": asdict(report.options),
        "operations": report.operations,
        "outcomes": dict(report.outcomes),
        "refusals": dict(report.refusals),
        "lost_then_settled": dict(report.lost_then_settled),
        "replays_inside_server": report.replays_inside_server,
        # vars(), not asdict(): asdict rebuilds each Counter from its items, counting them as keys.
        "stats": {
            name: dict(value) if isinstance(value, dict) else value for name, value in vars(report.stats).items()
        },
        "anomalies": report.anomalies,
        "workload_seconds": round(report.workload_seconds, 1),
        "throughput": round(report.throughput, 1),
        "server_exit_code": report.server_exit_code,
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"figures written to {RESULTS_PATH.relative_to(REPOSITORY)}")


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def parse_faults(text: str) -> tuple[str, ...]:
    if text == "all":
        return FAULT_KINDS
    if text == "none":
        return ()
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    return kinds


def parse_arguments(arguments: Iterable[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=100_000, help="operations after the opening deposits")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY_DEFAULT, help="clients in flight")
    parser.add_argument("--users", type=int, default=USERS_DEFAULT)
    parser.add_argument("--hot-users", type=int, default=HOT_USERS_DEFAULT)
    parser.add_argument("--seed", type=int, default=1)
    kinds = ", ".join(FAULT_KINDS)
    parser.add_argument("--faults", type=parse_faults, default=FAULT_KINDS, help=f"all, none, or some of {kinds}")
    parser.add_argument("--faults-per-phase", type=int, default=0, help="faults of each kind on its own (0: by size)")
    parser.add_argument("--mixed-faults", type=int, default=0, help="faults in the mixed phase (0: by size)")
    parser.add_argument("--pool-max-size", type=int, default=POOL_MAX_SIZE_DEFAULT, help="the server's money pool")
    parsed = parser.parse_args(None if arguments is None else list(arguments))
    if min(parsed.operations, parsed.concurrency) < 1 or parsed.users < 2 or not 1 <= parsed.hot_users <= parsed.users:
        parser.error("--operations and --concurrency must be positive, --users at least 2, --hot-users 1 to --users")
    return Options(**{name.replace("-", "_"): value for name, value in vars(parsed).items()})


def main() -> int:
    options = parse_arguments()
    with tempfile.TemporaryDirectory(prefix="balance-chaos-") as scratch:
        report = asyncio.run(run(options, Path(scratch)))
        if report.anomalies:
            log = RESULTS_PATH.with_name("chaos-server.log")
            log.write_bytes((Path(scratch) / "server.log").read_bytes())
            print(f"the server's log is kept in {log.relative_to(REPOSITORY)}")
    print_report(report)
    write_results(report)
    return 1 if report.anomalies else 0


if __name__ == "__main__":
    raise SystemExit(main())
