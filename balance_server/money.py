"""Decimal strings on the wire <-> integers of minor units in the ledger. The only place that knows
how an amount is written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from balance_server import limits
from balance_server.errors import FieldViolation, InvalidArgument

# ASCII digits only: `\d` would accept other scripts' digits, which are not amounts.
_AMOUNT_PATTERN = re.compile(r"(?P<whole>[0-9]+)(?:\.(?P<fraction>[0-9]+))?")
_CURRENCY_PATTERN = re.compile(r"[A-Za-z]{3}")


@dataclass(frozen=True)
class Currencies:
    """The ISO 4217 currencies the ledger knows, with their number of minor digits."""

    minor_digits: Mapping[str, int]
    default: str

    def __post_init__(self) -> None:
        if self.default not in self.minor_digits:
            raise ValueError(f"the default currency {self.default!r} is not an ISO 4217 code the ledger knows")

    def parse(self, text: str, *, field: str = "currency") -> str:
        """The upper-case code of `text`; empty means the default currency."""
        if text == "":
            return self.default
        code = text.upper()
        if not _CURRENCY_PATTERN.fullmatch(text) or code not in self.minor_digits:
            raise InvalidArgument(
                [FieldViolation(field, f"unknown currency {text[:8]!r}: use an ISO 4217 code such as USD")],
                reason="UNKNOWN_CURRENCY",
            )
        return code

    def format(self, minor_units: int, currency: str) -> str:
        return format_minor_units(minor_units, self.minor_digits[currency])


def parse_decimal(text: str, *, field: str = "amount") -> Decimal:
    """A positive plain decimal such as "199.99", for amounts whose currency is not known yet."""
    _split(text, field)
    return Decimal(text)


def to_minor_units(text: str, currency: str, currencies: Currencies, *, field: str = "amount") -> int:
    """The amount `text` in minor units of `currency`; never rounds."""
    whole, fraction = _split(text, field)
    digits = currencies.minor_digits[currency]
    significant = fraction.rstrip("0")
    if len(significant) > digits:
        raise _amount_error(field, f"has more than {digits} decimal places, the most {currency} allows")
    minor_units = int(whole + significant.ljust(digits, "0"))
    if minor_units > limits.AMOUNT_MINOR_UNITS_MAX:
        maximum = format_minor_units(limits.AMOUNT_MINOR_UNITS_MAX, digits)
        raise _amount_error(field, f"is above the maximum of {maximum} {currency}")
    return minor_units


def format_minor_units(minor_units: int, digits: int) -> str:
    """ "199.99" for 19999 with two digits; "500" for 500 with none."""
    sign = "-" if minor_units < 0 else ""
    whole, fraction = divmod(abs(minor_units), 10**digits)
    if digits == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{digits}d}"


def _split(text: str, field: str) -> tuple[str, str]:
    """The whole and fractional digits of a positive plain decimal."""
    if len(text) > limits.AMOUNT_TEXT_LENGTH_MAX:
        raise _amount_error(field, f"is longer than {limits.AMOUNT_TEXT_LENGTH_MAX} characters")
    match = _AMOUNT_PATTERN.fullmatch(text)
    if match is None:
        raise _amount_error(field, 'must be a plain decimal such as "199.99"')
    whole, fraction = match.group("whole"), match.group("fraction") or ""
    if whole.strip("0") == "" and fraction.strip("0") == "":
        raise _amount_error(field, "must be greater than zero")
    return whole, fraction


def _amount_error(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, f"amount {problem}")], reason="INVALID_AMOUNT")
