"""Which MySQL driver AstBill takes, and what it says when none will do.

The real drivers are tested against MariaDB everywhere else (and Debian's
own releases in test_debian.py); here stand-ins play the releases this
machine does not have: a driver missing, or older than AstBill drives.
"""
import subprocess
import sys
import types

import pytest

from astbill.store import StoreError
from astbill.store import mysql
from conftest import ADMIN, ROOT


def mysqlclient_module(version, with_c_module=True):
    """Stand-ins for MySQLdb and its C module at ``version``."""
    package = types.ModuleType("MySQLdb")
    package.version_info = (*version, "final", 0)
    modules = {"MySQLdb": package}
    if with_c_module:
        c_module = types.ModuleType("MySQLdb._mysql")
        c_module.version_info = package.version_info
        package._mysql = modules["MySQLdb._mysql"] = c_module
    return modules


def pymysql_module(version):
    module = types.ModuleType("pymysql")
    module.VERSION = (*version, None)
    module.version_info = (1, 4, 6, "final", 0)  # the mysqlclient it imitates, not its own
    return {"pymysql": module}


@pytest.fixture
def installed(monkeypatch):
    """Make these modules (None: not installed) what an import finds."""
    def install(**modules):
        monkeypatch.delitem(sys.modules, "MySQLdb._mysql", raising=False)
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
    return install


def test_auto_takes_mysqlclient_when_it_is_recent_enough(installed):
    modules = mysqlclient_module((1, 4, 6))
    installed(**modules, **pymysql_module((1, 0, 2)))
    assert mysql.load_driver("auto") is modules["MySQLdb._mysql"]


def test_auto_falls_back_to_pymysql_past_a_mysqlclient_too_old(installed):
    installed(**mysqlclient_module((1, 4, 3)), **pymysql_module((1, 0, 2)))
    assert mysql.load_driver("auto") is sys.modules["pymysql"]


@pytest.mark.parametrize("modules, driver, message", [
    (mysqlclient_module((1, 4, 3)), "mysqlclient",
     "no usable MySQL driver: mysqlclient 1.4.3 is too old (AstBill needs 1.4.4 or later):"
     " install python3-mysqldb"),
    # Before 1.4 there is no MySQLdb._mysql at all.
    (mysqlclient_module((1, 3, 14), with_c_module=False), "mysqlclient",
     "no usable MySQL driver: mysqlclient 1.3.14 is too old (AstBill needs 1.4.4 or later):"
     " install python3-mysqldb"),
    (pymysql_module((0, 9, 3)), "pymysql",
     "no usable MySQL driver: pymysql 0.9.3 is too old (AstBill needs 1.0 or later):"
     " install python3-pymysql"),
    ({"MySQLdb": None, "MySQLdb._mysql": None, "pymysql": None}, "auto",
     "no usable MySQL driver: mysqlclient is not installed; pymysql is not installed:"
     " install python3-mysqldb or python3-pymysql"),
], ids=["mysqlclient-1.4.3", "mysqlclient-1.3", "pymysql-0.9", "none"])
def test_a_missing_or_old_driver_is_named_in_one_line(installed, modules, driver, message):
    installed(**modules)
    with pytest.raises(StoreError) as caught:
        mysql.load_driver(driver)
    assert str(caught.value) == message


def test_a_driver_that_is_installed_but_cannot_be_loaded_says_why(tmp_path, monkeypatch):
    package = tmp_path / "MySQLdb"
    package.mkdir()
    (package / "__init__.py").write_text("from . import _mysql\n")
    (package / "_mysql.py").write_text(
        "raise ImportError('libmariadb.so.3: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("MySQLdb", "MySQLdb._mysql"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(StoreError) as caught:
        mysql.load_driver("mysqlclient")
    assert str(caught.value) == (
        "no usable MySQL driver: mysqlclient cannot be loaded (libmariadb.so.3: cannot open"
        " shared object file): install python3-mysqldb")


def test_mysqlclient_before_2_1_gets_its_own_keywords(installed):
    """mysqlclient 2.1 renamed _mysql.connect's passwd and db (Debian 12 has 1.4.6)."""
    for version, names, not_these in (((1, 4, 6), ("passwd", "db"), ("password", "database")),
                                      ((2, 2, 7), ("password", "database"), ("passwd", "db"))):
        seen = {}
        c_module = mysqlclient_module(version)["MySQLdb._mysql"]
        c_module.connect = lambda **kwargs: seen.update(kwargs)
        mysql.CConnection(c_module, host="h", user="u", password="pw", database="astbill",
                          autocommit=True)
        assert (seen[names[0]], seen[names[1]]) == ("pw", "astbill")
        assert not set(not_these) & set(seen)
        assert "autocommit" not in seen


def test_an_old_driver_stops_astbill_admin_with_one_line(tmp_path):
    fake = tmp_path / "site"
    (fake / "MySQLdb").mkdir(parents=True)
    (fake / "MySQLdb" / "__init__.py").write_text("version_info = (1, 3, 14, 'final', 0)\n")
    (fake / "pymysql").mkdir()
    (fake / "pymysql" / "__init__.py").write_text("VERSION = (0, 9, 3, None)\n")
    config = tmp_path / "astbill.yaml"
    config.write_text("database: mysql://astbill:pw@127.0.0.1:1/astbill\n"
                      "dial: PJSIP/{number}@trunk\n")
    config.chmod(0o600)
    result = subprocess.run([sys.executable, ADMIN, "-c", str(config), "calls"], text=True,
                            capture_output=True, timeout=60, env={"PYTHONPATH": str(fake)})
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "astbill-admin: no usable MySQL driver: mysqlclient 1.3.14 is too old (AstBill needs"
        " 1.4.4 or later); pymysql 0.9.3 is too old (AstBill needs 1.0 or later): install"
        " python3-mysqldb or python3-pymysql\n")


def test_pymysql_is_imported_without_ssl_which_stays_importable():
    # AstBill asks PyMySQL for no TLS; its ssl import alone is a third of PyMySQL's.
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            " from astbill.store.mysql import load_driver; load_driver('pymysql');"
            " print('ssl' in sys.modules); import ssl; print(ssl.PROTOCOL_TLS_CLIENT.name)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "lib")], text=True,
                            capture_output=True, timeout=60)
    assert result.stdout.split() == ["False", "PROTOCOL_TLS_CLIENT"], result.stderr
