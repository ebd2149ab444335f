"""Reading a tariff's rates from CSV, all or nothing.

Header: prefix,destination,rate,connect_fee,min_secs,increment (rate per
minute).  Every bad row is reported with its line number; one bad row
means nothing is imported.
"""
import csv

from .money import D, MoneyError
from .rating import MAX_DIGITS, Rate

HEADER = ["prefix", "destination", "rate", "connect_fee", "min_secs", "increment"]
MAX_ERRORS = 20


class RatesError(Exception):
    """The file cannot be imported; ``errors`` lists one line per problem."""

    def __init__(self, errors):
        super().__init__(errors[0])
        self.errors = errors


def read_rates(path, tariff):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return parse_rates(f, tariff, path)
    except OSError as e:
        raise RatesError([f"{path}: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise RatesError([f"{path}: not UTF-8 text"]) from None


def parse_rates(lines, tariff, name="rates"):
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != HEADER:
        raise RatesError([f"{name}:1: header must be {','.join(HEADER)}"])
    rates, errors, seen = [], [], {}
    for row in reader:
        where = f"{name}:{reader.line_num}"
        if not row or row == [""]:
            continue
        try:
            rate = parse_row(row)
        except (ValueError, MoneyError) as e:
            errors.append(f"{where}: {e}")
        else:
            if rate.prefix in seen:
                errors.append(f"{where}: prefix {rate.prefix} repeats line {seen[rate.prefix]}")
            else:
                seen[rate.prefix] = reader.line_num
                rate.tariff = tariff
                rates.append(rate)
        if len(errors) >= MAX_ERRORS:
            errors.append(f"{name}: stopped after {MAX_ERRORS} errors")
            break
    if errors:
        raise RatesError(errors)
    if not rates:
        raise RatesError([f"{name}: no rates"])
    return rates


def parse_row(row):
    if len(row) != len(HEADER):
        raise ValueError(f"expected {len(HEADER)} fields, found {len(row)}")
    prefix, destination, per_min, fee, min_secs, increment = (f.strip() for f in row)
    if not (prefix.isascii() and prefix.isdigit() and len(prefix) <= MAX_DIGITS):
        raise ValueError(f"prefix must be 1 to {MAX_DIGITS} digits: {prefix!r}")
    if not destination or len(destination) > 80:
        raise ValueError("destination must be 1 to 80 characters")
    per_min, fee = _amount("rate", per_min), _amount("connect_fee", fee)
    return Rate(None, prefix, destination, per_min, fee,
                _whole("min_secs", min_secs, 0), _whole("increment", increment, 1))


def _amount(field, text):
    try:
        value = D(text)
    except MoneyError as e:
        raise ValueError(f"{field}: {e}") from None
    if value < 0:
        raise ValueError(f"{field} must not be negative: {text}")
    return value


def _whole(field, text, least):
    if not text.isascii() or not text.isdigit() or int(text) < least or int(text) > 86400:
        raise ValueError(f"{field} must be a whole number from {least} to 86400: {text!r}")
    return int(text)
