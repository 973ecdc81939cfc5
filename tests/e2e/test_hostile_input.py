"""Hostile input through a real server and channel: every RPC gets hypothesis-made requests (extreme
ids, amounts in every script and notation, unknown currencies and enum numbers, huge and strange
text, forged page tokens, timestamps past the calendar, raw bytes) and must answer with a status a
caller can act on, carrying an ErrorInfo of domain balance.v1; a refusal leaves the books as they
were; free text is kept byte for byte or refused naming its field.

Defects these properties once found are kept as explicit examples in test_hostile_examples.py.
To search longer, multiply
every test's number of examples: BALANCE_HOSTILE_EXAMPLES_FACTOR=10 scripts/test -k hostile."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import itertools
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf import message as protobuf_message
from google.protobuf import timestamp_pb2
from grpc import aio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from balance.v1 import info_service_pb2 as info_pb
from balance.v1 import report_service_pb2 as report_pb
from balance.v1 import transaction_service_pb2 as pb
from balance_server import limits
from tests.rpc import Failure, failure_of

Code = grpc.StatusCode

# Ids of this file's own users, services and orders, far from the ids conftest hands out. The
# database is fresh for every run, so fixed ids are safe and let hypothesis replay its examples.
_BASE = 7_340_000_000_000_000
RICH = _BASE + 1
"""Holds money in USD, EUR, JPY and KWD, and has open, captured and released orders."""
EMPTY = _BASE + 2
"""Has USD accounts holding zero."""
SERVICE = _BASE + 11
OPEN_ORDERS = (_BASE + 21, _BASE + 22, _BASE + 23)
CAPTURED_ORDER = _BASE + 24
RELEASED_ORDER = _BASE + 25
_fresh_ids = itertools.count(_BASE + 1_000_000)

# Every reason the README lists, with the code it comes with.
_CODE_OF_REASON = {
    "INVALID_ARGUMENT": Code.INVALID_ARGUMENT,
    "INVALID_AMOUNT": Code.INVALID_ARGUMENT,
    "UNKNOWN_CURRENCY": Code.INVALID_ARGUMENT,
    "INVALID_PAGE_TOKEN": Code.INVALID_ARGUMENT,
    "ACCOUNT_NOT_FOUND": Code.NOT_FOUND,
    "ORDER_NOT_FOUND": Code.NOT_FOUND,
    "TRANSACTION_NOT_FOUND": Code.NOT_FOUND,
    "INSUFFICIENT_FUNDS": Code.FAILED_PRECONDITION,
    "ORDER_STATE_CONFLICT": Code.FAILED_PRECONDITION,
    "ORDER_MISMATCH": Code.FAILED_PRECONDITION,
    "AMOUNT_EXCEEDS_RESERVE": Code.FAILED_PRECONDITION,
    "BALANCE_LIMIT_EXCEEDED": Code.FAILED_PRECONDITION,
    "IDEMPOTENCY_KEY_REUSED": Code.ALREADY_EXISTS,
    "ORDER_ALREADY_EXISTS": Code.ALREADY_EXISTS,
    "SERIALIZATION_RETRIES_EXHAUSTED": Code.ABORTED,
    "DATABASE_UNAVAILABLE": Code.UNAVAILABLE,
    "TOO_MANY_CALLS": Code.RESOURCE_EXHAUSTED,
}
# Refusals a money operation remembers under its idempotency key, so that a retry gets them again.
_REMEMBERED_REASONS = frozenset({"ACCOUNT_NOT_FOUND", "INSUFFICIENT_FUNDS"})


def _hostile(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples * int(os.environ.get("BALANCE_HOSTILE_EXAMPLES_FACTOR", "1")),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Strategies.


def _usually(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` three times in four: requests with many fields need most of them valid to reach the ledger."""
    return st.integers(0, 3).flatmap(lambda draw: hostile if draw == 0 else valid)


_EXTREME_IDS = (0, -1, 1, 2, 3, 2**31 - 1, 2**31, -(2**31), 2**63 - 1, -(2**63))
_user_ids = st.one_of(st.sampled_from(_EXTREME_IDS), st.sampled_from((RICH, EMPTY)), st.integers(-(2**63), 2**63 - 1))
# Who pays: usually the user who has the money, so that payments get as far as the ledger.
_payer_ids = _usually(st.just(RICH), _user_ids)
_service_ids = st.one_of(st.sampled_from(_EXTREME_IDS), st.just(SERVICE), st.integers(-(2**63), 2**63 - 1))
_order_ids = st.one_of(
    st.sampled_from(_EXTREME_IDS),
    st.sampled_from((*OPEN_ORDERS, CAPTURED_ORDER, RELEASED_ORDER)),
    st.integers(-(2**63), 2**63 - 1),
)

_ODD_AMOUNTS = (
    *("١٢٣", "١٢٣٫٤٥", "１２３", "１.５", "𝟏𝟐𝟑", "৫", "²", "½", "Ⅻ", "٫5"),
    *("1e5", "1E5", "1e-2", "0e0", "+5", "-5", "-0", "+0", " 5", "5 ", "\t5", "5\n", "\n5", "5\x00", "5\u200b"),
    *("\u202e5", "5\u0301", "0", "00", "0.00", ".5", "5.", "1.", "1..0", "1.0.0", "1,5", "1_000", "1 000"),
    *("NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf", "0x10", "0b1", "0o7", "", " "),
    *("1" * 1000, "0." + "0" * 999 + "1", "9" * 40, "9" * 41, "1." + "0" * 38, "1." + "0" * 39, "0" * 39 + "1"),
    *("10000000000000.00", "10000000000000.01", "1000000000000000", "0.01", "0.001", "0.0001", "1.5", "199.99"),
)


def _decimal_text(units: int, digits: int) -> str:
    whole, fraction = divmod(units, 10**digits)
    return f"{whole}.{fraction:0{digits}d}" if digits else str(whole)


_amounts = _usually(
    st.one_of(
        st.builds(_decimal_text, st.integers(1, 10_000), st.integers(0, 4)),
        st.builds(_decimal_text, st.integers(1, 10**16), st.integers(0, 5)),
    ),
    st.one_of(
        st.sampled_from(_ODD_AMOUNTS),
        st.from_regex(r"\A[+-]?[0-9０-９٠-٩]{0,45}([.,٫][0-9]{0,45})?([eE][+-]?[0-9]{1,3})?\Z"),
        st.text(max_size=50),
    ),
)

# The ones RICH holds, and others of zero, three and four minor digits.
_KNOWN_CURRENCIES = ("USD", "EUR", "JPY", "KWD", "CLF", "BHD", "VND", "GBP")
_currencies = _usually(
    st.one_of(
        st.just(""),
        st.sampled_from(_KNOWN_CURRENCIES),
        st.sampled_from(_KNOWN_CURRENCIES).map(str.lower),
        st.sampled_from(_KNOWN_CURRENCIES).map(lambda code: code[0].lower() + code[1:]),
    ),
    st.one_of(
        st.sampled_from(("XXX", "XTS", "US", "USDD", "ＵＳＤ", "usd ", " USD", "US\x00", "ǅSD", "ßSD", "İSD", "€€€")),
        st.sampled_from(("U$D", "usd1", "\u0130sd", "ＪＰＹ")),
        st.text(max_size=8),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=3, max_size=3),
    ),
)

_NASTY_TEXT = (
    *("'", "''", '"', "';--", "'); DROP TABLE transactions;--", "%s", "%%", "%1$s", "%I", "{0}", "{user_id}"),
    *("\\", "\\x00", "\\.", "\n", "\r\n", "\r", "\t", "a;b", '"a;b"', "$$", "E'\\x27'", "NULL", "\\N"),
    *("😀", "👨\u200d👩\u200d👧\u200d👦", "𝕳𝖊𝖑𝖑𝖔", "e\u0301", "\u0301" * 50, "שלום עולם", "مرحبا بالعالم"),
    *("\u202eevil\u202c", "\u200b", "\ufeff", "\uffff", "\ufffe", "\U0010ffff", "ǅ", "İ", "ß", "\x7f", "\x1b[31m"),
    *("<script>alert(1)</script>", "\x00", "a\x00b", "\u2028", "\u0085", " ", "  padded  "),
)
_nasty_text = st.one_of(
    st.sampled_from(_NASTY_TEXT),
    st.lists(st.sampled_from(_NASTY_TEXT), max_size=12).map("".join),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x10000), max_size=30),
)


def _text_near(limit: int) -> st.SearchStrategy[str]:
    """Text around a limit of `limit` characters, in one- and four-byte characters."""
    return st.builds(
        lambda piece, count: piece * count, st.sampled_from(("a", "é", "😀", "\u0301")), st.integers(0, limit + 2)
    )


# Enough "😀" (four bytes each) to pass the message limit on its own.
_huge_text = st.builds(
    lambda piece, count: piece * count,
    st.sampled_from(("a", "😀", "\x00")),
    st.sampled_from((limits.MESSAGE_BYTES_MAX // 4 - 64, limits.MESSAGE_BYTES_MAX // 4 + 64, limits.MESSAGE_BYTES_MAX)),
)


def _free_text(limit: int) -> st.SearchStrategy[str]:
    return st.one_of(_nasty_text, _text_near(limit), st.text(max_size=limit + 20), _huge_text)


_keys = _usually(
    st.one_of(st.just(""), st.uuids().map(lambda value: value.hex)),
    st.one_of(
        st.sampled_from((" k", "k ", "k\n", "\tk", "a" * 128, "a" * 129, "😀" * 128, "😀" * 129, "\u200b", "k\x00")),
        st.sampled_from(("\x7f", "é", "\u0301", "key with spaces", "'", "%s")),
        st.text(max_size=140),
    ),
)

_ENUM_EXTREMES = (0, 1, 2, 3, 6, 7, 77, -1, 2**31 - 1, -(2**31))
_enum_numbers = _usually(
    st.sampled_from((0, 1, 2)), st.one_of(st.sampled_from(_ENUM_EXTREMES), st.integers(-(2**31), 2**31 - 1))
)
_kinds = _usually(
    st.lists(st.integers(1, 6), max_size=4),
    st.one_of(
        st.lists(st.one_of(st.sampled_from(_ENUM_EXTREMES), st.integers(-(2**31), 2**31 - 1)), max_size=20),
        st.lists(st.integers(1, 6), min_size=16, max_size=17),
    ),
)
_page_sizes = _usually(
    st.sampled_from((0, 1, 2, 1000, 1001, 2**31 - 1)),
    st.one_of(st.sampled_from((-1, -(2**31))), st.integers(-(2**31), 2**31 - 1)),
)

_SECONDS_MIN = -62_135_596_800  # 0001-01-01T00:00:00Z
_SECONDS_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
_timestamps = _usually(
    st.one_of(
        st.none(),
        st.builds(
            lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
            st.integers(_SECONDS_MIN, _SECONDS_MAX),
            st.integers(0, 999_999_999),
        ),
    ),
    st.builds(
        lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
        st.one_of(
            st.sampled_from((_SECONDS_MIN - 1, _SECONDS_MIN, 0, _SECONDS_MAX, _SECONDS_MAX + 1, 2**63 - 1, -(2**63))),
            st.integers(_SECONDS_MIN - 10, _SECONDS_MAX + 10),
            st.integers(-(2**63), 2**63 - 1),
        ),
        st.one_of(
            st.sampled_from((0, 1, 999, 1000, 999_999_000, 999_999_999, 10**9, -1, 2**31 - 1, -(2**31))),
            st.integers(-(2**31), 2**31 - 1),
        ),
    ),
)

_transaction_id_texts = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda value: value.hex.upper()),
    st.uuids().map(lambda value: f"{{{value}}}"),
    st.uuids().map(lambda value: f"urn:uuid:{value}"),
    st.sampled_from(("", "0" * 32, "０" * 32, "٠" * 32, " " + "0" * 31, "0" * 31 + "\n", "0_" * 16, "-" * 64)),
    st.text(max_size=80),
    _huge_text,
)

_TIME_ZONES = (
    *("", "UTC", "utc", "Europe/Moscow", "America/New_York", "Asia/Kathmandu", "Pacific/Chatham", "Etc/GMT+12"),
    *("Factory", "posixrules", "localtime", "zone.tab", "tzdata.zi", "leapseconds", "__init__", "__init__.py"),
    *("../etc/passwd", "/etc/localtime", "Europe/../UTC", "Europe//Moscow", "UTC/", ".", "..", "UTC\x00"),
    *(" UTC", "UTC\n", "a" * 64, "a" * 65, "Europe/Moscow" + "/x" * 30, "Ω", "C:\\Windows", "~", "$TZ"),
    *("Europe", "America", "Etc", "__pycache__"),
)
_time_zones = _usually(
    st.sampled_from(("", "UTC", "Europe/Moscow", "America/New_York", "Asia/Kathmandu", "Pacific/Chatham")),
    st.one_of(st.sampled_from(_TIME_ZONES), st.text(max_size=80)),
)
_this_year = datetime.now(UTC).year
_years = _usually(
    st.integers(limits.REPORT_YEAR_MIN, _this_year + 1),
    st.one_of(st.sampled_from((0, 1, 1999, _this_year + 2, 9999, -1)), st.integers(-(2**31), 2**31 - 1)),
)
_months = _usually(st.integers(1, 12), st.one_of(st.sampled_from((0, 13, -1)), st.integers(-(2**31), 2**31 - 1)))


def _varint(value: int) -> bytes:
    value &= 2**64 - 1
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _wire(fields: Iterable[tuple[int, int, int, bytes, bool]]) -> bytes:
    """Protobuf wire bytes from (field number, wire type, integer, payload, lie about the length)."""
    encoded = bytearray()
    for number, wire_type, integer, payload, lie in fields:
        encoded += _varint(number << 3 | wire_type)
        if wire_type == 0:
            encoded += _varint(integer)
        elif wire_type == 1:
            encoded += (integer % 2**64).to_bytes(8, "little")
        elif wire_type == 2:
            encoded += _varint(len(payload) + lie) + payload
        elif wire_type == 5:
            encoded += (integer % 2**32).to_bytes(4, "little")
        # Wire types 3 and 4 (groups) and 6 and 7 (none such) carry nothing here.
    return bytes(encoded)


_raw_requests = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.tuples(
            st.one_of(st.integers(1, 12), st.integers(1, 2**29 - 1)),
            _usually(st.sampled_from((0, 1, 2, 5)), st.integers(0, 7)),
            st.integers(-(2**63), 2**64 - 1),
            _usually(st.text(max_size=20).map(str.encode), st.binary(max_size=40)),
            _usually(st.just(False), st.just(True)),
        ),
        max_size=8,
    ).map(_wire),
)


# What the server is expected to refuse, from the README's rules.

_PLAIN_DECIMAL = re.compile(r"(?P<whole>[0-9]+)(?:\.(?P<fraction>[0-9]+))?")


def _currency_code(text: str, currencies: dict[str, int]) -> str | None:
    """The code a currency field means (empty: USD, the default), or None when it is unknown."""
    if text == "":
        return "USD"
    if re.fullmatch(r"[A-Za-z]{3}", text) and text.upper() in currencies:
        return text.upper()
    return None


def _amount_is_valid(text: str, currency: str | None, currencies: dict[str, int]) -> bool:
    """A positive plain ASCII decimal of at most 40 characters; with a known currency also within
    its minor digits and the maximum (with an unknown one only the form is judged)."""
    match = _PLAIN_DECIMAL.fullmatch(text)
    if len(text) > limits.AMOUNT_TEXT_LENGTH_MAX or match is None:
        return False
    whole, fraction = match["whole"], match["fraction"] or ""
    if int(whole + fraction) == 0:
        return False
    if currency is None:
        return True
    digits = currencies[currency]
    significant = fraction.rstrip("0")
    return len(significant) <= digits and int(whole + significant.ljust(digits, "0")) <= limits.AMOUNT_MINOR_UNITS_MAX


def _canonical(text: str, currency: str, currencies: dict[str, int]) -> str:
    """A valid amount as the ledger writes it back: exactly the currency's minor digits."""
    whole, _, fraction = text.partition(".")
    digits = currencies[currency]
    return _decimal_text(int(whole + fraction.rstrip("0").ljust(digits, "0")), digits)


def _text_is_valid(text: str, length_max: int) -> bool:
    return len(text) <= length_max and "\x00" not in text


def _key_is_valid(key: str) -> bool:
    return key == "" or (key.strip() == key and key.isprintable() and len(key) <= limits.IDEMPOTENCY_KEY_LENGTH_MAX)


def _moment(timestamp: timestamp_pb2.Timestamp | None) -> datetime | None:
    """The bound a timestamp means, rounded up to the microsecond; None when it is not a valid one."""
    if timestamp is None or not (_SECONDS_MIN <= timestamp.seconds <= _SECONDS_MAX):
        return None
    if not 0 <= timestamp.nanos <= 999_999_999:
        return None
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=timestamp.seconds)
    micros = -(-timestamp.nanos // 1000)
    try:
        return moment + timedelta(microseconds=micros)
    except OverflowError:
        return None


def _time_faults(from_time: timestamp_pb2.Timestamp | None, to_time: timestamp_pb2.Timestamp | None) -> set[str]:
    start, end = _moment(from_time), _moment(to_time)
    faults = set()
    if from_time is not None and start is None:
        faults.add("from_time")
    if to_time is not None and (end is None or (start is not None and start >= end)):
        faults.add("to_time")
    return faults


def _kinds_are_valid(kinds: list[int]) -> bool:
    return len(kinds) <= limits.TRANSACTION_KINDS_FILTER_MAX and all(1 <= kind <= 6 for kind in kinds)


def _time_zone_is_valid(name: str) -> bool:
    name = name or "UTC"
    if len(name) > 64:
        return False
    try:
        ZoneInfo(name)
    except Exception:
        return False
    return True


def _faults(**bad: bool) -> frozenset[str]:
    return frozenset(name for name, is_bad in bad.items() if is_bad)


def _oversized(request: protobuf_message.Message) -> bool:
    return request.ByteSize() > limits.MESSAGE_BYTES_MAX


# Calls and what they left in the books.

_SNAPSHOT = """
    SELECT (SELECT count(*) FROM transactions), (SELECT count(*) FROM entries), (SELECT count(*) FROM orders),
           (SELECT count(*) FROM idempotency_keys), (SELECT coalesce(sum(balance), 0) FROM accounts),
           (SELECT count(*) FROM accounts), (SELECT count(*) FROM services),
           (SELECT max(updated_at) FROM accounts), (SELECT max(updated_at) FROM orders),
           (SELECT max(updated_at) FROM services)
"""


@dataclass(frozen=True)
class Snapshot:
    """The books as far as a refused call must leave them: counts, the sum of balances, and the
    latest change of any account, order or service."""

    transactions: int
    entries: int
    orders: int
    idempotency_keys: int
    balance_sum: object
    accounts: int
    services: int
    accounts_changed: object
    orders_changed: object
    services_changed: object


_CURRENCIES = "SELECT code, minor_digits FROM currencies"


async def _snapshot(books) -> Snapshot:
    return Snapshot(*(await books.rows(_SNAPSHOT))[0])


@dataclass
class Answer:
    code: grpc.StatusCode
    failure: Failure | None
    response: Any
    """The response message; for a server-streaming call the list of its messages."""
    replayed: bool
    before: Snapshot
    after: Snapshot


async def _ask(books, start_call: Callable[[], Any], *, streaming: bool = False) -> Answer:
    """Makes one call, with the books read just before and just after it."""
    before = await _snapshot(books)
    call = start_call()
    response: Any = None
    failure = None
    replayed = False
    try:
        response = [item async for item in call] if streaming else await call
        replayed = ("x-idempotent-replay", "true") in tuple(await call.trailing_metadata() or ())
    except aio.AioRpcError as error:
        failure = failure_of(error)
    after = await _snapshot(books)
    return Answer(failure.code if failure else Code.OK, failure, response, replayed, before, after)


_ANY_FIELD = None
"""For `faults`: the request's fields are not judged."""


def _assert_answered(
    answer: Answer,
    *,
    faults: frozenset[str] | None = frozenset(),
    also_invalid: frozenset[str] = frozenset(),
    oversized: bool = False,
    keyed: bool = False,
    read_only: bool = False,
) -> None:
    """What every answer to anything a caller can send must be. `faults`: the fields the README's
    rules refuse (None: not judged); `also_invalid`: fields only the ledger can judge. Only for
    tests under @given (it records the outcome for --hypothesis-show-statistics)."""
    failure = answer.failure
    event(f"{answer.code.name} {failure.reason if failure else ''}".strip())
    assert answer.code not in (Code.UNKNOWN, Code.INTERNAL), failure
    if failure is not None:
        assert "Traceback" not in failure.message and "Unexpected <class" not in failure.message, failure
    if oversized:
        # gRPC refuses it before any handler runs: no ErrorInfo is possible.
        assert answer.code == Code.RESOURCE_EXHAUSTED, failure
        assert answer.after == answer.before
        return
    if faults:
        assert answer.code == Code.INVALID_ARGUMENT, (faults, answer)
        assert failure is not None and set(failure.fields) == faults, (faults, failure)
    elif faults is not None and answer.code == Code.INVALID_ARGUMENT:
        assert failure is not None and set(failure.fields) <= also_invalid, failure
    if failure is not None:
        assert failure.domain == "balance.v1", failure
        assert _CODE_OF_REASON.get(failure.reason) == answer.code, failure
    if answer.code == Code.OK and not read_only and not answer.replayed:
        return
    # A refusal, a read or a replay: the books are as they were.
    if keyed and failure is not None and failure.reason in _REMEMBERED_REASONS:
        added = answer.after.idempotency_keys - answer.before.idempotency_keys
        assert added in (0, 1), answer
        assert replace(answer.after, idempotency_keys=answer.before.idempotency_keys) == answer.before
    else:
        assert answer.after == answer.before, answer


async def _assert_replay_moves_nothing(books, key: str, answer: Answer, start_call: Callable[[], Any]) -> None:
    """With a key (for a reserve, its order id), the same request again is a replay of the same
    transaction that changes nothing."""
    if not key:
        return
    again = await _ask(books, start_call)
    assert again.code == Code.OK and again.replayed, again.failure
    assert again.response.transaction == answer.response.transaction
    assert again.after == again.before


async def _assert_text_kept(books, transaction, *, text: str, key: str, phrase: str, without: str) -> None:
    """The description quotes `text` exactly (or says `without` when empty), the ledger's memo
    column holds it byte for byte, and the idempotency key comes back as sent."""
    assert transaction.description.endswith(phrase.format(text) if text else without), transaction.description
    memo = await books.value(
        "SELECT memo FROM transactions WHERE transaction_id = %s", uuid.UUID(transaction.transaction_id)
    )
    assert memo == text
    assert transaction.idempotency_key == key


# The stage: users, orders and a page token that requests can name.


class Currencies(dict[str, int]):
    """Every currency the ledger knows, with its minor digits; short in hypothesis's reports."""

    def __repr__(self) -> str:
        return f"Currencies(<{len(self)} codes>)"


@dataclass(frozen=True)
class Stage:
    currencies: Currencies
    transaction_ids: tuple[str, ...]
    page_token: str
    """The token of the second page of ListTransactions(user_id=RICH, page_size=1)."""


@pytest.fixture(scope="module")
async def stage(transactions, info, books) -> Stage:
    currencies = Currencies(await books.rows(_CURRENCIES))
    written = []
    for amount, currency in (("1000000.00", "USD"), ("1000", "EUR"), ("1000000", "JPY"), ("1000.000", "KWD")):
        deposit = await transactions.Deposit(pb.DepositRequest(user_id=RICH, amount=amount, currency=currency))
        written.append(deposit.transaction.transaction_id)
    await transactions.Deposit(pb.DepositRequest(user_id=EMPTY, amount="1.00"))
    await transactions.Withdraw(pb.WithdrawRequest(user_id=EMPTY, amount="1.00"))
    for order in (*OPEN_ORDERS, CAPTURED_ORDER, RELEASED_ORDER):
        reserve = pb.ReserveRequest(user_id=RICH, service_id=SERVICE, order_id=order, amount="10.00", service_name="S")
        written.append((await transactions.Reserve(reserve)).transaction.transaction_id)
    revenue = pb.RecognizeRevenueRequest(user_id=RICH, service_id=SERVICE, order_id=CAPTURED_ORDER, amount="4.00")
    written.append((await transactions.RecognizeRevenue(revenue)).transaction.transaction_id)
    await transactions.ReleaseReserve(pb.ReleaseReserveRequest(order_id=RELEASED_ORDER))
    page = await info.ListTransactions(info_pb.ListTransactionsRequest(user_id=RICH, page_size=1))
    assert page.next_page_token
    return Stage(currencies, tuple(written), page.next_page_token)


# TransactionService.


@_hostile(examples=160)
@given(user=_user_ids, amount=_amounts, currency=_currencies, key=_keys, source=_free_text(limits.MEMO_LENGTH_MAX))
async def test_deposit_answers_any_request_safely(transactions, books, stage, user, amount, currency, key, source):
    """Any DepositRequest is refused naming its faulty fields, or applied once with amount and source exact."""
    request = pb.DepositRequest(user_id=user, amount=amount, currency=currency, idempotency_key=key, source=source)
    code = _currency_code(currency, stage.currencies)
    faults = _faults(
        currency=code is None,
        user_id=user <= 0,
        amount=not _amount_is_valid(amount, code, stage.currencies),
        source=not _text_is_valid(source, limits.MEMO_LENGTH_MAX),
        idempotency_key=not _key_is_valid(key),
    )
    answer = await _ask(books, lambda: transactions.Deposit(request))
    _assert_answered(answer, faults=faults, oversized=_oversized(request), keyed=bool(key))
    if answer.code == Code.OK:
        assert code is not None and answer.response.transaction.amount == _canonical(amount, code, stage.currencies)
        await _assert_replay_moves_nothing(books, key, answer, lambda: transactions.Deposit(request))
        await _assert_text_kept(
            books,
            answer.response.transaction,
            text=source,
            key=key,
            phrase=" from payment source '{}'.",
            without=" from an external payment.",
        )


@_hostile(examples=160)
@given(
    user=_payer_ids, amount=_amounts, currency=_currencies, key=_keys, destination=_free_text(limits.MEMO_LENGTH_MAX)
)
async def test_withdraw_answers_any_request_safely(
    transactions, books, stage, user, amount, currency, key, destination
):
    """Any WithdrawRequest is refused naming its faulty fields, or applied once, amount and destination exact."""
    request = pb.WithdrawRequest(
        user_id=user, amount=amount, currency=currency, idempotency_key=key, destination=destination
    )
    code = _currency_code(currency, stage.currencies)
    faults = _faults(
        currency=code is None,
        user_id=user <= 0,
        amount=not _amount_is_valid(amount, code, stage.currencies),
        destination=not _text_is_valid(destination, limits.MEMO_LENGTH_MAX),
        idempotency_key=not _key_is_valid(key),
    )
    answer = await _ask(books, lambda: transactions.Withdraw(request))
    _assert_answered(answer, faults=faults, oversized=_oversized(request), keyed=bool(key))
    if answer.code == Code.OK:
        assert code is not None and answer.response.transaction.amount == _canonical(amount, code, stage.currencies)
        await _assert_replay_moves_nothing(books, key, answer, lambda: transactions.Withdraw(request))
        await _assert_text_kept(
            books,
            answer.response.transaction,
            text=destination,
            key=key,
            phrase=" to payout destination '{}'.",
            without=" to an external account.",
        )


@_hostile(examples=160)
@given(
    sender=_payer_ids,
    receiver=_user_ids,
    amount=_amounts,
    currency=_currencies,
    key=_keys,
    comment=_free_text(limits.MEMO_LENGTH_MAX),
)
async def test_transfer_answers_any_request_safely(
    transactions, books, stage, sender, receiver, amount, currency, key, comment
):
    """Any TransferRequest is refused naming its faulty fields, or applied once with amount and comment exact."""
    request = pb.TransferRequest(
        from_user_id=sender, to_user_id=receiver, amount=amount, currency=currency, idempotency_key=key, comment=comment
    )
    code = _currency_code(currency, stage.currencies)
    faults = _faults(
        currency=code is None,
        from_user_id=sender <= 0,
        to_user_id=receiver <= 0 or receiver == sender,
        amount=not _amount_is_valid(amount, code, stage.currencies),
        comment=not _text_is_valid(comment, limits.MEMO_LENGTH_MAX),
        idempotency_key=not _key_is_valid(key),
    )
    answer = await _ask(books, lambda: transactions.Transfer(request))
    _assert_answered(answer, faults=faults, oversized=_oversized(request), keyed=bool(key))
    if answer.code == Code.OK:
        assert code is not None and answer.response.transaction.amount == _canonical(amount, code, stage.currencies)
        await _assert_replay_moves_nothing(books, key, answer, lambda: transactions.Transfer(request))
        await _assert_text_kept(
            books, answer.response.transaction, text=comment, key=key, phrase=" with comment '{}'.", without="."
        )


@_hostile(examples=160)
@given(
    user=_payer_ids,
    service=_service_ids,
    order=_order_ids,
    amount=_amounts,
    currency=_currencies,
    service_name=_free_text(limits.SERVICE_NAME_LENGTH_MAX),
)
async def test_reserve_answers_any_request_safely(
    transactions, info, books, stage, user, service, order, amount, currency, service_name
):
    """Any ReserveRequest is refused naming its faulty fields, or applied once, amount and service name exact."""
    request = pb.ReserveRequest(
        user_id=user, service_id=service, order_id=order, amount=amount, currency=currency, service_name=service_name
    )
    code = _currency_code(currency, stage.currencies)
    faults = _faults(
        currency=code is None,
        user_id=user <= 0,
        service_id=service <= 0,
        order_id=order <= 0,
        amount=not _amount_is_valid(amount, code, stage.currencies),
        service_name=not _text_is_valid(service_name, limits.SERVICE_NAME_LENGTH_MAX),
    )
    answer = await _ask(books, lambda: transactions.Reserve(request))
    _assert_answered(answer, faults=faults, oversized=_oversized(request))
    if answer.code == Code.OK:
        assert code is not None and answer.response.transaction.amount == _canonical(amount, code, stage.currencies)
        await _assert_replay_moves_nothing(books, "order", answer, lambda: transactions.Reserve(request))
        await _assert_service_name_kept(info, books, answer, request)


async def _assert_service_name_kept(info, books, answer: Answer, request: pb.ReserveRequest) -> None:
    """The order keeps its service name byte for byte; a new reserve naming its service names it."""
    order = (await info.GetOrder(info_pb.GetOrderRequest(order_id=request.order_id))).order
    assert order.service_name == request.service_name
    stored = await books.value("SELECT service_name FROM orders WHERE order_id = %s", request.order_id)
    assert stored == request.service_name
    if request.service_name and not answer.replayed:
        named = await books.value("SELECT name FROM services WHERE service_id = %s", request.service_id)
        assert named == request.service_name


async def _open_order(transactions, currency: str) -> int:
    """A new order of RICH for SERVICE holding 5 of `currency` (deposited first: other examples spend RICH's money)."""
    order = next(_fresh_ids)
    await transactions.Deposit(pb.DepositRequest(user_id=RICH, amount="5", currency=currency))
    await transactions.Reserve(
        pb.ReserveRequest(user_id=RICH, service_id=SERVICE, order_id=order, amount="5", currency=currency)
    )
    return order


@_hostile(examples=60)
@given(order=st.one_of(st.none(), _order_ids))
async def test_release_reserve_answers_any_request_safely(transactions, books, stage, order):
    """Any ReleaseReserveRequest (None: of a new open order) is refused with an ErrorInfo and no change, or applied."""
    if order is None:
        order = await _open_order(transactions, "USD")
    request = pb.ReleaseReserveRequest(order_id=order)
    answer = await _ask(books, lambda: transactions.ReleaseReserve(request))
    _assert_answered(answer, faults=_faults(order_id=order <= 0))


@_hostile(examples=100)
@given(
    target=_usually(st.sampled_from(("USD", "JPY", "KWD")), st.tuples(_user_ids, _service_ids, _order_ids)),
    amount=st.one_of(st.just(""), st.sampled_from(("1", "2.5", "5", "5.000", "0.01", "0.001", "4.9999")), _amounts),
)
async def test_recognize_revenue_answers_any_request_safely(transactions, books, stage, target, amount):
    """Any RecognizeRevenueRequest (or one for a new open order) is refused naming its faulty fields, or applied."""
    if isinstance(target, str):
        user, service, order = RICH, SERVICE, await _open_order(transactions, target)
    else:
        user, service, order = target
    request = pb.RecognizeRevenueRequest(user_id=user, service_id=service, order_id=order, amount=amount)
    faults = _faults(
        user_id=user <= 0,
        service_id=service <= 0,
        order_id=order <= 0,
        amount=amount != "" and not _amount_is_valid(amount, None, stage.currencies),
    )
    answer = await _ask(books, lambda: transactions.RecognizeRevenue(request))
    # Only the order knows its currency, so the ledger judges the amount's precision.
    _assert_answered(answer, faults=faults, oversized=_oversized(request), also_invalid=frozenset({"amount"}))


# InfoService.


@_hostile(examples=80)
@given(user=_user_ids, currency=_currencies)
async def test_get_balance_answers_any_request_safely(info, books, stage, user, currency):
    """Any GetBalanceRequest is answered or refused naming exactly its faulty fields, and changes nothing."""
    request = info_pb.GetBalanceRequest(user_id=user, currency=currency)
    faults = _faults(user_id=user <= 0, currency=currency != "" and _currency_code(currency, stage.currencies) is None)
    answer = await _ask(books, lambda: info.GetBalance(request))
    _assert_answered(answer, faults=faults, read_only=True)


@_hostile(examples=200)
@given(
    user=_user_ids,
    sort_by=_enum_numbers,
    order=_enum_numbers,
    page_size=_page_sizes,
    page_token=_usually(
        st.just(""), st.one_of(st.text(max_size=80), _text_near(limits.PAGE_TOKEN_LENGTH_MAX), _huge_text)
    ),
    kinds=_kinds,
    from_time=_timestamps,
    to_time=_timestamps,
)
async def test_list_transactions_answers_any_request_safely(
    info, books, stage, user, sort_by, order, page_size, page_token, kinds, from_time, to_time
):
    """Any ListTransactionsRequest is answered or refused naming exactly its faulty fields, and changes nothing."""
    request = info_pb.ListTransactionsRequest(
        user_id=user,
        sort_by=sort_by,
        order=order,
        page_size=page_size,
        page_token=page_token,
        kinds=kinds,
        from_time=from_time,
        to_time=to_time,
    )
    faults = _faults(
        user_id=user <= 0,
        sort_by=not 0 <= sort_by <= 2,
        order=not 0 <= order <= 2,
        page_size=page_size < 0,
        kinds=not _kinds_are_valid(kinds),
    ) | _time_faults(from_time, to_time)
    answer = await _ask(books, lambda: info.ListTransactions(request))
    _assert_answered(
        answer, faults=faults, oversized=_oversized(request), also_invalid=frozenset({"page_token"}), read_only=True
    )
    if answer.code == Code.OK:
        assert len(answer.response.transactions) <= min(page_size or limits.PAGE_SIZE_DEFAULT, limits.PAGE_SIZE_MAX)


def _token(payload: bytes) -> str:
    """A page token of the service's format whose checksum matches its payload."""
    checksum = hashlib.sha256(payload).digest()[:6]
    return base64.urlsafe_b64encode(checksum + payload).decode().rstrip("=")


def _payload(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[6:]


_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(-(2**80), 2**80),
        st.floats(),
        st.text(max_size=40),
        st.uuids().map(lambda value: value.hex),
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def _hostile_tokens(draw: st.DrawFn, genuine: str) -> str:
    """A token altered by one character, cut, padded, or forged with a matching checksum."""
    fingerprint = json.loads(_payload(genuine))[1]
    how = draw(st.sampled_from(("edit", "cut", "pad", "forge", "forge_anything", "bytes")))
    if how == "edit":
        position = draw(st.integers(0, len(genuine) - 1))
        character = draw(st.sampled_from(_BASE64_ALPHABET + "=+/ .\x00é"))
        return genuine[:position] + character + genuine[position + 1 :]
    if how == "cut":
        return genuine[: draw(st.integers(0, len(genuine) - 1))]
    if how == "pad":
        return genuine + draw(st.text(alphabet=_BASE64_ALPHABET + "=", min_size=1, max_size=600))
    if how == "bytes":
        return _token(draw(st.binary(max_size=380)))
    if how == "forge_anything":
        forged = draw(_json_values)
    else:
        version = draw(_usually(st.just(1), _json_values))
        value = draw(_usually(st.integers(-(2**62), 2**62), _json_values))
        transaction = draw(_usually(st.uuids().map(lambda value: value.hex), _json_values))
        forged = [version, draw(_usually(st.just(fingerprint), st.text(max_size=20))), value, transaction]
    return _token(json.dumps(forged).encode())


@_hostile(examples=200)
@given(data=st.data())
async def test_altered_and_forged_page_tokens_are_refused_or_followed(info, books, stage, data):
    """A token altered or forged, even with a matching checksum, is INVALID_PAGE_TOKEN or a page: never INTERNAL."""
    token = data.draw(_hostile_tokens(stage.page_token))
    sort_by = data.draw(st.sampled_from((0, 1, 2)))
    request = info_pb.ListTransactionsRequest(user_id=RICH, page_size=1, page_token=token, sort_by=sort_by)
    answer = await _ask(books, lambda: info.ListTransactions(request))
    _assert_answered(answer, also_invalid=frozenset({"page_token"}), read_only=True)
    if answer.code == Code.INVALID_ARGUMENT:
        assert answer.failure is not None and answer.failure.reason == "INVALID_PAGE_TOKEN"


@_hostile(examples=80)
@given(data=st.data())
async def test_get_transaction_answers_any_request_safely(info, books, stage, data):
    """Any GetTransactionRequest is answered or refused naming transaction_id, and changes nothing."""
    known = st.sampled_from(stage.transaction_ids)
    text = data.draw(
        st.one_of(
            _transaction_id_texts,
            known,
            known.map(str.upper),
            known.map(lambda value: f"urn:uuid:{value}"),
            known.map(lambda value: value.replace("-", "")),
        )
    )
    request = info_pb.GetTransactionRequest(transaction_id=text)
    # Only the canonical form (8-4-4-4-12 hex digits) is a transaction id.
    valid = re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", text) is not None
    answer = await _ask(books, lambda: info.GetTransaction(request))
    _assert_answered(answer, faults=_faults(transaction_id=not valid), oversized=_oversized(request), read_only=True)
    if answer.code == Code.OK:
        assert answer.response.transaction.transaction_id == str(uuid.UUID(text))


@_hostile(examples=50)
@given(order=_order_ids)
async def test_get_order_answers_any_request_safely(info, books, stage, order):
    """Any GetOrderRequest is answered or refused naming order_id, and changes nothing."""
    request = info_pb.GetOrderRequest(order_id=order)
    answer = await _ask(books, lambda: info.GetOrder(request))
    _assert_answered(answer, faults=_faults(order_id=order <= 0), read_only=True)


# ReportService.


@_hostile(examples=100)
@given(year=_years, month=_months, currency=_currencies, time_zone=_time_zones)
async def test_revenue_report_answers_any_request_safely(reports, books, stage, year, month, currency, time_zone):
    """Any RevenueReportRequest streams a CSV or is refused naming exactly its faulty fields, and changes nothing."""
    request = report_pb.RevenueReportRequest(year=year, month=month, currency=currency, time_zone=time_zone)
    year_max = datetime.now(UTC).year + 1
    faults = _faults(
        year=not limits.REPORT_YEAR_MIN <= year <= year_max,
        month=not 1 <= month <= 12,
        currency=currency != "" and _currency_code(currency, stage.currencies) is None,
        time_zone=not _time_zone_is_valid(time_zone),
    )
    answer = await _ask(books, lambda: reports.GetRevenueReport(request), streaming=True)
    _assert_answered(answer, faults=faults, oversized=_oversized(request), read_only=True)
    if answer.code == Code.OK:
        assert b"".join(chunk.data for chunk in answer.response).startswith(b"service_id;service_name;revenue;")


@_hostile(examples=100)
@given(user=_user_ids, from_time=_timestamps, to_time=_timestamps, kinds=_kinds)
async def test_export_transactions_answers_any_request_safely(reports, books, stage, user, from_time, to_time, kinds):
    """Any ExportTransactionsRequest streams a CSV or is refused naming its faulty fields; it changes nothing."""
    request = report_pb.ExportTransactionsRequest(user_id=user, from_time=from_time, to_time=to_time, kinds=kinds)
    faults = _faults(user_id=user <= 0, kinds=not _kinds_are_valid(kinds)) | _time_faults(from_time, to_time)
    answer = await _ask(books, lambda: reports.ExportTransactions(request), streaming=True)
    _assert_answered(answer, faults=faults, read_only=True)
    if answer.code == Code.OK:
        assert b"".join(chunk.data for chunk in answer.response).startswith(b"transaction_id;created_at;kind;")


# Raw bytes, and the message size limit.


@dataclass(frozen=True)
class Method:
    path: str
    request_type: type[protobuf_message.Message]
    streaming: bool = False
    read_only: bool = False


METHODS = (
    Method("/balance.v1.TransactionService/Deposit", pb.DepositRequest),
    Method("/balance.v1.TransactionService/Withdraw", pb.WithdrawRequest),
    Method("/balance.v1.TransactionService/Transfer", pb.TransferRequest),
    Method("/balance.v1.TransactionService/Reserve", pb.ReserveRequest),
    Method("/balance.v1.TransactionService/ReleaseReserve", pb.ReleaseReserveRequest),
    Method("/balance.v1.TransactionService/RecognizeRevenue", pb.RecognizeRevenueRequest),
    Method("/balance.v1.InfoService/GetBalance", info_pb.GetBalanceRequest, read_only=True),
    Method("/balance.v1.InfoService/ListTransactions", info_pb.ListTransactionsRequest, read_only=True),
    Method("/balance.v1.InfoService/GetTransaction", info_pb.GetTransactionRequest, read_only=True),
    Method("/balance.v1.InfoService/GetOrder", info_pb.GetOrderRequest, read_only=True),
    Method("/balance.v1.ReportService/GetRevenueReport", report_pb.RevenueReportRequest, True, True),
    Method("/balance.v1.ReportService/ExportTransactions", report_pb.ExportTransactionsRequest, True, True),
)


def _raw_call(channel: aio.Channel, method: Method, raw: bytes) -> Any:
    """The method called with `raw` as its request message, untouched by any serializer."""
    if method.streaming:
        return channel.unary_stream(method.path, request_serializer=None, response_deserializer=None)(raw)
    return channel.unary_unary(method.path, request_serializer=None, response_deserializer=None)(raw)


def _parses(method: Method, raw: bytes) -> protobuf_message.Message | None:
    try:
        return method.request_type.FromString(raw)
    except protobuf_message.DecodeError:
        return None


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.path.rsplit("/", 1)[1])
@_hostile(examples=50)
@given(raw=_raw_requests)
async def test_raw_bytes_are_answered_safely(channel, books, stage, method, raw):
    """Random bytes as any method's request are refused, changing nothing, or read as the message they encode."""
    request = _parses(method, raw)
    answer = await _ask(books, lambda: _raw_call(channel, method, raw), streaming=method.streaming)
    if request is None:
        event("does not parse")
        assert answer.code == Code.INVALID_ARGUMENT, answer.failure
        assert answer.after == answer.before
        return
    keyed = bool(getattr(request, "idempotency_key", ""))
    _assert_answered(answer, faults=_ANY_FIELD, keyed=keyed, read_only=method.read_only)


def _padded(size: int) -> bytes:
    """A request message of exactly `size` bytes: one unknown length-delimited field (number 1000)
    that every request type skips, so every field is at its default."""
    tag = _varint(1000 << 3 | 2)
    for length_bytes in range(1, 6):
        payload = size - len(tag) - length_bytes
        if len(_varint(payload)) == length_bytes:
            return tag + _varint(payload) + b"\x00" * payload
    raise AssertionError(f"no padding makes {size} bytes")


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.path.rsplit("/", 1)[1])
async def test_message_of_the_maximum_size_is_read_and_one_byte_more_is_refused(channel, books, stage, method):
    """A request of MESSAGE_BYTES_MAX bytes reaches the handler; one byte more is RESOURCE_EXHAUSTED."""
    largest = _padded(limits.MESSAGE_BYTES_MAX)
    assert len(largest) == limits.MESSAGE_BYTES_MAX and not method.request_type.FromString(largest).ListFields()
    answer = await _ask(books, lambda: _raw_call(channel, method, largest), streaming=method.streaming)
    assert answer.code == Code.INVALID_ARGUMENT and answer.failure is not None
    assert answer.failure.domain == "balance.v1"
    assert answer.after == answer.before
    answer = await _ask(
        books, lambda: _raw_call(channel, method, _padded(limits.MESSAGE_BYTES_MAX + 1)), streaming=method.streaming
    )
    assert answer.code == Code.RESOURCE_EXHAUSTED and answer.failure is not None
    assert "larger than max" in answer.failure.message
    assert answer.after == answer.before


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda text: pb.DepositRequest(user_id=RICH, amount="1", source=text), "source"),
        (lambda text: pb.WithdrawRequest(user_id=RICH, amount="1", destination=text), "destination"),
        (lambda text: pb.TransferRequest(from_user_id=RICH, to_user_id=EMPTY, amount="1", comment=text), "comment"),
        (
            lambda text: pb.ReserveRequest(user_id=RICH, service_id=SERVICE, order_id=1, amount="1", service_name=text),
            "service_name",
        ),
    ],
    ids=["source", "destination", "comment", "service_name"],
)
async def test_free_text_that_fills_the_message_limit_is_refused_by_size_or_by_length(
    channel, books, stage, make, field
):
    """Text filling the message to MESSAGE_BYTES_MAX is refused naming its field; a byte more is RESOURCE_EXHAUSTED."""
    method = next(method for method in METHODS if method.request_type is type(make("")))
    overhead = make("").ByteSize() + 1 + 3  # the field's tag and a three-byte length
    text = "😀" * ((limits.MESSAGE_BYTES_MAX - overhead) // 4) + "a" * ((limits.MESSAGE_BYTES_MAX - overhead) % 4)
    for extra, expected in (("", Code.INVALID_ARGUMENT), ("a", Code.RESOURCE_EXHAUSTED)):
        request = make(text + extra)
        assert request.ByteSize() == limits.MESSAGE_BYTES_MAX + len(extra)
        answer = await _ask(books, lambda request=request: _raw_call(channel, method, request.SerializeToString()))
        assert answer.code == expected, answer.failure
        if expected == Code.INVALID_ARGUMENT:
            assert answer.failure is not None and answer.failure.fields == [field]
        assert answer.after == answer.before


# Free text, end to end.


@st.composite
def _memo_operations(draw: st.DrawFn) -> tuple[str, str]:
    return draw(st.sampled_from(("deposit", "withdraw", "transfer", "reserve"))), draw(
        st.one_of(
            _nasty_text,
            _text_near(limits.SERVICE_NAME_LENGTH_MAX),
            _text_near(limits.MEMO_LENGTH_MAX),
            st.text(max_size=600),
        )
    )


@_hostile(examples=100)
@given(operation=_memo_operations())
async def test_free_text_is_kept_byte_exact_everywhere_or_refused_naming_its_field(
    transactions, info, reports, books, stage, operation
):
    """Odd text comes back identical from the response, GetTransaction, the ledger and CSVs, or is refused by name."""
    kind, text = operation
    user, other, order = next(_fresh_ids), next(_fresh_ids), next(_fresh_ids)
    await transactions.Deposit(pb.DepositRequest(user_id=user, amount="10.00"))
    request, field, length_max, call = _memo_request(transactions, kind, text, user, other, order)
    answer = await _ask(books, call)
    if not _text_is_valid(text, length_max):
        assert (answer.code, answer.failure and answer.failure.fields) == (Code.INVALID_ARGUMENT, [field])
        assert answer.after == answer.before
        return
    assert answer.code == Code.OK, answer.failure
    transaction = answer.response.transaction
    if kind == "reserve":
        await _assert_service_name_kept(info, books, answer, request)
        await _assert_service_name_in_revenue_report(transactions, reports, request)
        return
    await _assert_text_kept(books, transaction, text=text, key="", phrase="'{}'.", without=".")
    again = await info.GetTransaction(info_pb.GetTransactionRequest(transaction_id=transaction.transaction_id))
    assert again.transaction.description == transaction.description
    statement = b"".join(
        [chunk.data async for chunk in reports.ExportTransactions(report_pb.ExportTransactionsRequest(user_id=user))]
    )
    rows = list(csv.reader(io.StringIO(statement.decode(), newline=""), delimiter=";"))
    assert [row[5] for row in rows if row[0] == transaction.transaction_id] == [transaction.description]


async def _assert_service_name_in_revenue_report(transactions, reports, request: pb.ReserveRequest) -> None:
    """Once the order is delivered, the month's revenue CSV names its service exactly as reserved."""
    revenue = await transactions.RecognizeRevenue(
        pb.RecognizeRevenueRequest(user_id=request.user_id, service_id=request.service_id, order_id=request.order_id)
    )
    month = revenue.transaction.created_at.ToDatetime(tzinfo=UTC)
    report = b"".join(
        [
            chunk.data
            async for chunk in reports.GetRevenueReport(
                report_pb.RevenueReportRequest(year=month.year, month=month.month, currency="USD")
            )
        ]
    )
    rows = list(csv.reader(io.StringIO(report.decode(), newline=""), delimiter=";"))
    assert [row[1] for row in rows if row[0] == str(request.service_id)] == [request.service_name]


def _memo_request(transactions, kind: str, text: str, user: int, other: int, order: int):
    if kind == "deposit":
        request = pb.DepositRequest(user_id=user, amount="1.00", source=text)
        return request, "source", limits.MEMO_LENGTH_MAX, lambda: transactions.Deposit(request)
    if kind == "withdraw":
        request = pb.WithdrawRequest(user_id=user, amount="1.00", destination=text)
        return request, "destination", limits.MEMO_LENGTH_MAX, lambda: transactions.Withdraw(request)
    if kind == "transfer":
        request = pb.TransferRequest(from_user_id=user, to_user_id=other, amount="1.00", comment=text)
        return request, "comment", limits.MEMO_LENGTH_MAX, lambda: transactions.Transfer(request)
    request = pb.ReserveRequest(user_id=user, service_id=other, order_id=order, amount="1.00", service_name=text)
    return request, "service_name", limits.SERVICE_NAME_LENGTH_MAX, lambda: transactions.Reserve(request)
