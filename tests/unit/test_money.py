"""Decimal strings <-> minor units: every limit at its edge, every currency precision, every refusal."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balance_server import limits
from balance_server.errors import InvalidArgument
from balance_server.money import Currencies, format_minor_units, parse_decimal, to_minor_units

CURRENCIES = Currencies({"JPY": 0, "USD": 2, "KWD": 3, "CLF": 4}, "USD")


def _refusal(text: str, currency: str = "USD", *, field: str = "amount") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as refused:
        to_minor_units(text, currency, CURRENCIES, field=field)
    return refused.value


@pytest.mark.parametrize(
    ("text", "currency", "minor_units"),
    [
        ("500", "JPY", 500),
        ("1", "USD", 100),
        ("199.99", "USD", 19999),
        ("0.01", "USD", 1),
        ("1.234", "KWD", 1234),
        ("0.001", "KWD", 1),
        ("1.2345", "CLF", 12345),
        ("0.0001", "CLF", 1),
    ],
)
def test_each_currency_precision_is_read_exactly(text, currency, minor_units):
    """An amount with up to its currency's minor digits becomes the exact integer of minor units."""
    assert to_minor_units(text, currency, CURRENCIES) == minor_units


@pytest.mark.parametrize(
    ("text", "currency"),
    [("1.5", "JPY"), ("0.001", "USD"), ("1.0001", "KWD"), ("1.00001", "CLF")],
)
def test_more_digits_than_the_currency_has_are_refused(text, currency):
    """One decimal place beyond the currency's minor digits is INVALID_AMOUNT, never rounded."""
    refusal = _refusal(text, currency)
    assert (refusal.reason, [violation.field for violation in refusal.violations]) == ("INVALID_AMOUNT", ["amount"])


@pytest.mark.parametrize(
    ("text", "currency", "minor_units"),
    [
        ("1.500", "USD", 150),
        ("7.0", "JPY", 7),
        ("7.000000", "JPY", 7),
        ("0.0100", "KWD", 10),
        ("2.50000", "CLF", 25000),
    ],
)
def test_trailing_zeros_beyond_the_precision_are_accepted(text, currency, minor_units):
    """Zeros after the last minor digit add no precision, so they are accepted ("1.500" USD is 150)."""
    assert to_minor_units(text, currency, CURRENCIES) == minor_units


@pytest.mark.parametrize("currency", ["JPY", "USD", "KWD", "CLF"])
def test_the_maximum_amount_is_accepted_and_one_minor_unit_more_refused(currency):
    """AMOUNT_MINOR_UNITS_MAX is accepted in every precision; one minor unit above it is INVALID_AMOUNT."""
    digits = CURRENCIES.minor_digits[currency]
    maximum = format_minor_units(limits.AMOUNT_MINOR_UNITS_MAX, digits)
    above = format_minor_units(limits.AMOUNT_MINOR_UNITS_MAX + 1, digits)
    assert to_minor_units(maximum, currency, CURRENCIES) == limits.AMOUNT_MINOR_UNITS_MAX
    assert _refusal(above, currency).reason == "INVALID_AMOUNT"


def test_amount_text_at_the_length_limit_is_accepted_and_one_character_more_refused():
    """Text of AMOUNT_TEXT_LENGTH_MAX characters is parsed; one character more is refused before parsing."""
    longest = "0" * (limits.AMOUNT_TEXT_LENGTH_MAX - 1) + "1"
    padded = "1." + "0" * (limits.AMOUNT_TEXT_LENGTH_MAX - 2)
    assert len(longest) == len(padded) == limits.AMOUNT_TEXT_LENGTH_MAX
    assert to_minor_units(longest, "USD", CURRENCIES) == 100
    assert to_minor_units(padded, "USD", CURRENCIES) == 100
    assert parse_decimal(longest) == Decimal(1)
    for too_long in ("0" + longest, padded + "0"):
        assert "longer than" in _refusal(too_long).violations[0].description
        with pytest.raises(InvalidArgument):
            parse_decimal(too_long)


REFUSED_TEXTS = [
    "",
    ".",
    "0",
    "0.00",
    "000",
    "-5",
    "+5",
    "-0",
    "1e5",
    "1E5",
    "1e-2",
    "NaN",
    "nan",
    "sNaN",
    "Infinity",
    "inf",
    "0x10",
    " 5",
    "5 ",
    "5\n",
    "\t5",
    "5.",
    ".5",
    "1,5",
    "1_000",
    "1.2.3",
    "١٢",  # Arabic-Indic digits
    "１２",  # fullwidth digits
    "²",  # a superscript digit
    "५",  # Devanagari five
]


