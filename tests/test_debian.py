"""AstBill on Debian's own Python and packages, not the project's .venv.

Debian 12 ships mysqlclient 1.4.6 and PyMySQL 1.0.2, older than what pip
installs into .venv; astbill-admin and astbill.py run here on /usr/bin/python3
with python3-yaml, python3-mysqldb and python3-pymysql alone, on SQLite and
on MariaDB through each driver, through a whole call.
"""
import json
import subprocess

import pytest

import debian
from agipeer import Scenario, agi_env, run_call
from conftest import ADMIN, ASTBILL, RATES, ROOT, Billing, fresh_database


@pytest.fixture(params=["sqlite", "mysqlclient", "pymysql"])
def setup(request, tmp_path):
    """(a Billing configured for the backend, Debian's interpreter)."""
    python = debian.require_python()
    database = fresh_database(request, tmp_path, request.param)
    settings = {} if request.param == "sqlite" else {"mysql_driver": request.param}
    return Billing(tmp_path, database, **settings), python


def admin(billing, python, *argv):
    result = subprocess.run([python, "-I", ADMIN, "-c", str(billing.config), *argv], text=True,
                            capture_output=True, timeout=60, env=debian.env())
    assert result.returncode == 0, f"astbill-admin {' '.join(argv)}: {result.stderr}"
    assert result.stderr == ""
    return result.stdout


def test_a_call_is_billed_on_debians_python_and_packages(setup):
    billing, python = setup
    assert admin(billing, python, "init-db").startswith("schema created")
    rates = billing.path / "rates.csv"
    rates.write_text(RATES)
    admin(billing, python, "rate", "import", str(rates), "--tariff", "default")
    admin(billing, python, "account", "add", "1001", "--balance", "10")

    block = agi_env(agi_extension="4912345678", agi_accountcode="1001")
    result = run_call([python, "-I", ASTBILL], Scenario(answered_ms=61_500), block,
                      debian.env(ASTBILL_CONFIG=str(billing.config)))
    assert result.returncode == 0, result.dialogue_text()
    assert result.dial_args == "PJSIP/4912345678@trunk,60,L(3600000)", result.dialogue_text()
    assert (result.variables_set["ASTBILL_STATUS"], result.variables_set["ASTBILL_COST"],
            result.variables_set["ASTBILL_BILLSEC"]) == ("OK", "0.1200", "62")
    assert result.stderr == ""

    account = json.loads(admin(billing, python, "account", "show", "1001", "--json"))
    assert (account["balance"], account["reserved"]) == ("9.8800", "0.0000")
    cdrs = json.loads(admin(billing, python, "cdr", "--json"))
    assert [(c["uniqueid"], c["cost"], c["state"]) for c in cdrs] == [
        (block["agi_uniqueid"], "0.1200", "settled")]
    assert admin(billing, python, "audit").strip().endswith("audit: ok")


@pytest.mark.parametrize("driver", ["auto", "mysqlclient", "pymysql"])
def test_each_driver_is_debians_own(driver):
    """The drivers the calls above used are the ones Debian installed; auto
    takes mysqlclient (1.4.6 on Debian 12, 2.2 on Debian 13)."""
    python = debian.require_python()
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            " from astbill.store.mysql import load_driver, driver_version;"
            " m = load_driver(sys.argv[2]); print(m.__name__, m.__file__, *driver_version(m))")
    result = subprocess.run([python, "-I", "-c", code, str(ROOT / "lib"), driver], text=True,
                            capture_output=True, timeout=60, env=debian.env())
    name, path, *version = result.stdout.split() or ["?", "?"]
    assert path.startswith(debian.DIST_PACKAGES), result.stderr
    assert name == ("pymysql" if driver == "pymysql" else "MySQLdb._mysql")
