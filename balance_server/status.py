"""The one table from domain errors to gRPC status codes, and the google.rpc status they become."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from balance_server import errors

ERROR_DOMAIN = "balance.v1"

GRPC_CODES: Mapping[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AccountNotFound: grpc.StatusCode.NOT_FOUND,
    errors.TransactionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.OrderNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InsufficientFunds: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OrderStateConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OrderMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AmountExceedsReserve: grpc.StatusCode.FAILED_PRECONDITION,
    errors.BalanceLimitExceeded: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
    errors.OrderAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.RetriesExhausted: grpc.StatusCode.ABORTED,
    errors.DatabaseUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ReportsBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# google.rpc.Code numbers, which equal gRPC's status code numbers.
_RPC_CODES: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
}


def code_of(error: errors.DomainError) -> grpc.StatusCode:
    return GRPC_CODES[type(error)]


def to_status(error: errors.DomainError) -> grpc.Status:
    """The status with an ErrorInfo detail (reason, domain, metadata) and, for INVALID_ARGUMENT,
    a BadRequest detail naming each field."""
    status = status_pb2.Status(code=_RPC_CODES[code_of(error)], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=dict(error.metadata))
    status.details.append(_packed(info))
    if isinstance(error, errors.InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=violation.field, description=violation.description)
                for violation in error.violations
            ]
        )
        status.details.append(_packed(bad_request))
    return rpc_status.to_status(status)


def _packed(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail
