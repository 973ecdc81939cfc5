"""The one table from domain errors to gRPC statuses covers every error, and every ledger refusal."""

from __future__ import annotations

import re
from importlib import resources

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from balance_server import errors, status
from balance_server.errors import DomainError, FieldViolation, InvalidArgument


def _concrete_errors(parent: type[DomainError] = DomainError) -> list[type[DomainError]]:
    found = []
    for child in parent.__subclasses__():
        found.append(child)
        found.extend(_concrete_errors(child))
    return found


CONCRETE_ERRORS = _concrete_errors()


def _example(error_class: type[DomainError]) -> DomainError:
    if issubclass(error_class, InvalidArgument):
        return error_class([FieldViolation("user_id", "user_id must be a positive integer")])
    return error_class(f"an example of {error_class.__name__}", metadata={"order_id": "42"})


def _details(grpc_status: grpc.Status) -> status_pb2.Status:
    ((key, value),) = grpc_status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


def _unpacked(rich: status_pb2.Status, message_class: type) -> list:
    found = []
    for detail in rich.details:
        if detail.Is(message_class.DESCRIPTOR):
            message = message_class()
            detail.Unpack(message)
            found.append(message)
    return found


def test_the_hierarchy_is_found():
    """The search for concrete errors finds the hierarchy (so the coverage test below is not vacuous)."""
    assert {errors.InvalidArgument, errors.InsufficientFunds, errors.Overloaded} <= set(CONCRETE_ERRORS)


def test_every_domain_error_has_a_grpc_code():
    """Every concrete DomainError subclass has its entry in status.GRPC_CODES: one table covers every error."""
    missing = [error_class.__name__ for error_class in CONCRETE_ERRORS if error_class not in status.GRPC_CODES]
    assert missing == []


