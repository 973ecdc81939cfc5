"""What every RPC shares at the edge: the in-flight gate, call logging, errors to statuses, and
request field checks that collect every violation into one INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from grpc import aio

from balance_server import limits, money, status
from balance_server.errors import DomainError, FieldViolation, InvalidArgument, Overloaded
from balance_server.models import TransactionKind
from balance_server.servicers.registry import MalformedRequest

_log = logging.getLogger("balance_server.calls")

Request = TypeVar("Request")
Response = TypeVar("Response")


class CallGate:
    """Counts calls in flight and refuses the ones past the limit at once (RESOURCE_EXHAUSTED),
    so overload gives fast answers instead of a queue that grows without bound."""

    def __init__(self, limit: int = limits.CALLS_IN_FLIGHT_MAX) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> None:
        if self.in_flight >= self.limit:
            raise Overloaded(f"the server is serving its limit of {self.limit} calls; retry shortly")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


class HasGate(Protocol):
    gate: CallGate


GatedServicer = TypeVar("GatedServicer", bound=HasGate)


def unary_call(
    method: Callable[[GatedServicer, Request, aio.ServicerContext[Request, Response]], Awaitable[Response]],
) -> Callable[[GatedServicer, Request, aio.ServicerContext[Request, Response]], Awaitable[Response]]:
    """Wraps a unary RPC in `_serving`."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: GatedServicer, request: Request, context: aio.ServicerContext[Request, Response]) -> Response:
        async with _serving(name, self.gate, context):
            _check_parsed(request)
            return await method(self, request, context)
        raise AssertionError("unreachable: _serving re-raises or aborts")

    return call


def stream_call(
    method: Callable[[GatedServicer, Request, aio.ServicerContext[Request, Response]], AsyncIterator[Response]],
) -> Callable[[GatedServicer, Request, aio.ServicerContext[Request, Response]], AsyncIterator[Response]]:
    """Wraps a server-streaming RPC in `_serving`."""
    name = method.__name__

    @functools.wraps(method)
    async def call(
        self: GatedServicer, request: Request, context: aio.ServicerContext[Request, Response]
    ) -> AsyncIterator[Response]:
        async with _serving(name, self.gate, context):
            _check_parsed(request)
            async for response in method(self, request, context):
                yield response

    return call


@contextlib.asynccontextmanager
async def _serving(name: str, gate: CallGate, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """What every call gets: the in-flight gate, domain errors turned into statuses (anything else
    into INTERNAL, logged with its traceback), and one log line with method, status and duration."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        gate.enter()
        try:
            yield
        finally:
            gate.leave()
    except DomainError as error:
        code = status.code_of(error)
        await context.abort_with_status(status.to_status(error))
    except (asyncio.CancelledError, GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        raise
    except Exception as unexpected:
        if _is_abort(unexpected):
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        code = grpc.StatusCode.INTERNAL
        _log.exception("%s failed unexpectedly", name)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server's log")
    finally:
        _log_call(name, code, started)


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        violation = FieldViolation("request", f"the request is not a valid message of this method: {request.problem}")
        raise InvalidArgument([violation], reason="MALFORMED_REQUEST")


def _is_abort(error: BaseException) -> bool:
    # grpc.aio raises its own AbortError out of context.abort(); it must pass through untouched.
    return type(error).__name__ == "AbortError"


def _log_call(name: str, code: grpc.StatusCode, started: float) -> None:
    _log.info("%s %s %.1fms", name, code.name, (time.perf_counter() - started) * 1000)


def deadline_of(context: aio.ServicerContext[Any, Any]) -> float | None:
    """The call's deadline as a time.monotonic() value, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Fields:
    """Checks a request's fields, collecting every violation; `done()` raises them together."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []
        self.reason: str | None = None

    def positive_id(self, value: int, field: str) -> int:
        if value <= 0:
            self._add(FieldViolation(field, f"{field} must be a positive integer"))
        return value

    def text(self, value: str, field: str, length_max: int) -> str:
        if len(value) > length_max:
            self._add(FieldViolation(field, f"{field} is longer than {length_max} characters"))
        elif "\x00" in value:
            self._add(FieldViolation(field, f"{field} must not contain NUL characters"))
        return value

    def idempotency_key(self, value: str) -> str | None:
        """The key, or None when the caller sent none."""
        if value == "":
            return None
        if value.strip() != value or not value.isprintable():
            self._add(
                FieldViolation("idempotency_key", "idempotency_key must be printable, without surrounding spaces")
            )
        return self.text(value, "idempotency_key", limits.IDEMPOTENCY_KEY_LENGTH_MAX) or None

    def currency(self, value: str, currencies: money.Currencies, field: str = "currency") -> str | None:
        try:
            return currencies.parse(value, field=field)
        except InvalidArgument as error:
            self._adopt(error)
            return None

    def amount(self, value: str, currency: str | None, currencies: money.Currencies, field: str = "amount") -> int:
        """Minor units of `currency`; with an unknown currency only the amount's form is checked."""
        try:
            if currency is None:
                money.parse_decimal(value, field=field)
                return 0
            return money.to_minor_units(value, currency, currencies, field=field)
        except InvalidArgument as error:
            self._adopt(error)
            return 0

    def decimal(self, value: str, field: str = "amount") -> Decimal:
        try:
            return money.parse_decimal(value, field=field)
        except InvalidArgument as error:
            self._adopt(error)
            return Decimal(0)

    def timestamp(self, value: timestamp_pb2.Timestamp, field: str) -> datetime | None:
        """An aware datetime in UTC, rounded up to the microsecond the ledger records: a bound of
        T + 1 ns holds exactly the transactions a bound of T + 1 us holds. None (with a violation)
        when out of range."""
        try:
            moment = value.ToDatetime(tzinfo=UTC)
            if value.nanos % 1000:
                moment += timedelta(microseconds=1)
            return moment
        except (ValueError, OverflowError):
            self._add(FieldViolation(field, f"{field} is not a valid timestamp"))
            return None

    def transaction_kinds(
        self, numbers: Sequence[int], known: Mapping[int, TransactionKind]
    ) -> frozenset[TransactionKind]:
        """The kinds a filter names (empty: every kind)."""
        if len(numbers) > limits.TRANSACTION_KINDS_FILTER_MAX:
            self.add("kinds", f"kinds lists more than {limits.TRANSACTION_KINDS_FILTER_MAX} values")
        kinds = set()
        for number in numbers[: limits.TRANSACTION_KINDS_FILTER_MAX]:
            kind = known.get(number)
            if kind is None:
                self.add("kinds", f"{number} is not a TransactionKind")
            else:
                kinds.add(kind)
        return frozenset(kinds)

    def add(self, field: str, description: str) -> None:
        self._add(FieldViolation(field, description))

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations, reason=self.reason or "INVALID_ARGUMENT")

    def _add(self, violation: FieldViolation) -> None:
        self.violations.append(violation)
        self.reason = self.reason or "INVALID_ARGUMENT"

    def _adopt(self, error: InvalidArgument) -> None:
        if self.reason is None:
            self.reason = error.reason
        self.violations.extend(error.violations)
