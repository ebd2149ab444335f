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
from hypothesis import given, settings, strategies as st

from astbill.rating import Clock, Plan, Rate
from astbill.rating.decks import RatesError, parse_rates
from astbill.rating.periods import coverage_problems, format_days, parse_days
from astbill.rating.routes import Route, order_routes

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


trunk_sets = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=0, max_size=6)


@settings(max_examples=200, deadline=None)
@given(trunk_sets, st.integers(0, 6), st.booleans(), st.integers(1, 4))
def test_trunks_are_tried_in_the_order_a_brute_force_sort_gives(prices, sell, allow_loss, most):
    routes = [Route(f"t{i}", "SIP/{number}", None, Rate("t", "49", "x", Decimal(r).scaleb(-2),
                                                  Decimal(f).scaleb(-3), 1, 1))
              for i, (r, f) in enumerate(prices)]
    sell_rate = Rate("s", "49", "x", Decimal(sell).scaleb(-2), Decimal(0), 1, 1)
    chosen = order_routes(routes, sell_rate, allow_loss, most)
    left = [r for r in routes if allow_loss or r.rate.per_min <= sell_rate.per_min]
    best = []
    while left:  # selection by comparing every pair: the one cheaper than all others
        first = next(a for a in left if all(cheaper(a, b) < 0 for b in left if b is not a))
        best.append(first)
        left.remove(first)
    assert [r.trunk for r in chosen] == [r.trunk for r in best][:most]
    assert len({r.trunk for r in chosen}) == len(chosen)