def test_reasons_are_distinct_upper_snake_case():
    """Each error class has its own stable UPPER_SNAKE reason."""
    reasons = [error_class.reason for error_class in CONCRETE_ERRORS]
    assert all(re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", reason) for reason in reasons)
    assert len(set(reasons)) == len(reasons)


@pytest.mark.parametrize("error_class", CONCRETE_ERRORS, ids=lambda error_class: error_class.__name__)
def test_every_error_becomes_a_status_with_error_info(error_class):
    """to_status gives the table's code, the message, and an ErrorInfo with reason, domain balance.v1 and metadata."""
    error = _example(error_class)
    grpc_status = status.to_status(error)
    rich = _details(grpc_status)
    assert grpc_status.code == status.GRPC_CODES[error_class]
    assert rich.code == grpc_status.code.value[0]
    assert grpc_status.details == rich.message == error.message
    (info,) = _unpacked(rich, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == (error.reason, "balance.v1", dict(error.metadata))


@pytest.mark.parametrize(
    "error_class",
    [error_class for error_class in CONCRETE_ERRORS if not issubclass(error_class, InvalidArgument)],
    ids=lambda error_class: error_class.__name__,
)
def test_only_invalid_argument_carries_bad_request(error_class):
    """Errors other than InvalidArgument carry no BadRequest detail."""
    assert _unpacked(_details(status.to_status(_example(error_class))), error_details_pb2.BadRequest) == []


def test_invalid_argument_names_every_field_in_bad_request():
    """An InvalidArgument becomes INVALID_ARGUMENT with one BadRequest violation per field, in order,
    its own reason, and the first field in the ErrorInfo metadata."""
    violations = [
        FieldViolation("amount", "amount must be greater than zero"),
        FieldViolation("currency", "unknown currency 'XXX'"),
        FieldViolation("user_id", "user_id must be a positive integer"),
    ]
    grpc_status = status.to_status(InvalidArgument(violations, reason="INVALID_AMOUNT"))
    rich = _details(grpc_status)
    (bad_request,) = _unpacked(rich, error_details_pb2.BadRequest)
    (info,) = _unpacked(rich, error_details_pb2.ErrorInfo)
    assert grpc_status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        (v.field, v.description) for v in violations
    ]
    assert (info.reason, dict(info.metadata)) == ("INVALID_AMOUNT", {"field": "amount"})


def test_every_ledger_reason_maps_to_the_class_with_that_reason():
    """Each reason in errors.LEDGER_ERRORS names the error class whose reason it is."""
    assert {reason: error_class.reason for reason, error_class in errors.LEDGER_ERRORS.items()} == {
        reason: reason for reason in errors.LEDGER_ERRORS
    }
    assert set(errors.LEDGER_ERRORS.values()) <= set(status.GRPC_CODES)


def _sql_reasons() -> set[str]:
    """Every reason literal the migrations' SQL functions can return."""
    text = "".join(
        entry.read_text(encoding="utf-8")
        for entry in resources.files("balance_server.migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    passed = re.findall(r"(?:operation_error|idempotency_refuse)\(\s*(?:[^,()]+,\s*)?'([A-Z_]+)'", text)
    assigned = re.findall(r"\breason\s*:=\s*'([A-Z_]+)'", text)
    return set(passed) | set(assigned)


SQL_REASONS = sorted(_sql_reasons())


def test_the_sql_reasons_are_found():
    """The grep of the migrations finds the refusals of debit_regular and of operation_error calls."""
    assert {"ACCOUNT_NOT_FOUND", "INSUFFICIENT_FUNDS", "ORDER_NOT_FOUND", "AMOUNT_TOO_PRECISE"} <= set(SQL_REASONS)


@pytest.mark.parametrize("reason", SQL_REASONS)
def test_every_reason_the_sql_returns_is_handled(reason):
    """ledger_error turns each reason the SQL functions can return into a DomainError the table maps."""
    error = errors.ledger_error(reason, {"order_id": "42", "user_id": "7", "currency": "USD"})
    assert type(error) in status.GRPC_CODES
    assert error.reason == ("INVALID_AMOUNT" if reason == "AMOUNT_TOO_PRECISE" else reason)


def test_every_ledger_error_class_is_returned_by_the_sql():
    """No entry of LEDGER_ERRORS is dead: the SQL functions return each of its reasons."""
    assert set(errors.LEDGER_ERRORS) <= set(SQL_REASONS)


def test_amount_too_precise_becomes_invalid_amount_on_the_amount_field():
    """The ledger's AMOUNT_TOO_PRECISE is the caller's INVALID_AMOUNT naming the amount field and the currency."""
    error = errors.ledger_error("AMOUNT_TOO_PRECISE", {"order_id": "42", "currency": "JPY"})
    assert isinstance(error, InvalidArgument)
    assert (error.reason, [v.field for v in error.violations]) == ("INVALID_AMOUNT", ["amount"])
    assert "JPY" in error.message


def test_ledger_metadata_fills_the_message_and_is_kept_as_text():
    """The ledger's metadata is written into the message and kept, every value as text."""
    error = errors.ledger_error(
        "INSUFFICIENT_FUNDS", {"user_id": 7, "currency": "USD", "available": "1.00", "requested": "2.00"}
    )
    assert error.message == "user 7 has 1.00 USD available, less than 2.00"
    assert error.metadata == {"user_id": "7", "currency": "USD", "available": "1.00", "requested": "2.00"}


def test_missing_metadata_does_not_break_the_message():
    """A refusal without the metadata its message names still becomes its error (with "?" in the gaps)."""
    error = errors.ledger_error("ORDER_NOT_FOUND", None)
    assert isinstance(error, errors.OrderNotFound)
    assert error.message == "order ? does not exist"


def test_an_unknown_ledger_reason_is_a_programming_error():
    """A reason the service does not know is an AssertionError (a bug), never a silent default."""
    with pytest.raises(AssertionError):
        errors.ledger_error("SOMETHING_NEW", {})
