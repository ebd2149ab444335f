"""Rating: what a call to a destination costs, and how long money lasts.

A rate bills ``min_secs`` for any answered call up to that length, then
whole ``increment`` blocks (60/60, 30/6, 1/1 ...).  The cost of an answered
call is ``connect_fee + rate_per_min * billed_secs / 60``, rounded up once.
"""
from ..money import D, MoneyError, round_up

MAX_DIGITS = 32


class Rate:
    __slots__ = ("tariff", "prefix", "destination", "per_min", "connect_fee",
                 "min_secs", "increment")

    def __init__(self, tariff, prefix, destination, per_min, connect_fee,
                 min_secs, increment):
        if per_min < 0 or connect_fee < 0:
            raise MoneyError("negative rate or connect fee")
        if min_secs < 0 or increment < 1:
            raise ValueError("min_secs must be >= 0 and increment >= 1")
        self.tariff = tariff
        self.prefix = prefix
        self.destination = destination
        self.per_min = per_min
        self.connect_fee = connect_fee
        self.min_secs = min_secs
        self.increment = increment

    def billed_secs(self, billsec):
        """Seconds charged for an answered call with ``billsec`` seconds of
        talk: the minimum for any call up to it, even one under a second."""
        if billsec <= self.min_secs:
            return self.min_secs
        blocks = -(-(billsec - self.min_secs) // self.increment)
        return self.min_secs + blocks * self.increment

    def cost(self, billsec, answered, places):
        """What a call costs; unanswered calls cost nothing, not even the fee."""
        if not answered:
            return D(0)
        raw = self.connect_fee + self.per_min * self.billed_secs(billsec) / 60
        return round_up(raw, places)

    def max_secs(self, available, cap, places):
        """The longest talk time whose cost fits in ``available``, at most ``cap``.

        Returns 0 when not even the connect fee and the first block fit.
        Billed time only grows in whole blocks, so the answer is the end of
        the last block that is fully paid for.
        """
        if self.cost(1, True, places) > available:
            return 0
        if self.per_min == 0:
            return cap
        first = self.billed_secs(1)
        inc = self.increment
        # Estimate the block count, then settle it against the real cost
        # function, so rounding can never grant a second that is not paid for.
        est = ((available - self.connect_fee) * 60 / self.per_min - first) // inc
        blocks = max(int(est), 0)
        while blocks > 0 and self.cost(first + blocks * inc, True, places) > available:
            blocks -= 1
        while (first + blocks * inc < cap
               and self.cost(first + (blocks + 1) * inc, True, places) <= available):
            blocks += 1
        return min(first + blocks * inc, cap)


def normalize_destination(raw, international_prefix="00", national_prefix="",
                          country_code=""):
    """Digits of the dialled number in international form, or None if invalid.

    ``+4930...`` and ``004930...`` become ``4930...``; with a national
    prefix and country code, ``030...`` becomes ``4930...``.
    """
    number = raw.strip()
    if number.startswith("+"):
        number = number[1:]
    elif international_prefix and number.startswith(international_prefix):
        number = number[len(international_prefix):]
    elif national_prefix and country_code and number.startswith(national_prefix):
        number = country_code + number[len(national_prefix):]
    if not number or len(number) > MAX_DIGITS or not number.isascii() or not number.isdigit():
        return None
    return number


def prefixes_of(number):
    """Every prefix of ``number``, longest first: the candidates for a rate."""
    return [number[:n] for n in range(len(number), 0, -1)]
