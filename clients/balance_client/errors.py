"""One exception class per error reason of the balance API, all under `BalanceError`.

The server sends every error as a google.rpc status: an `ErrorInfo` detail with a stable `reason`
and `metadata` naming what the error concerns, and for INVALID_ARGUMENT a `BadRequest` detail with
every field at fault. `from_rpc_error` decodes that status into the class of its reason; a reason
this client does not know becomes the class of its gRPC code (so `except NotFound` still works),
and a code without a class becomes `UnexpectedError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "balance.v1"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One request field at fault and why (from the status's `google.rpc.BadRequest`)."""

    field: str
    description: str


class BalanceError(Exception):
    """Any error of a balance call: its gRPC code, stable reason, message and details.

    Example::

        try: client.withdraw(2, Decimal("1000000"))
        except BalanceError as error: print(error.code.name, error.reason, error.metadata)
    """

    CODE: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    REASON: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        domain: str = ERROR_DOMAIN,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code or self.CODE
        self.reason: str = reason or self.REASON or self.code.name
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.domain = domain
        # How many calls the client made before giving up (more than one after retries).
        self.attempts = attempts

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the request fields at fault (INVALID_ARGUMENT only)."""
        return tuple(violation.field for violation in self.field_violations)

    def __str__(self) -> str:
        named = f" ({', '.join(dict.fromkeys(self.fields))})" if self.field_violations else ""
        return f"{self.reason}{named}: {self.message}"


class InvalidArgument(BalanceError):
    """A request field is wrong; `field_violations` lists every field at fault."""

    CODE = grpc.StatusCode.INVALID_ARGUMENT
    REASON = "INVALID_ARGUMENT"


class InvalidAmount(InvalidArgument):
    """An amount is zero, negative, not a plain decimal, too precise for its currency, or too large."""

    REASON = "INVALID_AMOUNT"


class UnknownCurrency(InvalidArgument):
    """The currency is not an ISO 4217 code the ledger knows."""

    REASON = "UNKNOWN_CURRENCY"


class InvalidPageToken(InvalidArgument):
    """The page token is malformed, altered, or from a query with other filters or sort."""

    REASON = "INVALID_PAGE_TOKEN"


class MalformedRequest(InvalidArgument):
    """The request's bytes are not a message of the method called (a client built from other protos)."""

    REASON = "MALFORMED_REQUEST"


class NotFound(BalanceError):
    CODE = grpc.StatusCode.NOT_FOUND


class AccountNotFound(NotFound):
    """The user has no account (in that currency): accounts are created by the first deposit."""

    REASON = "ACCOUNT_NOT_FOUND"


class OrderNotFound(NotFound):
    REASON = "ORDER_NOT_FOUND"


class TransactionNotFound(NotFound):
    REASON = "TRANSACTION_NOT_FOUND"


class FailedPrecondition(BalanceError):
    CODE = grpc.StatusCode.FAILED_PRECONDITION


class InsufficientFunds(FailedPrecondition):
    """The regular account holds less than the amount (metadata `available`, `requested`)."""

    REASON = "INSUFFICIENT_FUNDS"


class OrderStateConflict(FailedPrecondition):
    """Revenue after release, release after revenue, or revenue again with another amount."""

    REASON = "ORDER_STATE_CONFLICT"


class OrderMismatch(FailedPrecondition):
    """RecognizeRevenue named another user or service than the order's."""

    REASON = "ORDER_MISMATCH"


class AmountExceedsReserve(FailedPrecondition):
    REASON = "AMOUNT_EXCEEDS_RESERVE"


class BalanceLimitExceeded(FailedPrecondition):
    """A balance would leave the range the ledger can hold."""

    REASON = "BALANCE_LIMIT_EXCEEDED"


class AlreadyExists(BalanceError):
    CODE = grpc.StatusCode.ALREADY_EXISTS


class IdempotencyKeyReused(AlreadyExists):
    """The idempotency key was used before for a different request."""

    REASON = "IDEMPOTENCY_KEY_REUSED"


class OrderAlreadyExists(AlreadyExists):
    """The order id was reserved before with other fields."""

    REASON = "ORDER_ALREADY_EXISTS"


