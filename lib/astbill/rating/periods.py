"""Rate periods: a prefix priced by time of day and day of week.

A prefix's rates form a Week: rows, each for some days and one span of
hours, that together cover every minute of the week exactly once, in the
configured timezone.  A Plan prices calls with it:

* the connect fee and the minimum at the rate in force when the call is
  answered, which also sets the block structure (minimum and increment);
* each later increment at the rate in force when that increment starts.

The grant is exact under the one guarantee that matters: whenever, within
the ring window, the call is answered, its cost never exceeds what was
reserved.  A prefix with one row for the whole week is priced by its Rate
directly, as before periods existed.
"""
from bisect import bisect_right
from decimal import ROUND_FLOOR, Decimal

from ..money import D, round_up

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEK_SECS = 7 * 86400
# 1970-01-01, the epoch's day, was a Thursday.
EPOCH_WEEKDAY = 3
MICRO = 10 ** 6


class PeriodError(ValueError):
    """Days or hours that cannot be read; the message says why."""


def parse_days(text):
    """'all', 'mon-fri', 'sat,sun', 'mon,wed-fri' -> a bitmask (Monday = 1)."""
    text = text.strip().lower() or "all"
    if text == "all":
        return 127
    mask = 0
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            a, b = DAYS.index(first.strip()), DAYS.index((last or first).strip())
        except ValueError:
            raise PeriodError(f"days must be all or names like mon-fri or sat,sun: {text!r}") from None
        if b < a:
            raise PeriodError(f"days run forwards within a week (sat,sun not sat-sun... or"
                              f" mon-fri): {text!r}")
        for day in range(a, b + 1):
            mask |= 1 << day
    return mask


def format_days(mask):
    if mask == 127:
        return "all"
    names, day = [], 0
    while day < 7:
        if mask >> day & 1:
            end = day
            while end + 1 < 7 and mask >> (end + 1) & 1:
                end += 1
            names.append(DAYS[day] if end == day else f"{DAYS[day]}-{DAYS[end]}")
            day = end + 1
        else:
            day += 1
    return ",".join(names)


def parse_hours(text):
    """'08:00-18:00' -> (480, 1080) minutes; '' is the whole day."""
    text = text.strip() or "00:00-24:00"
    start, sep, end = text.partition("-")
    if not sep:
        raise PeriodError(f"hours must look like 08:00-18:00: {text!r}")
    a, b = _minute(start, text), _minute(end, text)
    if a >= b:
        raise PeriodError(f"hours must not be empty or wrap midnight (split 18:00-08:00 into"
                          f" 18:00-24:00 and 00:00-08:00): {text!r}")
    return a, b


def _minute(hhmm, text):
    hours, sep, minutes = hhmm.strip().partition(":")
    if not (sep and hours.isdigit() and minutes.isdigit() and len(minutes) == 2
            and len(hours) <= 2):
        raise PeriodError(f"hours must look like 08:00-18:00: {text!r}")
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > 1440:
        raise PeriodError(f"hours must lie within 00:00-24:00: {text!r}")
    return value


def format_hours(start, end):
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def week_spans(days, start, end):
    """The [from, to) minutes of the week a row covers."""
    return [(day * 1440 + start, day * 1440 + end) for day in range(7) if days >> day & 1]


def coverage_problems(rows):
    """Where rows [(days, start, end, label)] leave the week uncovered or
    cover it twice: one text per problem, empty when they tile the week."""
    spans = sorted((a, b, label) for days, start, end, label in rows
                   for a, b in week_spans(days, start, end))
    problems, at = [], 0
    previous = None
    for a, b, label in spans:
        if a > at:
            problems.append(f"{_when(at, a)} is not covered")
        elif a < at:
            problems.append(f"{_when(a, min(at, b))} is covered twice ({previous} and {label})")
        if b > at:
            at, previous = b, label
    if at < 7 * 1440:
        problems.append(f"{_when(at, 7 * 1440)} is not covered")
    return problems