@pytest.mark.parametrize("text", REFUSED_TEXTS)
def test_non_plain_or_non_positive_amounts_are_refused(text):
    """Signs, exponents, whitespace, NaN, other scripts' digits, empty text and zero are INVALID_AMOUNT."""
    refusal = _refusal(text)
    assert (refusal.reason, [violation.field for violation in refusal.violations]) == ("INVALID_AMOUNT", ["amount"])


@pytest.mark.parametrize("text", REFUSED_TEXTS)
def test_parse_decimal_refuses_what_to_minor_units_refuses(text):
    """parse_decimal (used before the currency is known) refuses the same non-plain texts."""
    with pytest.raises(InvalidArgument) as refused:
        parse_decimal(text)
    assert refused.value.reason == "INVALID_AMOUNT"


@pytest.mark.parametrize("text", ["199.99", "0.0001", "1.23456789", "007.50"])
def test_parse_decimal_keeps_the_exact_value(text):
    """parse_decimal returns the exact Decimal of a plain positive decimal, whatever its precision."""
    assert parse_decimal(text) == Decimal(text)


def test_refusals_name_the_field_they_were_asked_for():
    """The field name passed in is the one the violation names (e.g. a request's "price")."""
    assert _refusal("x", field="price").violations[0].field == "price"
    with pytest.raises(InvalidArgument) as refused:
        parse_decimal("x", field="price")
    assert refused.value.violations[0].field == "price"


@pytest.mark.parametrize(
    ("minor_units", "digits", "text"),
    [
        (19999, 2, "199.99"),
        (500, 0, "500"),
        (5, 2, "0.05"),
        (0, 2, "0.00"),
        (1, 3, "0.001"),
        (1, 4, "0.0001"),
        (10**15, 4, "100000000000.0000"),
        (-150, 2, "-1.50"),
        (-5, 2, "-0.05"),
        (-7, 0, "-7"),
    ],
)
def test_format_minor_units_writes_every_minor_digit(minor_units, digits, text):
    """Formatting writes exactly the currency's minor digits, with a sign only for negative amounts."""
    assert format_minor_units(minor_units, digits) == text


@pytest.mark.parametrize(("text", "code"), [("usd", "USD"), ("Usd", "USD"), ("USD", "USD"), ("jPy", "JPY")])
def test_currency_codes_are_case_insensitive(text, code):
    """A known code in any case is read as its upper-case code."""
    assert CURRENCIES.parse(text) == code


def test_empty_currency_is_the_default():
    """An empty currency means the default currency."""
    assert CURRENCIES.parse("") == "USD"


@pytest.mark.parametrize(
    "text", ["XXX", "EUR", "US", "USDD", " USD", "USD ", "U$D", "usd1", "ＵＳＤ", "€€€", "ǅ", "US\n"]
)
def test_unknown_or_malformed_currencies_are_refused(text):
    """Codes that are not three ASCII letters of a known currency are UNKNOWN_CURRENCY naming the field."""
    with pytest.raises(InvalidArgument) as refused:
        CURRENCIES.parse(text, field="price_currency")
    assert refused.value.reason == "UNKNOWN_CURRENCY"
    assert [violation.field for violation in refused.value.violations] == ["price_currency"]


def test_a_default_currency_that_is_not_known_is_refused():
    """Currencies cannot be built with a default the ledger does not know."""
    with pytest.raises(ValueError):
        Currencies({"USD": 2}, "EUR")


@st.composite
def _valid_amounts(draw: st.DrawFn) -> tuple[str, int, int]:
    """A currency precision, an amount in range, and its canonical text."""
    digits = draw(st.sampled_from([0, 2, 3, 4]))
    minor_units = draw(st.integers(min_value=1, max_value=limits.AMOUNT_MINOR_UNITS_MAX))
    return format_minor_units(minor_units, digits), minor_units, digits


_BY_DIGITS = {0: "JPY", 2: "USD", 3: "KWD", 4: "CLF"}


@given(_valid_amounts(), st.integers(min_value=0, max_value=6))
def test_format_and_parse_round_trip(amount, extra_zeros):
    """For every valid amount of every precision, parsing its text (with any trailing zeros) and
    formatting the result gives back the same minor units and the canonical text."""
    text, minor_units, digits = amount
    currency = _BY_DIGITS[digits]
    written = text + ("." if digits == 0 and extra_zeros else "") + "0" * extra_zeros
    parsed = to_minor_units(written, currency, CURRENCIES)
    assert parsed == minor_units
    assert format_minor_units(parsed, digits) == text
