"""Rate periods and least-cost order, checked against brute force.

The reference here prices a call second by second from first principles
(which period holds each block's first second, by plain arithmetic on the
week), so it shares nothing with the Plan it checks but the Rate terms.
"""
import calendar
import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given, settings, strategies as st

from astbill.rating import Clock, Plan, Rate
from astbill.rating.decks import RatesError, parse_rates
from astbill.rating.periods import coverage_problems, format_days, parse_days
from astbill.rating.routes import Route, order_routes, usable_routes

MONDAY = 1_795_996_800   # 2026-11-30 00:00:00 UTC, a Monday


def reference_cost(rows, answered_at, billsec):
    """Exact cost, block by block, each priced by the row whose days and
    hours hold the block's first second (UTC)."""
    def row_at(t):
        day, secs = divmod((t - MONDAY) % (7 * 86400), 86400)
        return next(r for d, a, b, r in rows if d >> day & 1 and a * 60 <= secs < b * 60)
    first = row_at(answered_at)
    billed = first.billed_secs(billsec)
    cost = Fraction(first.connect_fee) + Fraction(first.per_min) * first.min_secs / 60
    for start in range(first.min_secs, billed, first.increment):
        cost += Fraction(row_at(answered_at + start).per_min) * first.increment / 60
    return cost


def rounded(cost, places=4):
    """A Fraction rounded up to ``places``, exactly."""
    return Decimal(math.ceil(cost * 10 ** places)).scaleb(-places)


amounts = st.integers(0, 5000).map(lambda n: Decimal(n).scaleb(-4))
structures = st.sampled_from([(0, 1), (1, 1), (30, 6), (60, 60), (6, 6), (0, 30)])


@st.composite
def weeks(draw):
    """Rows that tile the week: up to three cuts of the day, weekdays and weekend apart."""
    rows = []
    for days in (31, 96):
        cuts = sorted(set(draw(st.lists(st.integers(1, 1439), max_size=3))))
        for start, end in zip([0] + cuts, cuts + [1440]):
            minimum, increment = draw(structures)
            rows.append((days, start, end, Rate("t", "49", "x", draw(amounts), draw(amounts),
                                                minimum, increment)))
    return rows


@settings(max_examples=150, deadline=None)
@given(weeks(), st.integers(0, 7 * 86400), st.integers(0, 900))
def test_a_call_costs_what_the_blocks_cost_one_by_one(rows, offset, billsec):
    plan = Plan(rows, Clock())
    answered_at = MONDAY + offset
    assert plan.cost(answered_at, billsec, True, 4) == rounded(
        reference_cost(rows, answered_at, billsec))
    assert plan.cost(answered_at, billsec, False, 4) == 0


@settings(max_examples=120, deadline=None)
@given(weeks(), st.integers(0, 7 * 86400), st.integers(0, 12), st.integers(0, 30000),
       st.integers(1, 400))