def _when(a, b):
    """'sat 00:00-24:00' or 'fri 18:00-mon 08:00' for week minutes [a, b)."""
    def point(m, is_end):
        day, minute = divmod(m, 1440)
        if is_end and minute == 0 and day > 0:
            day, minute = day - 1, 1440
        return DAYS[day % 7], format_hours(minute, minute)[:5]
    (d1, t1), (d2, t2) = point(a, False), point(b, True)
    return f"{d1} {t1}-{t2}" if d1 == d2 else f"{d1} {t1}-{d2} {t2}"


class Clock:
    """Local time in the configured timezone, as seconds into the week."""

    def __init__(self, timezone="UTC"):
        self.zone = None
        if timezone != "UTC":
            from zoneinfo import ZoneInfo
            self.zone = ZoneInfo(timezone)

    def offset(self, epoch):
        if self.zone is None:
            return 0
        from datetime import datetime
        return int(datetime.fromtimestamp(epoch, self.zone).utcoffset().total_seconds())

    def week_secs(self, epoch):
        """Seconds since Monday 00:00, local time."""
        return (int(epoch) + self.offset(epoch) + EPOCH_WEEKDAY * 86400) % WEEK_SECS


class Plan:
    """One prefix's rates for the whole week: [(days, start_min, end_min, Rate)]."""

    def __init__(self, rows, clock):
        self.rows = rows
        self.clock = clock
        self.flat = rows[0][3] if len(rows) == 1 and rows[0][0] == 127 and (
            rows[0][1], rows[0][2]) == (0, 1440) else None
        # The week's spans tile it (checked at import): their starts, sorted,
        # find the span of any second by bisection.
        spans = sorted((a * 60, rate) for days, start, end, rate in rows
                       for a, _ in week_spans(days, start, end))
        self.starts = [a for a, _ in spans]
        self.span_rates = [rate for _, rate in spans]

    def rate_at(self, epoch):
        if self.flat is not None:
            return self.flat
        return self.span_rates[bisect_right(self.starts, self.clock.week_secs(epoch)) - 1]

    def next_change(self, epoch):
        """The first instant after ``epoch`` at which the rate may change."""
        at = self.clock.week_secs(epoch)
        following = bisect_right(self.starts, at)
        ahead = (self.starts[following] - at if following < len(self.starts)
                 else WEEK_SECS - at + self.starts[0])
        candidate = epoch + ahead
        if self.clock.offset(candidate) != self.clock.offset(epoch):
            # A daylight-saving change in between: find it to the second.
            lo, hi = epoch, candidate
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.clock.offset(mid) == self.clock.offset(epoch):
                    lo = mid
                else:
                    hi = mid
            return min(hi, candidate)
        return candidate

    # -- pricing -----------------------------------------------------------------

    def cost(self, answered_at, billsec, answered, places):
        """What a call answered at ``answered_at`` costs for ``billsec`` seconds."""
        if self.flat is not None:
            return self.flat.cost(billsec, answered, places)
        if not answered:
            return D(0)
        return _amount(self._micro_cost(int(answered_at), billsec), places)

    def exact_cost(self, answered_at, billsec):
        """The cost of an answered call before it is rounded, as an integer
        count of 1/60 millionths (``cost`` rounds it up)."""
        return self._micro_cost(int(answered_at), billsec)

    def changes(self, after, until):
        """The instants in (after, until] at which the rate may change."""
        if self.flat is not None:
            return []
        found, at = [], self.next_change(after)
        while at <= until:
            found.append(at)
            at = self.next_change(at)
        return found

    def _micro_cost(self, answered_at, billsec):
        """60 x millionths x the exact cost (an integer: no rounding inside)."""
        first = self.rate_at(answered_at)
        billed = first.billed_secs(billsec)
        total = _micro(first.connect_fee) * 60 + _micro(first.per_min) * first.min_secs
        at, left, inc = answered_at + first.min_secs, billed - first.min_secs, first.increment
        while left > 0:
            rate, change = self.rate_at(at), self.next_change(at)
            blocks = min(left // inc, -(-(change - at) // inc))
            total += _micro(rate.per_min) * inc * blocks
            at, left = at + blocks * inc, left - blocks * inc
        return total

    def grant(self, now, window, available, cap, places):
        """(max_secs, max_cost): the longest talk time whose cost stays
        within ``available`` for any answer in [now, now + window], and the
        most that time can cost -- what to reserve.  (0, None) if none.

        The cost only grows with the talk time, so the longest time covered
        whatever the answer is the shortest of the times covered at each
        moment where the price can change (``moments``); each is found by
        walking that moment's blocks against the budget."""
        if self.flat is not None:
            secs = self.flat.max_secs(available, cap, places)
            return secs, self.flat.cost(secs, True, places) if secs else None
        # A charge is rounded up to ``places``: it fits while its exact
        # value fits in the available amount rounded down to them.
        budget = int((available.quantize(Decimal(1).scaleb(-places), rounding=ROUND_FLOOR))
                     * 60 * MICRO)
        moments = self._moments(int(now), window, cap)
        secs = min(self._longest(t, budget, cap) for t in moments)
        if secs <= 0:
            return 0, None
        return secs, _amount(max(self._micro_cost(t, secs) for t in moments), places)

    def _longest(self, answered_at, budget, cap):
        """The longest talk time, at most ``cap``, answered at ``answered_at``
        whose exact cost (``_micro_cost`` units) is within ``budget``."""
        first = self.rate_at(answered_at)
        inc = first.increment
        total = _micro(first.connect_fee) * 60 + _micro(first.per_min) * first.min_secs
        secs = first.min_secs
        if first.min_secs == 0:  # the first block is the minimum
            total += _micro(first.per_min) * inc
            secs = inc
        if total > budget:
            return 0
        at = answered_at + secs
        while secs < cap:
            price = _micro(self.rate_at(at).per_min) * inc
            in_period = -(-(self.next_change(at) - at) // inc)
            blocks = in_period if price == 0 else min(in_period, (budget - total) // price)
            blocks = min(blocks, -(-(cap - secs) // inc))
            total, secs, at = total + price * blocks, secs + blocks * inc, at + blocks * inc
            if blocks < in_period:
                break
        return min(secs, cap)

    def answer_moments(self, now, window, secs):
        """Answers in [now, now + window], including ``now``, such that up
        to ``secs`` of talk costs the same answered at any of them as at the
        latest one before: all a search over answer times has to try.  A
        flat week prices every answer alike."""
        if self.flat is not None:
            return {int(now)}
        return self._moments(int(now), window, secs)

    def _moments(self, now, window, secs):
        """The answer moments in [now, now + window] at which the cost of up
        to ``secs`` of talk can change: ``now``, each change of rate in the
        window, and each answer that puts a block's start on a change."""
        moments = {now}
        structures = {(r.min_secs, r.increment) for r in self.rates()}
        # The last block starts before the answer + its billed time.
        horizon = now + window + secs + max(m + i for m, i in structures)
        change = self.next_change(now)
        while change <= horizon:
            if change <= now + window:
                moments.add(change)
            for minimum, inc in structures:
                offset = minimum
                lowest = change - now - window
                if offset < lowest:
                    offset += -(-(lowest - offset) // inc) * inc
                while offset <= change - now:
                    moments.add(change - offset)
                    offset += inc
            change = self.next_change(change)
        return moments

    def worst_cost(self, now, window, billsec, places):
        """The most ``billsec`` of talk can cost when answered at any moment
        in [now, now + window]."""
        if self.flat is not None:
            return self.flat.cost(billsec, True, places)
        return _amount(self._worst(int(now), window, billsec), places)

    def _worst(self, now, window, secs):
        """The highest exact cost (micro units) of ``secs`` of talk answered
        at any moment in [now, now + window]: the cost is a step function of
        the answer time, constant between the ``moments`` where it can change."""
        return max(self._micro_cost(t, secs) for t in self._moments(now, window, secs))

    def rates(self):
        return [rate for _, _, _, rate in self.rows]


def _micro(amount):
    return int(amount * MICRO)


def _amount(micro_cost, places):
    """An exact cost from ``_micro_cost`` units, rounded up once."""
    return round_up(Decimal(micro_cost) / (60 * MICRO), places)
