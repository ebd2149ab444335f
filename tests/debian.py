"""A Debian box as INSTALL sets it up: Debian's own Python and packages,
AstBill copied where another user can run it, and that other user.

INSTALL runs AstBill on Debian's /usr/bin/python3 with python3-yaml,
python3-mysqldb and python3-pymysql (scripts/setup-env installs them);
``python3`` on a developer's PATH may be another interpreter, and the
project's .venv is not there on a real box.
"""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

PYTHON = "/usr/bin/python3"
# Module -> the Debian package that ships it.
PACKAGES = {"yaml": "python3-yaml", "MySQLdb._mysql": "python3-mysqldb",
            "pymysql": "python3-pymysql"}
DIST_PACKAGES = "/usr/lib/python3/dist-packages/"
# root's PATH on a fresh Debian box, which cron and runuser give too.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What INSTALL copies into agi-bin.
PROGRAM = ("astbill.py", "astbill-admin", "lib", "sql", "conf")


# What astbill-web needs besides.
WEB_PACKAGES = {"flask": "python3-flask", "waitress": "python3-waitress"}


def require_python(packages=PACKAGES):
    """Debian's interpreter, once its ``packages`` are found in Debian's own
    directory; a failure under CI (nothing may be skipped there), else a skip."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]: print(importlib.import_module(name).__file__)\n")
    try:
        result = subprocess.run([PYTHON, "-I", "-c", code, *packages], capture_output=True,
                                text=True, timeout=60, env=env())
        found = result.stdout.split() if result.returncode == 0 else []
    except OSError:
        found = []
    if len(found) != len(packages) or not all(f.startswith(DIST_PACKAGES) for f in found):
        why = (f"{PYTHON} with Debian's {' '.join(packages.values())} is needed"
               " (scripts/setup-env --with-mariadb installs them)")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return PYTHON


def env(**extra):
    """A process environment as on a Debian box: no virtualenv, no PYTHON* variables."""
    return {"PATH": PATH, "LANG": "C.UTF-8", **extra}


def install_program(directory):
    """Copy AstBill's program files into ``directory``, as INSTALL does."""
    for name in PROGRAM:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, directory / name)


def other_user(cmd):
    """``cmd`` run as a user who owns none of the test's files: for root,
    whom no permission bit stops, that is ``nobody`` (setpriv keeps the
    process id, so signals reach the program itself); anyone else runs it
    as themselves, and the test's modes deny the owner too."""
    if os.geteuid() != 0:
        return list(cmd)
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *cmd]


def other_user_name():
    """How AstBill names the user other_user() runs as: 'uid N (name)'."""
    import pwd
    uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
    return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