def test_the_grant_never_lets_a_call_cost_more_than_was_reserved(rows, offset, window, cents, cap):
    plan = Plan(rows, Clock())
    now, available = MONDAY + offset, Decimal(cents).scaleb(-4)
    secs, reserved = plan.grant(now, window, available, cap, 4)

    def worst(talk):  # the dearest answer in the window, by brute force
        return max(rounded(reference_cost(rows, t, talk)) for t in range(now, now + window + 1))

    if secs == 0:
        assert worst(1) > available
        return
    assert reserved <= available and reserved == worst(secs)
    for talk in {1, secs // 2 or 1, secs}:   # every shorter call costs no more
        assert worst(talk) <= reserved
    assert secs == cap or worst(secs + 1) > available   # the longest that is covered


def test_a_flat_week_prices_as_a_single_rate():
    rate = Rate("t", "49", "x", Decimal("0.06"), Decimal("0.01"), 30, 6)
    plan = Plan([(127, 0, 1440, rate)], Clock())
    assert plan.flat is rate
    assert plan.grant(MONDAY, 70, Decimal("1"), 3600, 4) == (
        rate.max_secs(Decimal("1"), 3600, 4), rate.cost(rate.max_secs(Decimal("1"), 3600, 4), True, 4))


def test_a_daylight_saving_change_moves_the_boundary():
    rows = [(127, 0, 480, Rate("t", "49", "x", Decimal("0.01"), 0, 60, 60)),
            (127, 480, 1440, Rate("t", "49", "x", Decimal("0.10"), 0, 60, 60))]
    berlin = Plan(rows, Clock("Europe/Berlin"))
    # 08:00 in Berlin is 06:00 UTC in summer, 07:00 UTC in winter.
    for day, utc_hour in (((2026, 7, 6), 6), ((2026, 12, 1), 7)):
        eight = calendar.timegm((*day, utc_hour, 0, 0))
        assert berlin.rate_at(eight - 1).per_min == Decimal("0.01")
        assert berlin.rate_at(eight).per_min == Decimal("0.10")
    # The night the clocks go back (2026-10-25, 03:00 CEST -> 02:00 CET): a
    # call from 07:30 to 08:30 local crosses the boundary at 07:00 UTC.
    half_past_seven = calendar.timegm((2026, 10, 25, 6, 30, 0))
    assert berlin.next_change(half_past_seven) == half_past_seven + 1800
    assert berlin.cost(half_past_seven, 3600, True, 4) == Decimal("3.3000")  # 0.30 + 3.00


@pytest.mark.parametrize("text, mask, shown", [
    ("all", 127, "all"), ("", 127, "all"), ("mon-fri", 31, "mon-fri"), ("sat,sun", 96, "sat-sun"),
    ("mon,wed-fri", 29, "mon,wed-fri"), ("SUN", 64, "sun")])
def test_days_are_read_and_written_back(text, mask, shown):
    assert parse_days(text) == mask and format_days(mask) == shown


def test_coverage_names_the_gap_and_the_overlap():
    assert coverage_problems([(127, 0, 1440, "line 2")]) == []
    assert coverage_problems([(31, 0, 1440, "line 2"), (96, 0, 600, "line 3"),
                              (64, 500, 1440, "line 4")]) == [
        "sat 10:00-24:00 is not covered", "sun 08:20-10:00 is covered twice (line 3 and line 4)"]


def test_a_deck_with_periods_is_read_whole():
    rows = parse_rates(["prefix,destination,rate,connect_fee,min_secs,increment,days,hours",
                        "49,Peak,0.1,0,60,60,mon-fri,08:00-18:00",
                        "49,Off,0.02,0,60,60,mon-fri,00:00-08:00",
                        "49,Off,0.02,0,60,60,mon-fri,18:00-24:00",
                        '49,Weekend,0.01,0,60,60,"sat,sun",'], "t")
    assert [(r.days, r.start, r.end, r.rate.per_min) for r in rows] == [
        (31, 480, 1080, Decimal("0.1")), (31, 0, 480, Decimal("0.02")),
        (31, 1080, 1440, Decimal("0.02")), (96, 0, 1440, Decimal("0.01"))]
    with pytest.raises(RatesError) as refused:
        parse_rates(["prefix,destination,rate,connect_fee,min_secs,increment,days,hours",
                     "49,Peak,0.1,0,60,60,mon-fri,8:00-18:00"], "t")
    assert refused.value.errors[0] == "rates: prefix 49: mon 00:00-08:00 is not covered"


# -- least-cost order ------------------------------------------------------------------------

def cheaper(a, b):
    """-1 if trunk a is to be tried before b: by the rules spelled out one by one."""
    if a.rate.per_min != b.rate.per_min:
        return -1 if a.rate.per_min < b.rate.per_min else 1
    if a.rate.connect_fee != b.rate.connect_fee:
        return -1 if a.rate.connect_fee < b.rate.connect_fee else 1
    return -1 if a.trunk < b.trunk else 1


def flat(rate):
    return Plan([(127, 0, 1440, rate)], Clock())


def dialled(routes, sell, allow_loss, most, now, window, grant, places=4, shortest=1, cap=3600):
    """The trunks a call granted ``grant`` seconds would dial: ordered and
    judged before the grant is known (up to ``cap``), then chosen by it."""
    ordered = order_routes(routes, sell, allow_loss, most, now, window, max(cap, grant), places,
                           shortest)
    return usable_routes(ordered, grant, most)


trunk_sets = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), structures),
                      min_size=0, max_size=6)


@settings(max_examples=200, deadline=None)
@given(trunk_sets, st.integers(0, 6), st.booleans(), st.integers(1, 4), st.integers(1, 400))
def test_trunks_are_tried_in_the_order_a_brute_force_sort_gives(prices, sell, allow_loss, most,
                                                                 grant):
    rates = [Rate("t", "49", "x", Decimal(r).scaleb(-2), Decimal(f).scaleb(-3), *structure)
             for r, f, structure in prices]
    routes = [Route(f"t{i}", "SIP/{number}", flat(rate), rate) for i, rate in enumerate(rates)]
    sell_rate = Rate("s", "49", "x", Decimal(sell).scaleb(-2), Decimal(0), 1, 1)
    chosen = dialled(routes, flat(sell_rate), allow_loss, most, MONDAY, 70, grant)

    def at_a_loss(route):  # any talk time up to the grant, by the Rate's own terms
        return any(route.rate.cost(secs, True, 4) > sell_rate.cost(secs, True, 4)
                   for secs in range(1, grant + 1))

    left = [r for r in routes if allow_loss or not at_a_loss(r)]
    best = []
    while left:  # selection by comparing every pair: the one cheaper than all others
        first = next(a for a in left if all(cheaper(a, b) < 0 for b in left if b is not a))
        best.append(first)
        left.remove(first)
    assert [r.trunk for r in chosen] == [r.trunk for r in best][:most]
    assert len({r.trunk for r in chosen}) == len(chosen)


