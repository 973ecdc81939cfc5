"""Page tokens: they round-trip, they are bound to their query, and anything else is INVALID_ARGUMENT."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from balance_server import limits, pagination
from balance_server.errors import InvalidArgument
from balance_server.models import SortField, TransactionKind
from balance_server.pagination import HistoryQuery, Position

QUERY = HistoryQuery(
    user_id=7,
    sort_by=SortField.DATE,
    descending=True,
    kinds=frozenset(),
    from_time=None,
    to_time=None,
    page_size=50,
)
BY_AMOUNT = dataclasses.replace(QUERY, sort_by=SortField.AMOUNT)
TRANSACTION_ID = uuid.UUID("0b7e6a2c-9c1d-4f1e-8a3b-2d5c7e9f1a2b")
AT_DATE = Position(datetime(2025, 3, 14, 15, 9, 26, 535897, tzinfo=UTC), TRANSACTION_ID)
AT_AMOUNT = Position(19999, TRANSACTION_ID)


def _refusal(token: str, query: HistoryQuery = QUERY) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as refused:
        pagination.decode(token, query)
    assert refused.value.reason == "INVALID_PAGE_TOKEN"
    assert [violation.field for violation in refused.value.violations] == ["page_token"]
    return refused.value


def _forged(body: object, *, padding: int = 0) -> str:
    """A token with a correct checksum around any JSON body (the checksum is not a secret)."""
    payload = json.dumps(body, separators=(",", ":")).encode() + b" " * padding
    checksum = hashlib.sha256(payload).digest()[:6]
    return base64.urlsafe_b64encode(checksum + payload).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "position"),
    [
        (QUERY, AT_DATE),
        (dataclasses.replace(QUERY, descending=False), AT_DATE),
        (QUERY, Position(datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC), TRANSACTION_ID)),
        (BY_AMOUNT, AT_AMOUNT),
        (BY_AMOUNT, Position(1, uuid.UUID(int=0))),
        (BY_AMOUNT, Position(2**63 - 1, uuid.UUID(int=2**128 - 1))),
    ],
)
def test_a_token_decodes_to_the_position_it_was_made_from(query, position):
    """encode then decode gives back the same sort value and transaction id, for both sort fields."""
    assert pagination.decode(pagination.encode(query, position), query) == position


def test_a_date_in_another_time_zone_comes_back_as_the_same_instant_in_utc():
    """Dates are kept to the microsecond as an instant: the decoded position is the same moment, in UTC."""
    moment = datetime(2025, 3, 14, 17, 9, 26, 535897, tzinfo=timezone(timedelta(hours=2)))
    decoded = pagination.decode(pagination.encode(QUERY, Position(moment, TRANSACTION_ID)), QUERY)
    assert decoded.value == moment
    assert decoded.value.utcoffset() == timedelta(0)


def test_page_size_is_not_part_of_the_query_a_token_is_bound_to():
    """A token still continues the same history when the caller changes only the page size."""
    token = pagination.encode(QUERY, AT_DATE)
    assert pagination.decode(token, dataclasses.replace(QUERY, page_size=1000)) == AT_DATE


FROM_TIME = datetime(2025, 1, 1, tzinfo=UTC)
TO_TIME = datetime(2025, 2, 1, tzinfo=UTC)
WITH_EVERY_FILTER = dataclasses.replace(
    QUERY, kinds=frozenset({TransactionKind.DEPOSIT}), from_time=FROM_TIME, to_time=TO_TIME
)


@pytest.mark.parametrize(
    ("issued_for", "used_with"),
    [
        (QUERY, dataclasses.replace(QUERY, user_id=8)),
        (QUERY, BY_AMOUNT),
        (BY_AMOUNT, QUERY),
        (QUERY, dataclasses.replace(QUERY, descending=False)),
        (QUERY, dataclasses.replace(QUERY, kinds=frozenset({TransactionKind.DEPOSIT}))),
        (WITH_EVERY_FILTER, dataclasses.replace(WITH_EVERY_FILTER, kinds=frozenset(TransactionKind))),
        (QUERY, dataclasses.replace(QUERY, from_time=FROM_TIME)),
        (QUERY, dataclasses.replace(QUERY, to_time=TO_TIME)),
        (WITH_EVERY_FILTER, dataclasses.replace(WITH_EVERY_FILTER, from_time=FROM_TIME + timedelta(microseconds=1))),
        (WITH_EVERY_FILTER, dataclasses.replace(WITH_EVERY_FILTER, to_time=TO_TIME - timedelta(microseconds=1))),
        (WITH_EVERY_FILTER, QUERY),
    ],
    ids=[
        "other-user",
        "date-to-amount",
        "amount-to-date",
        "other-order",
        "kinds-added",
        "other-kinds",
        "from-added",
        "to-added",
        "other-from",
        "other-to",
        "filters-dropped",
    ],
)
def test_a_token_used_with_another_query_is_refused(issued_for, used_with):
    """A token is bound to its user, sort field, order, kinds and time range: any change refuses it."""
    position = AT_AMOUNT if issued_for.sort_by is SortField.AMOUNT else AT_DATE
    refusal = _refusal(pagination.encode(issued_for, position), used_with)
    assert "other filters or sort" in refusal.violations[0].description


@pytest.mark.parametrize(
    "token",
    ["", "!", "!!!!", "abc", "€€€€", "not a token", "A" * 40, base64.urlsafe_b64encode(b"\x00" * 30).decode()],
)
def test_garbage_tokens_are_refused(token):
    """Text that is not a token this service issued is INVALID_ARGUMENT on page_token."""
    _refusal(token)


def test_truncated_tokens_are_refused():
    """A token with any number of characters cut from its end is refused."""
    token = pagination.encode(QUERY, AT_DATE)
    for length in range(len(token)):
        _refusal(token[:length])


def test_tokens_with_any_byte_altered_are_refused():
    """Changing any one bit of any byte of a token (checksum or body) makes it refused."""
    token = pagination.encode(QUERY, AT_DATE)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for index in range(len(raw)):
        for bit in (0x01, 0x80):
            altered = bytearray(raw)
            altered[index] ^= bit
            _refusal(base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("="))


@pytest.mark.parametrize(
    "body",
    [
        [2, QUERY.fingerprint(), 0, TRANSACTION_ID.hex],
        [1, QUERY.fingerprint(), "0", TRANSACTION_ID.hex],
        [1, QUERY.fingerprint(), 1.5, TRANSACTION_ID.hex],
        [1, QUERY.fingerprint(), True, TRANSACTION_ID.hex],
        [1, QUERY.fingerprint(), None, TRANSACTION_ID.hex],
        [1, QUERY.fingerprint(), 0, "not-hex"],
        [1, QUERY.fingerprint(), 0],
        [1, QUERY.fingerprint(), 0, TRANSACTION_ID.hex, "extra"],
        [1, QUERY.fingerprint(), 10**30, TRANSACTION_ID.hex],
        [1, QUERY.fingerprint(), -(10**30), TRANSACTION_ID.hex],
        {"version": 1},
        5,
        None,
        "abcd",
    ],
)
def test_well_checksummed_tokens_with_wrong_content_are_refused(body):
    """A token with a correct checksum but a body this service never writes is refused, not a crash."""
    _refusal(_forged(body))


@pytest.mark.parametrize("transaction_id", [5, 1.5, ["0b7e6a2c"], {"hex": "0b7e6a2c"}])
def test_well_checksummed_tokens_with_a_non_text_transaction_id_are_refused(transaction_id):
    """A forged token whose transaction id is not text is INVALID_ARGUMENT, not an unexpected error."""
    _refusal(_forged([1, QUERY.fingerprint(), 0, transaction_id]))


def test_a_token_at_the_length_limit_is_decoded_and_one_character_more_refused():
    """A valid token of exactly PAGE_TOKEN_LENGTH_MAX characters decodes; one character more is refused unread."""
    body = [1, BY_AMOUNT.fingerprint(), AT_AMOUNT.value, TRANSACTION_ID.hex]
    # Base64 writes 3 bytes as 4 characters: 6 checksum bytes + payload = 3/4 of the limit.
    payload_length = limits.PAGE_TOKEN_LENGTH_MAX * 3 // 4 - 6
    padding = payload_length - len(json.dumps(body, separators=(",", ":")))
    longest = _forged(body, padding=padding)
    assert len(longest) == limits.PAGE_TOKEN_LENGTH_MAX
    assert pagination.decode(longest, BY_AMOUNT) == AT_AMOUNT
    refusal = _refusal(longest + "A", BY_AMOUNT)
    assert "longer than" in refusal.violations[0].description


def test_issued_tokens_are_well_within_the_length_limit():
    """The longest token the service can issue (every filter, the largest values) fits PAGE_TOKEN_LENGTH_MAX."""
    query = dataclasses.replace(WITH_EVERY_FILTER, user_id=2**63 - 1, kinds=frozenset(TransactionKind))
    token = pagination.encode(query, Position(2**63 - 1, uuid.UUID(int=2**128 - 1)))
    assert len(token) <= limits.PAGE_TOKEN_LENGTH_MAX // 2
