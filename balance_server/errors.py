"""The closed set of errors the service reports. Each has a stable UPPER_SNAKE reason; the
servicers' edge (`balance_server.status`) alone turns them into gRPC statuses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """An error a caller can act on. `reason` is stable; `metadata` names what it concerns."""

    reason: str = "UNSPECIFIED"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: Mapping[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], *, reason: str | None = None) -> None:
        message = "; ".join(violation.description for violation in violations)
        super().__init__(message, metadata={"field": violations[0].field} if violations else None)
        self.violations = list(violations)
        if reason is not None:
            self.reason = reason


class AccountNotFound(DomainError):
    reason = "ACCOUNT_NOT_FOUND"


class TransactionNotFound(DomainError):
    reason = "TRANSACTION_NOT_FOUND"


class OrderNotFound(DomainError):
    reason = "ORDER_NOT_FOUND"


class InsufficientFunds(DomainError):
    reason = "INSUFFICIENT_FUNDS"


class OrderStateConflict(DomainError):
    reason = "ORDER_STATE_CONFLICT"


class OrderMismatch(DomainError):
    reason = "ORDER_MISMATCH"


class AmountExceedsReserve(DomainError):
    reason = "AMOUNT_EXCEEDS_RESERVE"


class BalanceLimitExceeded(DomainError):
    reason = "BALANCE_LIMIT_EXCEEDED"


class IdempotencyKeyReused(DomainError):
    reason = "IDEMPOTENCY_KEY_REUSED"


class OrderAlreadyExists(DomainError):
    reason = "ORDER_ALREADY_EXISTS"


class RetriesExhausted(DomainError):
    """Serialization conflicts went on past the retry limit or the call's deadline."""

    reason = "SERIALIZATION_RETRIES_EXHAUSTED"


class DatabaseUnavailable(DomainError):
    reason = "DATABASE_UNAVAILABLE"


class Overloaded(DomainError):
    reason = "TOO_MANY_CALLS"


class ReportsBusy(DomainError):
    reason = "REPORTS_BUSY"


# Errors the ledger's SQL functions return, by the reason they return them with.
LEDGER_ERRORS: Mapping[str, type[DomainError]] = {
    error.reason: error
    for error in (
        AccountNotFound,
        OrderNotFound,
        InsufficientFunds,
        OrderStateConflict,
        OrderMismatch,
        AmountExceedsReserve,
        IdempotencyKeyReused,
        OrderAlreadyExists,
    )
}


def ledger_error(reason: str, metadata: Mapping[str, str] | None) -> DomainError:
    """The error for a refusal the ledger returned."""
    details = {key: str(value) for key, value in (metadata or {}).items()}
    if reason == "AMOUNT_TOO_PRECISE":
        currency = details.get("currency", "the order's currency")
        violation = FieldViolation("amount", f"amount has more decimal places than {currency} allows")
        return InvalidArgument([violation], reason="INVALID_AMOUNT")
    error_class = LEDGER_ERRORS.get(reason)
    if error_class is None:
        raise AssertionError(f"the ledger returned an unknown reason {reason!r}")
    return error_class(_LEDGER_MESSAGES[reason].format_map(_Defaulting(details)), metadata=details)


class _Defaulting(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"


_LEDGER_MESSAGES: Mapping[str, str] = {
    "ACCOUNT_NOT_FOUND": "user {user_id} has no {currency} account: it is created by the first deposit",
    "ORDER_NOT_FOUND": "order {order_id} does not exist",
    "INSUFFICIENT_FUNDS": "user {user_id} has {available} {currency} available, less than {requested}",
    "ORDER_STATE_CONFLICT": "order {order_id} is already {status}",
    "ORDER_MISMATCH": "order {order_id} belongs to another user or service",
    "AMOUNT_EXCEEDS_RESERVE": "the amount is more than the {reserved} reserved for order {order_id}",
    "IDEMPOTENCY_KEY_REUSED": "idempotency key {idempotency_key!r} was used before for a different request",
    "ORDER_ALREADY_EXISTS": "order {order_id} was reserved before with different fields",
}