near = st.integers(900, 1100).map(lambda n: Decimal(n).scaleb(-4))   # about 0.10 a minute
fees = st.sampled_from([0, 1, 5, 50, 100]).map(lambda n: Decimal(n).scaleb(-5))


@settings(max_examples=300, deadline=None)
@given(near, fees, structures, near, fees, structures, st.integers(1, 3600), st.integers(2, 6))
# 0.00005 to connect, a shade under the sell rate: a loss only where the
# sell cost is just a whole cent, first at 6 s.
@example(Decimal("0.1"), Decimal(0), (1, 1), Decimal("0.0999"), Decimal("0.00005"), (1, 1), 60, 2)
# The same rate, but the buy side's second block starts at 31 s, where the
# sell side has billed only a sixth of its own more.
@example(Decimal("0.1"), Decimal(0), (30, 6), Decimal("0.1"), Decimal(0), (0, 30), 3600, 4)
def test_a_trunk_priced_close_to_the_sell_price_is_judged_over_the_whole_grant(
        sell_rate, sell_fee, sell_blocks, buy_rate, buy_fee, buy_blocks, grant, places):
    # Flat prices within a few percent of each other, fees below a rounding
    # unit or two, grants up to an hour: every talk time tried, one by one.
    sell = Rate("s", "49", "x", sell_rate, sell_fee, *sell_blocks)
    buy = Rate("t", "49", "x", buy_rate, buy_fee, *buy_blocks)
    at_a_loss = any(buy.cost(secs, True, places) > sell.cost(secs, True, places)
                    for secs in range(1, grant + 1))
    kept = dialled([Route("t", "SIP/{number}", flat(buy), buy)], flat(sell), False, 1,
                   MONDAY, 70, grant, places)
    assert len(kept) == (not at_a_loss)


def test_a_trunk_dearer_on_short_calls_is_at_a_loss_though_cheaper_per_minute():
    # Sold at 0.10/min on 1/1; bought at 0.09/min + 0.05 on 60/60: 10 s
    # costs 0.0167 and 0.1400, 61 s 0.1017 and 0.2300.
    sell = flat(Rate("s", "49", "x", Decimal("0.10"), Decimal(0), 1, 1))
    dear = Rate("a", "49", "x", Decimal("0.09"), Decimal("0.05"), 60, 60)
    fair = Rate("b", "49", "x", Decimal("0.095"), Decimal(0), 1, 1)
    assert (sell.cost(MONDAY, 10, True, 4), flat(dear).cost(MONDAY, 10, True, 4)) == (
        Decimal("0.0167"), Decimal("0.1400"))
    assert (sell.cost(MONDAY, 61, True, 4), flat(dear).cost(MONDAY, 61, True, 4)) == (
        Decimal("0.1017"), Decimal("0.2300"))
    routes = [Route("a", "SIP/a/{number}", flat(dear), dear),
              Route("b", "SIP/b/{number}", flat(fair), fair)]
    assert [r.trunk for r in dialled(routes, sell, False, 3, MONDAY, 70, 3600, 4)] == ["b"]
    assert [r.trunk for r in dialled(routes, sell, True, 3, MONDAY, 70, 3600, 4)] == ["a", "b"]


@st.composite
def sides(draw):
    """One side's prices for a prefix: a flat Rate, or a week of periods."""
    if draw(st.booleans()):
        return draw(weeks())
    return [(127, 0, 1440, Rate("t", "49", "x", draw(amounts), draw(amounts), *draw(structures)))]


