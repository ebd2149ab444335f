"""Rating and money: billed seconds, cost, and the time money buys."""
from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from astbill.money import D, MoneyError, fmt, round_up
from astbill.rating import Rate, normalize_destination, prefixes_of


def rate(per_min="0.06", fee="0", min_secs=60, increment=60):
    return Rate("t", "49", "Germany", D(per_min), D(fee), min_secs, increment)


@pytest.mark.parametrize("billsec, billed", [(0, 60), (1, 60), (60, 60), (61, 120), (119, 120)])
def test_60_60_bills_whole_minutes(billsec, billed):
    assert rate().billed_secs(billsec) == billed


@pytest.mark.parametrize("billsec, billed", [(1, 30), (30, 30), (31, 36), (36, 36), (37, 42)])
def test_30_6_bills_a_minimum_then_six_second_blocks(billsec, billed):
    assert rate(min_secs=30, increment=6).billed_secs(billsec) == billed


def test_1_1_bills_each_second():
    r = rate("0.12", min_secs=1, increment=1)
    assert [r.billed_secs(s) for s in (1, 2, 59)] == [1, 2, 59]
    assert r.cost(59, True, 4) == D("0.1180")


def test_cost_rounds_up_once_and_unanswered_is_free():
    r = rate("0.0100", fee="0.0100", min_secs=1, increment=1)
    assert r.cost(1, True, 4) == D("0.0102")  # 0.01 + 0.0001666.. rounded up
    assert r.cost(0, False, 4) == D("0")
    assert r.cost(100, False, 4) == D("0")


def test_max_secs_is_the_end_of_the_last_paid_block():
    assert rate().max_secs(D("0.12"), 3600, 4) == 120
    assert rate().max_secs(D("0.1199"), 3600, 4) == 60
    assert rate().max_secs(D("0.0599"), 3600, 4) == 0
    assert rate("0.03", "0.01", 30, 6).max_secs(D("0.0250"), 3600, 4) == 30
    assert rate().max_secs(D("1000"), 3600, 4) == 3600
    assert rate("0").max_secs(D("0"), 3600, 4) == 3600


@given(st.decimals(min_value=0, max_value=500, places=4),
       st.sampled_from([(60, 60), (30, 6), (1, 1), (0, 60), (45, 15)]),
       st.decimals(min_value=D("0.0001"), max_value=5, places=4),
       st.decimals(min_value=0, max_value=1, places=4))
def test_granted_time_is_exactly_what_money_covers(available, blocks, per_min, fee):
    r = rate(per_min, fee, *blocks)
    granted = r.max_secs(available, 3600, 4)
    if granted == 0:
        assert r.cost(1, True, 4) > available
        return
    assert r.cost(granted, True, 4) <= available
    if granted < 3600:
        assert r.cost(granted + 1, True, 4) > available


def test_d_refuses_what_is_not_exact_money():
    for bad in (None, "", "abc", 1.5, "NaN", "Infinity", "0.0000001", True, "1e20", "1e30", "-1e30"):
        with pytest.raises(MoneyError):
            D(bad)
    assert D(" 1.50 ") == Decimal("1.50")
    assert round_up(Decimal("0.00001"), 4) == Decimal("0.0001")
    assert fmt(Decimal("10.000000")) == "10.0000"
    assert fmt(Decimal("0.123456")) == "0.123456"


def test_negative_rates_are_refused():
    with pytest.raises(MoneyError):
        rate("-0.01")


@pytest.mark.parametrize("raw, number", [
    ("+4930123", "4930123"), ("004930123", "4930123"), ("4930123", "4930123"),
    ("", None), ("49a", None), ("*49#", None), ("1" * 33, None), ("+", None), ("٣٣", None)])
def test_destinations_are_normalized_or_refused(raw, number):
    assert normalize_destination(raw) == number


def test_national_numbers_take_the_country_code():
    assert normalize_destination("0301234", "00", "0", "49") == "49301234"
    assert prefixes_of("493") == ["493", "49", "4"]
