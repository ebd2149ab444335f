"""Rate decks from CSV, all or nothing: a tariff's sell rates or a trunk's
buy rates.

Header: prefix,destination,rate,connect_fee,min_secs,increment (rate per
minute), optionally followed by days,hours (rate periods: days 'all',
'mon-fri', 'sat,sun' ...; hours '08:00-18:00'; by default the whole
week).  A prefix may have several rows, one per period; together they must
cover the week exactly once.  Every bad row is reported with its line
number; one bad row means nothing is imported.
"""
from ..money import D, MoneyError
from .periods import PeriodError, coverage_problems, parse_days, parse_hours
from .rates import MAX_DIGITS, Rate

HEADER = ["prefix", "destination", "rate", "connect_fee", "min_secs", "increment"]
PERIOD_HEADER = ["days", "hours"]
MAX_ERRORS = 20


class RatesError(Exception):
    """The file cannot be imported; ``errors`` lists one line per problem."""

    def __init__(self, errors):
        super().__init__(errors[0])
        self.errors = errors


class PricedRow:
    """One row of a deck: a prefix's Rate for some days and hours."""
    __slots__ = ("rate", "days", "start", "end")

    def __init__(self, rate, days=127, start=0, end=1440):
        self.rate = rate
        self.days = days
        self.start = start
        self.end = end


def read_rates(path, owner):
    try:
        # utf-8-sig: a spreadsheet's byte-order mark is no part of the header.
        with open(path, newline="", encoding="utf-8-sig") as f:
            return parse_rates(f, owner, path)
    except OSError as e:
        raise RatesError([f"{path}: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise RatesError([f"{path}: not UTF-8 text"]) from None


def parse_rates(lines, owner, name="rates"):
    """[PricedRow] of a whole deck, or RatesError listing every problem."""
    import csv  # only the admin tool reads rate files
    reader = csv.reader(lines)
    header = [h.strip().lower() for h in next(reader, None) or []]
    if header not in (HEADER, HEADER + PERIOD_HEADER):
        raise RatesError([f"{name}:1: header must be {','.join(HEADER)}"
                          f" (optionally followed by ,{','.join(PERIOD_HEADER)})"])
    rows, errors, lines_of = [], [], {}
    for row in reader:
        where = f"{name}:{reader.line_num}"
        if not row or row == [""]:
            continue
        try:
            priced = parse_row(row, len(header))
        except (ValueError, MoneyError) as e:
            errors.append(f"{where}: {e}")
        else:
            priced.rate.tariff = owner
            rows.append(priced)
            seen = lines_of.setdefault(priced.rate.prefix, [])
            if seen and len(header) == len(HEADER):  # no periods: one row per prefix
                errors.append(f"{where}: prefix {priced.rate.prefix} repeats line {seen[0][1]}")
            seen.append((priced, reader.line_num))
        if len(errors) >= MAX_ERRORS:
            errors.append(f"{name}: stopped after {MAX_ERRORS} errors")
            break
    if not errors:
        errors = week_errors(lines_of, name)
    if errors:
        raise RatesError(errors)
    if not rows:
        raise RatesError([f"{name}: no rates"])
    return rows


def parse_row(row, width):
    if len(row) != width:
        raise ValueError(f"expected {width} fields, found {len(row)}")
    prefix, destination, per_min, fee, min_secs, increment = (f.strip() for f in row[:6])
    checked_prefix(prefix)
    # As ``rate list --csv`` wrote it: a quote before what a spreadsheet
    # would take for a formula.
    destination = unquote_cell(destination)
    if not destination or len(destination) > 80:
        raise ValueError("destination must be 1 to 80 characters")
    rate = Rate(None, prefix, destination, _amount("rate", per_min), _amount("connect_fee", fee),
                _whole("min_secs", min_secs, 0), _whole("increment", increment, 1))
    if width == len(HEADER):
        return PricedRow(rate)
    try:
        return PricedRow(rate, parse_days(row[6]), *parse_hours(row[7]))
    except PeriodError as e:
        raise ValueError(str(e)) from None


def checked_prefix(prefix):
    if not (prefix.isascii() and prefix.isdigit() and len(prefix) <= MAX_DIGITS):
        raise ValueError(f"prefix must be 1 to {MAX_DIGITS} digits: {prefix!r}")
    return prefix


def week_errors(lines_of, name):
    """Each prefix's periods must cover the week exactly once."""
    errors = []
    for prefix, rows in lines_of.items():
        if len(rows) == 1 and (rows[0][0].days, rows[0][0].start, rows[0][0].end) == (127, 0, 1440):
            continue
        problems = coverage_problems([(r.days, r.start, r.end, f"line {line}") for r, line in rows])
        errors.extend(f"{name}: prefix {prefix}: {p}" for p in problems[:3])
        if len(errors) >= MAX_ERRORS:
            break
    return errors


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


# -- cells of the CSV that AstBill writes, safe to open in a spreadsheet -----------
#
# A cell that starts with = + - @, a tab or a carriage return is a formula to
# Excel, LibreOffice and Google Sheets: a caller ID of ``=1+1`` would be
# computed, and worse ones run.  As OWASP advises (CSV injection), such a
# cell is written with a single quote before it, which spreadsheets take as
# "this is text".  That is done to every cell that comes from data (caller
# IDs, numbers, channels, account and tariff names, destinations); the
# numbers AstBill itself writes -- amounts and seconds -- are left as they
# are, even a negative one (a call's margin, when a trunk charged more than
# the caller paid): a spreadsheet reads ``-0.0100`` as the number it is,
# never as a formula.
#
# A cell that starts with a quote itself is quoted too, so that unquote_cell
# undoes exactly what quote_cell did: the rates ``rate list --csv`` prints
# import back unchanged.

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def quote_cell(value):
    """``value`` as a cell a spreadsheet shows as text (spaces or a newline
    before a formula, which an import may trim, count as none)."""
    if isinstance(value, str) and value.lstrip(" \n").startswith(FORMULA_STARTS):
        return "'" + value
    return value


def unquote_cell(text):
    """A cell read back: without the quote that ``quote_cell`` put before it."""
    if text.startswith("'") and text[1:].lstrip(" \n").startswith(FORMULA_STARTS):
        return text[1:]
    return text
