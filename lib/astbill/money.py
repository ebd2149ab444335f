"""Money: the one way to make an amount, and the one place it is rounded.

Amounts are ``decimal.Decimal`` end to end.  ``D()`` accepts only exact
inputs (str, int, Decimal); a float or a missing value is an error, never
zero: a missing price must not become a free call.
"""
from decimal import ROUND_CEILING, Decimal

# Every stored amount has at most this many decimals: DECIMAL(19,6) in
# MySQL, integer millionths in SQLite.
STORAGE_PLACES = 6
_STORAGE_QUANTUM = Decimal(1).scaleb(-STORAGE_PLACES)
_MAX_ABS = Decimal(10) ** 12


class MoneyError(ValueError):
    """An amount that cannot be taken as exact money."""


def D(value):
    """Make an exact Decimal amount from str, int or Decimal.

    Text must be a plain decimal (optional sign, digits, optional point
    and digits; spaces around it are ignored).  Refuses None, '', float,
    NaN, infinities, exponents, more than six decimals and absurd
    magnitudes, each with a one-line reason.
    """
    if isinstance(value, bool) or value is None or isinstance(value, float):
        raise MoneyError(f"not an exact amount: {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise MoneyError("empty amount")
        if not plain(text):
            raise MoneyError(f"not a plain decimal number: {text!r}")
        value = Decimal(text)
    elif isinstance(value, int):
        value = Decimal(value)
    elif not isinstance(value, Decimal):
        raise MoneyError(f"not an exact amount: {value!r}")
    if not value.is_finite():
        raise MoneyError(f"not a finite amount: {value}")
    if abs(value) >= _MAX_ABS:
        raise MoneyError(f"amount out of range: {value:f}")
    if value != value.quantize(_STORAGE_QUANTUM, rounding=ROUND_CEILING):
        raise MoneyError(f"more than {STORAGE_PLACES} decimals: {value:f}")
    return value


def plain(text):
    """Is ``text`` what an operator means by an amount: an optional sign,
    digits, and optionally a point and more digits?  Decimal() itself would
    also take '1e3', 'Infinity', '1_000' and non-ASCII digits.  (No regular
    expression: importing ``re`` would double a call's start-up.)"""
    whole, point, fraction = (text[1:] if text[:1] in ("+", "-") else text).partition(".")
    return (whole.isascii() and whole.isdigit()
            and (not point or (fraction.isascii() and fraction.isdigit())))


def round_up(amount, places):
    """Round a computed charge up to ``places`` decimals.

    The only rounding on the money path, and always in the house's favour
    by less than one unit of the last place, so a charge is never rounded
    away to nothing.
    """
    return amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_CEILING)


def to_millionths(amount):
    """Exact integer millionths of an amount (SQLite's storage form)."""
    units = amount.scaleb(STORAGE_PLACES)
    if units != units.to_integral_value():
        raise MoneyError(f"more than {STORAGE_PLACES} decimals: {amount:f}")
    return int(units)


def from_millionths(units):
    return Decimal(units).scaleb(-STORAGE_PLACES)


def fmt(amount, places=4):
    """Fixed-point text with ``places`` decimals, or more if the amount has
    them: display never hides a digit."""
    shown = amount.quantize(Decimal(1).scaleb(-places))
    return f"{shown if shown == amount else amount.normalize():f}"
