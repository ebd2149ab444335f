"""Least-cost routing: which trunks may carry a call, in the order to try them."""


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

    Each cost is a step function of the talk time that never goes down.
    So on a stretch [lo, hi] where the buy cost at hi is no more than the
    sell cost at lo, no talk time loses; where either end loses, the search
    is over; otherwise the stretch is halved.  A stretch within one buy
    block (one buy cost) or one sell block is settled by its ends, so only
    stretches across a block boundary of both sides are halved: the search
    takes at most some log2(longest) steps per block of the side with fewer
    blocks, and fewer where the margin is wide."""
    costs = {}

    def at(secs):
        if secs not in costs:
            costs[secs] = (buy.cost(answered_at, secs, True, places),
                           sell.cost(answered_at, secs, True, places))
        return costs[secs]

    stretches = [(shortest, longest)]
    while stretches:
        lo, hi = stretches.pop()
        (buy_lo, sell_lo), (buy_hi, sell_hi) = at(lo), at(hi)
        if buy_lo > sell_lo or buy_hi > sell_hi:
            return True
        if buy_hi <= sell_lo or hi - lo <= 1:
            continue
        middle = (lo + hi) // 2
        stretches += [(middle, hi), (lo, middle)]
    return False
