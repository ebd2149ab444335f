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


def order_routes(routes, sell, allow_loss, most):
    """Cheapest first -- per-minute buy rate, then connect fee, then name --
    skipping a trunk whose per-minute rate is above the call's sell rate
    unless ``allow_loss``; at most ``most`` of them."""
    usable = [r for r in routes if allow_loss or r.rate.per_min <= sell.per_min]
    usable.sort(key=lambda r: (r.rate.per_min, r.rate.connect_fee, r.trunk))
    return usable[:most]
