"""INSTALL, followed as written, with its paths moved under a temporary root.

Every block of INSTALL (lines indented four spaces) is taken in order, on
SQLite and on MariaDB (the blocks under "SQLite:" or "MySQL/MariaDB:" for
each).  Shell commands run as root with the PATH of a fresh Debian box, in
the directory INSTALL has moved to; the asterisk user is played by nobody
(there is no asterisk user here); the SQL runs in the test's MariaDB server;
the config is edited as INSTALL tells a person to.  The test then places a
call through the installed astbill.py the way the dialplan's AGI line says,
runs the sweep the way the cron file and the systemd unit say, starts
astbill-web the way its unit does and asks it what INSTALL's curl line
asks (with the token INSTALL made), and ends with astbill-admin audit.

Not run, and why:
  apt-get install          needs the package archive; the packages it names
                           are checked to be installed instead (scripts/setup-env
                           installs them)
  asterisk -rx ...         needs a running Asterisk
  systemctl ...            needs systemd as the running init; the unit's
                           ExecStart is run as its User instead
  pjsip.conf, dialplan     Asterisk's own configuration: the call follows the
                           dialplan's AGI(...) line
  export ASTBILL_CONFIG    a line for Asterisk's environment; the dialplan's
                           -c names the config instead
  nginx, curl              nginx is not installed here: its server block is
                           checked to proxy to where the unit listens, and
                           the curl request is sent to astbill-web itself
A section about Galera is skipped whole: it needs a cluster.  Files INSTALL
tells the operator to write (a carrier's rates) the test writes, as the
operator would.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import debian
from agipeer import Scenario, agi_env, run_call
from conftest import ROOT

INSTALL = ROOT / "INSTALL"
# Where INSTALL puts things; the test puts each under its temporary root.
MOVED = ("/var/lib/asterisk/agi-bin", "/etc/astbill", "/var/lib/astbill", "/var/spool/astbill",
         "/etc/cron.d", "/etc/systemd/system", "/etc/tmpfiles.d", "/run/astbill")
# The asterisk user, as INSTALL names it, and who plays it here.
USER_WORDS = (("-u asterisk ", "-u nobody "), ("-o asterisk -g asterisk", "-o nobody -g nogroup"),
              ("chown asterisk:", "chown nobody:"))
SHELL = {"cp", "cd", "chmod", "chown", "install", "mkdir", "python3", "runuser", "systemctl",
         "asterisk"}
NOT_RUN = {"asterisk": "needs a running Asterisk", "systemctl": "needs systemd as init"}
# What the operator writes: a carrier that buys for less than the sample sells.
OPERATOR_FILES = {"/etc/astbill/carrier-a.csv": "prefix,destination,rate,connect_fee,min_secs,"
                                                "increment\n49,Germany,0.0100,0,60,60\n"}


def blocks(text):
    """(section heading, variant, lines) of each block of INSTALL, in order.

    The variant is "SQLite" or "MySQL/MariaDB" under a paragraph starting
    so (in the database section), else "".
    """
    lines = text.splitlines()
    found, heading, variant = [], "", ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and i + 1 < len(lines) and re.fullmatch(r"-{3,}|={3,}", lines[i + 1]):
            heading, variant, i = line.strip(), "", i + 2
            continue
        if line.startswith("    ") and not line.startswith("     ") and not lines[i - 1].strip():
            block = []
            while i < len(lines) and lines[i].startswith("    "):
                block.append(lines[i][4:])
                i += 1
            found.append((heading, variant, block))
            continue
        for name in ("SQLite", "MySQL/MariaDB"):
            if line.startswith(name + ":"):
                variant = name
        i += 1
    return found


class Box:
    """A Debian box with Asterisk installed, under ``root``."""

    def __init__(self, root, backend, database_url):
        self.root, self.backend, self.database_url = root, backend, database_url
        self.agi_bin = self.moved("/var/lib/asterisk/agi-bin")
        self.config = self.moved("/etc/astbill/astbill.yaml")
        self.cwd = ROOT  # INSTALL starts in the unpacked AstBill
        self.edited = False
        for path in ("/var/lib/asterisk/agi-bin", "/var/spool", "/etc/cron.d",
                     "/etc/systemd/system", "/etc/tmpfiles.d", "/run"):
            self.moved(path).mkdir(parents=True, exist_ok=True)
        for directory in [root, *root.rglob("*")]:
            directory.chmod(directory.stat().st_mode | 0o755)  # as on a real box

    def moved(self, path):
        return Path(f"{self.root}{path}")

    def adapt(self, text):
        """INSTALL's text with the paths moved and nobody for asterisk."""
        for path in MOVED:
            text = text.replace(path, f"{self.root}{path}")
        for asterisk, other in USER_WORDS:
            text = text.replace(asterisk, other)
        return text

    def shell(self, line):
        """Run one of INSTALL's command lines (already adapted), as root."""
        outside = [p for p in re.findall(r"(?<![\w.])/[\w/.-]+", line)
                   if not p.startswith(str(self.root)) and p != "/dev/null"]
        assert not outside, f"{line!r} would touch this machine's {outside}"
        if line.startswith("cd "):
            self.cwd = Path(line[3:].strip())
            return ""
        result = subprocess.run(["bash", "-c", line], cwd=self.cwd, text=True,
                                capture_output=True, timeout=300, env=debian.env(),
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"INSTALL: {line}\n{result.stdout}{result.stderr}"
        return result.stdout

    def write_operator_files(self):
        for path, text in OPERATOR_FILES.items():
            self.moved(path).write_text(text)

    def edit_config(self):
        """What INSTALL says a person edits: the paths of this box, and the
        database URL for MariaDB."""
        text = self.adapt(self.config.read_text())
        text = re.sub(r"(?m)^database: .*$", f"database: {self.database_url}", text)
        with open(self.config, "w") as f:  # in place: owner and mode stay INSTALL's
            f.write(text)
        self.edited = True

    def admin(self, *argv):
        result = subprocess.run(["runuser", "-u", "nobody", "--", str(self.agi_bin / "astbill-admin"),
                                 "-c", str(self.config), *argv], text=True, capture_output=True,
                                timeout=120, env=debian.env())
        assert result.returncode == 0, f"astbill-admin {' '.join(argv)}: {result.stderr}"
        return result.stdout


@pytest.fixture(params=["sqlite", "mariadb"])
def box(request):
    debian.require_python()
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("INSTALL is run as root; under CI this test must run")
        pytest.skip("INSTALL is run as root")
    root = Path(tempfile.mkdtemp(prefix="astbill-install-"))
    server = None
    try:
        if request.param == "sqlite":
            url = "sqlite:///var/lib/astbill/astbill.db".replace("/var", f"{root}/var", 1)
        else:
            server = request.getfixturevalue("mariadb")
            url = f"mysql://astbill:PASSWORD@127.0.0.1:{server.port}/astbill"
        box = Box(root, request.param, url)
        box.server = server
        yield box
    finally:
        if server is not None:
            server.execute("DROP DATABASE IF EXISTS astbill; DROP USER IF EXISTS astbill@'%'")
        shutil.rmtree(root)


def test_install_as_written_ends_in_a_billed_call_and_a_clean_audit(box):
    variant = {"sqlite": "SQLite", "mariadb": "MySQL/MariaDB"}[box.backend]
    agi_args = token = curl = proxied = processes = None
    for heading, block_variant, lines in blocks(INSTALL.read_text()):
        if "Galera" in heading or block_variant not in ("", variant):
            continue
        first = lines[0]
        if first.startswith("apt-get install"):
            packages = [w for w in first.split()[2:] if not w.startswith("-")]
            for package in packages:
                status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                        capture_output=True, text=True).stdout
                assert status.endswith("ok installed"), f"INSTALL's {package} is not installed"
        elif first.split()[0] in SHELL or first.startswith("./"):
            for line in lines:
                if line.split()[0] in NOT_RUN:
                    continue
                out = box.shell(box.adapt(line))
                if " token add " in line:
                    token = out.split()[-1]
                if "astbill.py" in line and "<" in line:  # the hand-run example
                    assert 'SET VARIABLE ASTBILL_COST "0.1200"' in out, out
                if box.config.exists() and not box.edited:
                    box.edit_config()
                    box.write_operator_files()
        elif first.startswith(("CREATE ", "GRANT ")):
            box.server.execute("\n".join(lines))
        elif first.startswith("prefix,destination,"):
            # The format, shown: the sample file INSTALL copies has the same columns.
            assert first.startswith((ROOT / "conf" / "rates.sample.csv").read_text().split()[0])
        elif first.startswith("server {"):
            proxied = re.search(r"proxy_pass http://([^;/]+);", "\n".join(lines)).group(1)
        elif first.startswith("curl "):
            curl = first
        elif first.startswith("[outbound]"):
            agi_args = re.search(r"AGI\(astbill\.py,?([^)]*)\)", "\n".join(lines)).group(1)
        elif first.startswith("astbill-fastagi "):
            processes = first
        elif not first.startswith(("[", "export ASTBILL_CONFIG=")):
            pytest.fail(f"INSTALL has a block this test does not know: {first!r}")
    assert box.edited and agi_args is not None

    # What INSTALL leaves for the asterisk user alone.
    for path, mode in (("/etc/astbill", 0o700), ("/etc/astbill/astbill.yaml", 0o600),
                       ("/var/spool/astbill", 0o700)):
        st = box.moved(path).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (65534, mode), path
    if box.backend == "sqlite":
        st = box.moved("/var/lib/astbill/astbill.db").stat()
        assert st.st_uid == 65534 and not st.st_mode & 0o007

    # A call, as the dialplan's AGI line runs astbill.py: as Asterisk's user.
    arguments = box.adapt(agi_args).split(",")
    block = agi_env(agi_extension="4930123456", agi_accountcode="1001",
                    **{f"agi_arg_{n}": arg for n, arg in enumerate(arguments, 1)})
    result = run_call(debian.other_user([str(box.agi_bin / "astbill.py")]),
                      Scenario(answered_ms=31_200), block, debian.env())
    assert result.returncode == 0, result.dialogue_text()
    assert (result.variables_set["ASTBILL_STATUS"], result.variables_set["ASTBILL_COST"]) == (
        "OK", "0.0280"), result.dialogue_text()

    # The sweep, as cron and systemd would run it.
    cron = [line for line in box.moved("/etc/cron.d/astbill-sweep").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert len(cron) == 1
    user, command = cron[0].split(None, 6)[5:]
    assert user == "asterisk"
    box.shell(f"runuser -u nobody -- sh -c {box.adapt(command)!r}")
    unit = box.moved("/etc/systemd/system/astbill-sweep.service").read_text()
    assert re.search(r"(?m)^User=asterisk$", unit)
    box.shell("runuser -u nobody -- " + box.adapt(re.search(r"(?m)^ExecStart=(.*)$", unit).group(1)))

    # The HTTP API, as its unit runs it, on the address nginx proxies to
    # (here a free port): INSTALL's request, with INSTALL's token.
    unit = box.moved("/etc/systemd/system/astbill-web.service").read_text()
    assert re.search(r"(?m)^User=asterisk$", unit)
    command = box.adapt(re.search(r"(?m)^ExecStart=(.*)$", unit).group(1)).split()
    assert command[-2:] == ["--listen", proxied]
    web = subprocess.Popen(["runuser", "-u", "nobody", "--", *command[:-1], "127.0.0.1:0"],
                           stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=debian.env())
    try:
        url = web.stderr.readline().split()[-1]
        header, address = re.fullmatch(r'curl -H "([^"]+)" (\S+)', curl).groups()
        name, _, value = header.replace("TOKEN", token).partition(": ")
        request = urllib.request.Request(url + urllib.parse.urlsplit(address).path,
                                         headers={name: value})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.loads(reply.read())["account"] == "1001"
    finally:
        web.terminate()
        web.wait(30)

    # FastAGI with one process per core, as INSTALL says for MariaDB; SQLite
    # keeps to one, and astbill-fastagi says so.
    command = box.adapt(f"/var/lib/asterisk/agi-bin/{processes} --listen 127.0.0.1:0").split()
    server = subprocess.Popen(debian.other_user(command), stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=debian.env())
    try:
        line = server.stderr.readline()
        if box.backend == "sqlite":
            assert server.wait(30) == 2 and "--processes 2 needs MySQL or MariaDB" in line, line
        else:
            assert re.search(r"listening on 127\.0\.0\.1:\d+ \(config .*, 2 processes,"
                             r" pinned to CPUs [\d,]+\)", line)
            time.sleep(1)   # its processes are forked
            server.send_signal(signal.SIGTERM)
            assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    # 20 + 10, less the hand-run call (0.12) and this one (0.028).
    account = json.loads(box.admin("account", "show", "1001", "--json"))
    assert account["balance"] == "29.8520"
    assert box.admin("audit").strip().endswith("audit: ok")
