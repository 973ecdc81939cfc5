"""Opaque keyset page tokens for transaction history.

A token carries the sort key of the last row of its page and a fingerprint of the query it
belongs to (user, sort, filters), so a token used with another query, or altered, is refused
instead of silently starting somewhere else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from balance_server import limits
from balance_server.errors import FieldViolation, InvalidArgument
from balance_server.models import SortField, Transaction, TransactionKind

_TOKEN_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class HistoryQuery:
    """What a page of a user's history is asked for, validated."""

    user_id: int
    sort_by: SortField
    descending: bool
    kinds: frozenset[TransactionKind]
    """Empty: every kind."""
    from_time: datetime | None
    to_time: datetime | None
    page_size: int

    def fingerprint(self) -> str:
        canonical = json.dumps(
            [
                self.user_id,
                self.sort_by.value,
                self.descending,
                sorted(kind.value for kind in self.kinds),
                _micros(self.from_time) if self.from_time else None,
                _micros(self.to_time) if self.to_time else None,
            ]
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Position:
    """The sort key of the last row of a page: its date (as a datetime) or amount, and its id."""

    value: datetime | int
    transaction_id: uuid.UUID


def continue_after(query: HistoryQuery, last: Transaction) -> str:
    """The token of the page that starts after `last`."""
    value = last.created_at if query.sort_by is SortField.DATE else last.amount
    return encode(query, Position(value, last.transaction_id))


def encode(query: HistoryQuery, position: Position) -> str:
    value = _micros(position.value) if isinstance(position.value, datetime) else position.value
    body = [_TOKEN_VERSION, query.fingerprint(), value, position.transaction_id.hex]
    payload = json.dumps(body, separators=(",", ":")).encode()
    checksum = hashlib.sha256(payload).digest()[:6]
    return base64.urlsafe_b64encode(checksum + payload).decode().rstrip("=")


def decode(token: str, query: HistoryQuery) -> Position:
    """The position a token continues from; INVALID_ARGUMENT for a malformed, altered or foreign token."""
    if len(token) > limits.PAGE_TOKEN_LENGTH_MAX:
        raise _invalid("page token is longer than any token this service issues")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
            # Lenient decoding ignores the unused low bits of the last character.
            raise ValueError("not canonical")
        checksum, payload = raw[:6], raw[6:]
        if hashlib.sha256(payload).digest()[:6] != checksum:
            raise ValueError("checksum")
        version, fingerprint, value, transaction_hex = json.loads(payload)
        if not isinstance(transaction_hex, str):
            raise ValueError("content")
        transaction_id = uuid.UUID(hex=transaction_hex)
        if version != _TOKEN_VERSION or type(value) is not int:
            raise ValueError("content")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise _invalid("page token is malformed or was altered") from None
    if fingerprint != query.fingerprint():
        raise _invalid("page token belongs to a query with other filters or sort; start again without it")
    if query.sort_by is SortField.AMOUNT:
        return Position(value, transaction_id)
    try:
        return Position(_EPOCH + timedelta(microseconds=value), transaction_id)
    except OverflowError:
        raise _invalid("page token is malformed or was altered") from None


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _invalid(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", description)], reason="INVALID_PAGE_TOKEN")
