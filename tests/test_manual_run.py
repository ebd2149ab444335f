"""./astbill.py < tests/fixtures/NAME.agi: the AGI dialogue printed, the call billed."""
import subprocess
import sys
from decimal import Decimal

import pytest

from conftest import ASTBILL, ROOT

FIXTURES = ROOT / "tests" / "fixtures"


def run_fixture(billing, name):
    with open(FIXTURES / f"{name}.agi", "rb") as stdin:
        return subprocess.run([sys.executable, ASTBILL], stdin=stdin, capture_output=True,
                              env=billing.env, timeout=30, text=True)


def test_answered_fixture_prints_the_dialogue_and_bills(tariff):
    result = run_fixture(tariff, "answered")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        'GET FULL VARIABLE "${CHANNEL(state)}|${CDR(billsec,f)}|${CHANNEL(linkedid)}|${FILTER(a-zA-Z,${ASTBILL_ANNOUNCE})}"',
        'SET VARIABLE ASTBILL_STATUS "OK"',
        'SET VARIABLE ASTBILL_MAXSECS "3600"',
        'EXEC Dial "PJSIP/4912345678@trunk,60,L(3600000)"',
        'GET FULL VARIABLE "${DIALSTATUS}|${ANSWEREDTIME_MS}|${ANSWEREDTIME}|${CDR(billsec,f)}|${DIALEDPEERNAME}"',
        'SET VARIABLE ASTBILL_COST "0.1200"',
        'SET VARIABLE ASTBILL_BILLSEC "66"']
    assert tariff.balance("1001") == Decimal("9.88")
    again = run_fixture(tariff, "answered")
    assert 'SET VARIABLE ASTBILL_STATUS "ERROR"' in again.stdout
    assert tariff.balance("1001") == Decimal("9.88")


@pytest.mark.parametrize("name, last_line, balance", [
    ("busy", 'SET VARIABLE ASTBILL_BILLSEC "0"', "10"),
    ("caller_hangup", 'SET VARIABLE ASTBILL_BILLSEC "5"', "9.99"),
    ("norate", 'VERBOSE "astbill: NORATE account 1001 to 7123456" 1', "10"),
    ("noaccount", 'VERBOSE "astbill: NOACCOUNT no account on the channel" 1', "10"),
])
def test_each_fixture_runs_by_hand(tariff, name, last_line, balance):
    result = run_fixture(tariff, name)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[-1] == last_line
    assert tariff.balance("1001") == Decimal(balance)
