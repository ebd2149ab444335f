"""Least-cost routing: which trunks may carry a call, in the order to try them."""
from math import lcm


class Route:
    """A trunk that can carry the number: its name, Dial template, its buy
    prices for the number (a Plan: the longest prefix of its deck), the buy
    rate in force now, and the id of the deck they come from."""
    __slots__ = ("trunk", "dial", "plan", "rate", "deck")

    def __init__(self, trunk, dial, plan, rate, deck=None):
        self.trunk = trunk
        self.dial = dial
        self.plan = plan
        self.rate = rate
        self.deck = deck

    def dial_string(self, number):
        return self.dial.format(number=number)


def order_routes(routes, sell, allow_loss, most, now, window, secs, places, shortest=1):
    """Cheapest first -- per-minute buy rate now, then connect fee, then
    name -- skipping a trunk on which the call could cost more than it is
    sold for (``loses``: answered within ``window`` of ``now``, for any
    billable talk time up to ``secs``) unless ``allow_loss``; at most
    ``most`` of them.  ``sell`` is the call's sell Plan."""
    ordered = sorted(routes, key=lambda r: (r.rate.per_min, r.rate.connect_fee, r.trunk))
    usable = []
    for route in ordered:
        if len(usable) == most:
            break
        if allow_loss or not loses(route.plan, sell, now, window, secs, places, shortest):
            usable.append(route)
    return usable


def loses(buy, sell, now, window, secs, places, shortest=1):
    """Whether some call answered in [now, now + window] and billed from
    ``shortest`` to ``secs`` seconds of talk costs more on the ``buy`` Plan
    than on the ``sell`` Plan, each priced by its own connect fee, minimum,
    increments and periods, rounded to ``places`` as each is charged.

    Both costs stay the same between the answers at which either Plan's
    price can change (``Plan.answer_moments``), so those answers are all
    there is to try; for each, ``_loses_when_answered`` searches the talk
    times."""
    if secs < shortest:
        return False
    moments = buy.answer_moments(now, window, secs) | sell.answer_moments(now, window, secs)
    return any(_loses_when_answered(buy, sell, t, shortest, secs, places)
               for t in sorted(moments))


def _loses_when_answered(buy, sell, answered_at, shortest, longest, places):
    """Whether a call answered at ``answered_at`` costs more to buy than to
    sell for some talk time in [shortest, longest].

    Past both minimums, a call ``span`` seconds longer (whole blocks on both
    sides) adds the blocks that start in those seconds; while no price
    changes there, that is the same ``drift`` more to buy than to sell,
    however long the call.  So between two changes the widest gap lies in
    the first span (drift <= 0) or the last, where a buy block starts.  A
    stretch whose buy cost never exceeds its sell cost, even unrounded,
    cannot lose once both are rounded up; any other stretch, and the odd
    ends, are searched (``_search``)."""
    costs, exact = {}, {}

    def rounded(secs):
        if secs not in costs:
            costs[secs] = (buy.cost(answered_at, secs, True, places),
                           sell.cost(answered_at, secs, True, places))
        return costs[secs]

    def gap(secs):
        if secs not in exact:
            exact[secs] = (buy.exact_cost(answered_at, secs)
                           - sell.exact_cost(answered_at, secs))
        return exact[secs]

    first_buy, first_sell = buy.rate_at(answered_at), sell.rate_at(answered_at)
    inc = first_buy.increment
    span = lcm(inc, first_sell.increment)
    start = max(first_buy.min_secs, first_sell.min_secs, shortest)
    if _search(rounded, shortest, min(start - 1, longest)):
        return True
    # A call's blocks start before its talk time ends: only changes within
    # the longest call count.
    changes = sorted({at - answered_at for plan in (buy, sell)
                      for at in plan.changes(answered_at, answered_at + longest)})
    for end in changes + [None]:
        if start > longest:
            break
        last = longest if end is None else min(end - 1, longest)
        if last - start + 1 < 2 * span:
            if _search(rounded, start, last):
                return True
        else:
            drift = gap(start + span) - gap(start)
            lo = start if drift <= 0 else last - span + 1
            widest = max(gap(secs) for secs in range(lo, lo + span)
                         if secs == lo or (secs - first_buy.min_secs - 1) % inc == 0)
            # With drift < 0, past this many spans no gap is left at all.
            if widest > 0 and _search(rounded, start, last if drift >= 0 else min(
                    last, start + span * (-(-widest // -drift) + 1))):
                return True
        start = max(start, last + 1, end or 0)
    return False


def _search(costs, lo, hi):
    """Whether some talk time in [lo, hi] costs more to buy than to sell,
    ``costs(secs)`` being (buy, sell).

    Each cost is a step function of the talk time that never goes down.
    So on a stretch where the buy cost at its end is no more than the sell
    cost at its start, no talk time loses; where either end loses, the
    search is over; otherwise the stretch is halved.  A stretch within one
    buy block (one buy cost) or one sell block is settled by its ends."""
    stretches = [(lo, hi)] if lo <= hi else []
    while stretches:
        lo, hi = stretches.pop()
        (buy_lo, sell_lo), (buy_hi, sell_hi) = costs(lo), costs(hi)
        if buy_lo > sell_lo or buy_hi > sell_hi:
            return True
        if buy_hi <= sell_lo or hi - lo <= 1:
            continue
        middle = (lo + hi) // 2
        stretches += [(middle, hi), (lo, middle)]
    return False