class Aborted(BalanceError):
    """The call was aborted and nothing was applied: the same call (with the same key) may succeed."""

    CODE = grpc.StatusCode.ABORTED


class RetriesExhausted(Aborted):
    """Conflicts with concurrent operations outlasted the server's retries; nothing was applied."""

    REASON = "SERIALIZATION_RETRIES_EXHAUSTED"


class Unavailable(BalanceError):
    """The server (or its database) cannot be reached; retry with the same key."""

    CODE = grpc.StatusCode.UNAVAILABLE


class DatabaseUnavailable(Unavailable):
    REASON = "DATABASE_UNAVAILABLE"


class ResourceExhausted(BalanceError):
    CODE = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyCalls(ResourceExhausted):
    """The server is at its limit of calls in flight: retry shortly."""

    REASON = "TOO_MANY_CALLS"


class ReportsBusy(ResourceExhausted):
    """Every report connection of the server is downloading: retry when a download ends."""

    REASON = "REPORTS_BUSY"


class DeadlineExceeded(BalanceError):
    """The call's deadline passed before an answer came (a money operation may have been applied:
    repeat it with the same idempotency key to learn its outcome)."""

    CODE = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(BalanceError):
    CODE = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BalanceError):
    CODE = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(BalanceError):
    CODE = grpc.StatusCode.CANCELLED


class UnexpectedError(BalanceError):
    """A status this client has no class for (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)."""


class ChecksumMismatch(BalanceError):
    """A downloaded file does not match the server's trailing `x-sha256` (or it sent none)."""

    CODE = grpc.StatusCode.DATA_LOSS
    REASON = "CHECKSUM_MISMATCH"


REASON_CLASSES: Mapping[str, type[BalanceError]] = {
    error.REASON: error
    for error in (
        InvalidArgument,
        InvalidAmount,
        UnknownCurrency,
        InvalidPageToken,
        MalformedRequest,
        AccountNotFound,
        OrderNotFound,
        TransactionNotFound,
        InsufficientFunds,
        OrderStateConflict,
        OrderMismatch,
        AmountExceedsReserve,
        BalanceLimitExceeded,
        IdempotencyKeyReused,
        OrderAlreadyExists,
        RetriesExhausted,
        DatabaseUnavailable,
        TooManyCalls,
        ReportsBusy,
    )
}
"""The class of each reason the server sends (the README's error table)."""

CODE_CLASSES: Mapping[grpc.StatusCode, type[BalanceError]] = {
    error.CODE: error
    for error in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        AlreadyExists,
        Aborted,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
    )
}
"""The class of a status whose reason is missing or unknown to this client."""


def from_rpc_error(error: grpc.RpcError, *, attempts: int = 1) -> BalanceError:
    """The `BalanceError` for a failed call (blocking or asyncio), decoded from its google.rpc status.

    Example::

        try: stub.Deposit(request)
        except grpc.RpcError as error: raise from_rpc_error(error) from error
    """
    code = error.code()
    message = error.details() or ""
    try:
        # Both grpc.Call errors and grpc.aio.AioRpcError have what from_call reads: code(),
        # details() and trailing_metadata().
        status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        # The status details disagree with the call's code or message: trust the call.
        status = None
    return from_status(code, message, status, attempts=attempts)


def from_status(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | None, *, attempts: int = 1
) -> BalanceError:
    """The `BalanceError` for a gRPC code, message and google.rpc status (None when it had none).

    Example::

        error = from_status(grpc.StatusCode.NOT_FOUND, "order 2 does not exist", None)
        assert type(error) is NotFound and error.reason == "NOT_FOUND"
    """
    reason, domain, metadata, violations = "", ERROR_DOMAIN, {}, []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations = [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    error_class = REASON_CLASSES.get(reason)
    if error_class is None or code != error_class.CODE:
        error_class = CODE_CLASSES.get(code, UnexpectedError)
    return error_class(
        message,
        code=code,
        reason=reason or None,
        metadata=metadata,
        field_violations=violations,
        domain=domain,
        attempts=attempts,
    )