@st.composite
def loss_cases(draw):
    """A sell week, one or two buy weeks, and an authorization shortly
    before a change of period, so that the ring window or the call crosses
    it: (sell rows, buy rows, now, window, grant)."""
    sell, buys = draw(sides()), draw(st.lists(sides(), min_size=1, max_size=2))
    starts = sorted({start for rows in [sell, *buys] for _, start, _, _ in rows})
    day = draw(st.integers(0, 6)) * 86400
    if draw(st.booleans()):   # the window crosses the change
        window = draw(st.integers(0, 30))
        back, grant = draw(st.integers(0, window)), draw(st.integers(1, 90))
    else:                     # the call does, perhaps long after its minimum
        window, back = draw(st.integers(0, 2)), draw(st.integers(0, 400))
        grant = draw(st.one_of(st.integers(1, 12), st.integers(back, back + 400)))
    now = MONDAY + day + max(draw(st.sampled_from(starts)) * 60 - back, 0)
    return sell, buys, now, window, max(grant, 1)


@settings(max_examples=600, deadline=None)
@given(loss_cases(), st.sampled_from([1, 1, 0]), st.integers(0, 40))
def test_a_trunk_is_skipped_iff_some_call_within_the_grant_costs_more_to_buy_than_to_sell(
        case, shortest, extra):
    sell_rows, buys, now, window, grant = case
    cap = grant + extra
    sell = Plan(sell_rows, Clock())
    routes = [Route(f"t{i}", "SIP/{number}", Plan(rows, Clock()), Plan(rows, Clock()).rate_at(now))
              for i, rows in enumerate(buys)]

    def first_loss(route):
        # Every talk time up to the cap, every answer in the window, one by
        # one (Plan.cost is checked against the block-by-block reference above).
        return next((secs for secs in range(shortest, cap + 1)
                     if any(route.plan.cost(t, secs, True, 4) > sell.cost(t, secs, True, 4)
                            for t in range(now, now + window + 1))), None)

    losses = {r.trunk: first_loss(r) for r in routes}
    ordered = order_routes(routes, sell, False, 3, now, window, cap, 4, shortest)
    assert {r.trunk: r.loss for r in ordered} == losses
    kept = usable_routes(ordered, grant, 3)
    assert {r.trunk for r in kept} == {t for t, loss in losses.items() if loss is None or loss > grant}
    assert len(dialled(routes, sell, True, 3, now, window, grant, 4, shortest)) == len(routes)


def test_a_trunk_is_at_a_loss_if_the_call_may_be_answered_in_a_dearer_period():
    # Cheap until 08:00, dear after; sold at 0.10 a minute.  Authorized at
    # 07:59:00 for a minute: answered at once it costs 0.01 to buy, answered
    # a minute later (the ring window allows it) 0.20.
    night = Rate("a", "49", "x", Decimal("0.01"), Decimal(0), 60, 60)
    day = Rate("a", "49", "x", Decimal("0.20"), Decimal(0), 60, 60)
    buy = Plan([(127, 0, 480, night), (127, 480, 1440, day)], Clock())
    sell = flat(Rate("s", "49", "x", Decimal("0.10"), Decimal(0), 60, 60))
    routes = [Route("a", "SIP/a/{number}", buy, night)]
    seven_fifty_nine = MONDAY + 7 * 3600 + 59 * 60
    assert [r.trunk for r in dialled(routes, sell, False, 3, seven_fifty_nine, 0, 60, 4)] == ["a"]
    assert dialled(routes, sell, False, 3, seven_fifty_nine, 70, 60, 4) == []
    assert dialled(routes, sell, False, 3, seven_fifty_nine, 0, 61, 4) == []  # into the day


def test_a_trunk_is_at_a_loss_if_a_long_call_runs_into_a_dearer_period():
    # Per second, 0.05 a minute until 08:00, 0.20 after; sold at 0.10.
    # From 07:58:00, three minutes cost 0.10 + 0.20 to buy and 0.30 to
    # sell; a second more, 0.3034 and 0.3017.
    night = Rate("a", "49", "x", Decimal("0.05"), Decimal(0), 1, 1)
    day = Rate("a", "49", "x", Decimal("0.20"), Decimal(0), 1, 1)
    buy = Plan([(127, 0, 480, night), (127, 480, 1440, day)], Clock())
    sell = flat(Rate("s", "49", "x", Decimal("0.10"), Decimal(0), 1, 1))
    seven_fifty_eight = MONDAY + 7 * 3600 + 58 * 60
    assert (buy.cost(seven_fifty_eight, 181, True, 4), sell.cost(seven_fifty_eight, 181, True, 4)) == (
        Decimal("0.3034"), Decimal("0.3017"))
    routes = [Route("a", "SIP/a/{number}", buy, night)]
    assert len(dialled(routes, sell, False, 3, seven_fifty_eight, 0, 180, 4)) == 1
    assert dialled(routes, sell, False, 3, seven_fifty_eight, 0, 181, 4) == []
