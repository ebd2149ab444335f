"""Cells of the CSV that AstBill writes, safe to open in a spreadsheet.

A cell that starts with = + - @, a tab or a carriage return is a formula to
Excel, LibreOffice and Google Sheets: a caller ID of ``=1+1`` would be
computed, and worse ones run.  As OWASP advises (CSV injection), such a
cell is written with a single quote before it, which spreadsheets take as
"this is text".  That is done to every cell that comes from data (caller
IDs, numbers, channels, account and tariff names, destinations); the
numbers AstBill itself writes -- amounts and seconds -- are left as they
are, even a negative one (a call's margin, when a trunk charged more than
the caller paid): a spreadsheet reads ``-0.0100`` as the number it is,
never as a formula.

A cell that starts with a quote itself is quoted too, so that ``unquote``
undoes exactly what ``quote`` did: the rates ``rate list --csv`` prints
import back unchanged.
"""
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def quote(value):
    """``value`` as a cell a spreadsheet shows as text."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def unquote(text):
    """A cell read back: without the quote that ``quote`` put before it."""
    if text.startswith("'") and text[1:].startswith(FORMULA_STARTS):
        return text[1:]
    return text
