"""Least-cost routing: which trunks may carry a call, in the order to try them."""
from math import lcm


class Route:
    """A trunk that can carry the number: its name, Dial template, its buy
    prices for the number (a Plan: the longest prefix of its deck), the buy
    rate in force now, the id of the deck they come from, and ``loss``: the
    shortest talk time at which the call could cost more to buy than it is
    sold for (None: none that it can be granted; see ``order_routes``)."""
    __slots__ = ("trunk", "dial", "plan", "rate", "deck", "loss")

    def __init__(self, trunk, dial, plan, rate, deck=None):
        self.trunk = trunk
        self.dial = dial
        self.plan = plan
        self.rate = rate
        self.deck = deck
        self.loss = None

    def dial_string(self, number):
        return self.dial.format(number=number)


def order_routes(routes, sell, allow_loss, most, now, window, cap, places, shortest=1):
    """The trunks cheapest first -- per-minute buy rate now, then connect
    fee, then name -- each with its ``loss`` (``first_loss`` against the
    ``sell`` Plan, answered within ``window`` of ``now``, up to ``cap``
    seconds; left None with ``allow_loss``).  No trunk after the first
    ``most`` that never lose could be dialled: they are left out.

    What the account may spend is not known yet: ``usable_routes`` takes
    these once the call's grant is."""
    ordered = sorted(routes, key=lambda r: (r.rate.per_min, r.rate.connect_fee, r.trunk))
    chosen, sure = [], 0
    for route in ordered:
        if sure == most:
            break
        route.loss = None if allow_loss else first_loss(route.plan, sell, now, window, cap,
                                                        places, shortest)
        chosen.append(route)
        sure += route.loss is None
    return chosen


def usable_routes(routes, secs, most):
    """The first ``most`` of ``order_routes``' trunks that lose on no call
    of up to ``secs`` seconds: the trunks to dial, in order."""
    return [r for r in routes if r.loss is None or r.loss > secs][:most]


def first_loss(buy, sell, now, window, longest, places, shortest=1):
    """The shortest talk time, from ``shortest`` to ``longest`` seconds, at
    which a call answered at some moment in [now, now + window] costs more
    on the ``buy`` Plan than on the ``sell`` Plan, each priced by its own
    connect fee, minimum, increments and periods and rounded to ``places``
    as each is charged; None if there is none.

    Both costs stay the same between the answers at which either Plan's
    price can change (``Plan.answer_moments``), so those answers are all
    there is to try; for each, ``_first_loss_when_answered`` searches the
    talk times, each time below the shortest loss found so far."""
    if longest < shortest:
        return None
    found = None
    for t in sorted(buy.answer_moments(now, window, longest)
                    | sell.answer_moments(now, window, longest)):
        loss = _first_loss_when_answered(buy, sell, t, shortest, longest, places)
        if loss is not None:
            found, longest = loss, loss - 1
            if longest < shortest:
                break
    return found


def _first_loss_when_answered(buy, sell, answered_at, shortest, longest, places):
    """The shortest talk time in [shortest, longest] at which a call
    answered at ``answered_at`` costs more to buy than to sell, or None.

    Past both minimums, a call ``span`` seconds longer (whole blocks on both
    sides) adds the blocks that start in those seconds; while no price
    changes there, that is the same ``drift`` more to buy than to sell,
    however long the call.  So between two changes the widest gap lies in
    the first span (drift <= 0) or the last (``_widest_candidates``).  A
    stretch whose buy cost never exceeds its sell cost, even unrounded,
    cannot lose once both are rounded up; any other stretch, and the odd
    ends, are searched (``_search``), in order."""
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
    span = lcm(first_buy.increment, first_sell.increment)
    start = max(first_buy.min_secs, first_sell.min_secs, shortest)
    loss = _search(rounded, shortest, min(start - 1, longest))
    if loss is not None:
        return loss
    # A call's blocks start before its talk time ends: only changes within
    # the longest call count.
    changes = sorted({at - answered_at for plan in (buy, sell)
                      for at in plan.changes(answered_at, answered_at + longest)})
    for end in changes + [None]:
        if start > longest:
            break
        last = longest if end is None else min(end - 1, longest)
        if last - start + 1 < 2 * span:
            loss = _search(rounded, start, last)
        else:
            drift = gap(start + span) - gap(start)
            lo = start if drift <= 0 else last - span + 1
            widest = max(gap(secs) for secs in _widest_candidates(first_buy, first_sell, lo, span))
            # With drift < 0, past this many spans no gap is left at all.
            loss = None if widest <= 0 else _search(rounded, start, last if drift >= 0 else min(
                last, start + span * (-(-widest // -drift) + 1)))
        if loss is not None:
            return loss
        start = max(start, last + 1, end or 0)
    return None


def _widest_candidates(buy, sell, lo, span):
    """Where in [lo, lo + span) the gap (buy less sell cost) is widest, on
    the blocks of the rates a call is answered at: at a buy block's first
    second (the buy cost is the same over the block, the sell cost only
    grows), or at a sell block's last (the other way round); or at the ends.
    Whichever side has fewer blocks in a span."""
    if span // sell.increment < span // buy.increment:
        first = lo + (sell.min_secs - lo) % sell.increment
        return [*range(first, lo + span, sell.increment), lo + span - 1]
    first = lo + (buy.min_secs + 1 - lo) % buy.increment
    return [lo, *range(first, lo + span, buy.increment)]


def _search(costs, lo, hi):
    """The shortest talk time in [lo, hi] that costs more to buy than to
    sell, ``costs(secs)`` being (buy, sell); None if none does.

    Each cost is a step function of the talk time that never goes down.
    So on a stretch where the buy cost at its end is no more than the sell
    cost at its start, no talk time loses; where its start loses, that is
    the answer (the stretches before it lost nowhere); otherwise the
    stretch is halved, its first half searched first.  A stretch within
    one buy block (one buy cost) is settled at once."""
    stretches = [(lo, hi)] if lo <= hi else []
    while stretches:
        lo, hi = stretches.pop()
        (buy_lo, sell_lo), (buy_hi, sell_hi) = costs(lo), costs(hi)
        if buy_lo > sell_lo:
            return lo
        if buy_hi <= sell_lo:
            continue
        if hi - lo <= 1:
            if buy_hi > sell_hi:
                return hi
            continue
        middle = (lo + hi) // 2
        stretches += [(middle, hi), (lo, middle)]
    return None
