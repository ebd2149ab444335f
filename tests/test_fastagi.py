"""astbill-fastagi: the real server process on a free port, calls played
over real TCP connections by the Asterisk 20 peer (agipeer's socket mode),
on SQLite and on MariaDB through both drivers."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal

import pytest

from agipeer import Scenario, fastagi_env, run_fastagi_call, start_fastagi_call
from conftest import ROOT, OverdraftWatch, invariants
from test_failures import sweep_later, take_database_down, unreachable

SERVER = str(ROOT / "astbill-fastagi")
D10 = {"1001": Decimal("10")}


def until(condition, timeout):
    """Whether ``condition()`` came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class Server:
    """One astbill-fastagi process, its stderr collected line by line."""

    def __init__(self, billing, processes=1, args=(), cpus=None):
        """``cpus``: the CPUs it may run on (taskset), if not the test's."""
        self.billing = billing
        self.proc = subprocess.Popen([sys.executable, SERVER, "-c", str(billing.config),
                                      "--listen", "127.0.0.1:0", "--processes", str(processes),
                                      *args],
                                     stderr=subprocess.PIPE, text=True, env=billing.env,
                                     preexec_fn=cpus and (lambda: os.sched_setaffinity(0, cpus)))
        self.lines = []
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.listening.wait(30), self.log()
        self.address = ("127.0.0.1", self.port)
        # The listening line is written before the forks.
        assert processes == 1 or until(lambda: len(self.children()) >= processes, 10), self.log()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            found = re.search(r"listening on [\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self.listening.set()

    def log(self):
        return "\n".join(self.lines)

    def wait_for(self, pattern, timeout=20):
        return until(lambda: any(re.search(pattern, line) for line in self.lines), timeout)

    def call(self, scenario=None, number="4912345678", account="1001", script="astbill",
             **env):
        block = fastagi_env(script, port=self.port, agi_extension=number,
                            agi_accountcode=account, **env)
        result = run_fastagi_call(self.address, scenario, block)
        result.uniqueid = block["agi_uniqueid"]
        return result

    def start(self, scenario, number="4912345678", account="1001"):
        block = fastagi_env(port=self.port, agi_extension=number, agi_accountcode=account)
        handle = start_fastagi_call(self.address, scenario, block, 60)
        handle.uniqueid = block["agi_uniqueid"]
        return handle

    def children(self):
        """The pids of the processes the server forked (--processes)."""
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        found.append(int(entry))
            except (OSError, ValueError):
                pass
        return sorted(found)

    def stop(self):
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(tariff):
    s = Server(tariff)
    yield s
    s.stop()


@pytest.fixture
def servers(tariff):
    """Starts a server on ``tariff`` as it is configured then; each one
    started is stopped after the test."""
    started = []

    def start():
        started.append(Server(tariff))
        return started[-1]
    yield start
    for s in started:
        s.stop()


def held_in_its_dial(server, answered_ms=61_000):
    """A call that stays in its Dial until the returned gate is set."""
    gate = threading.Event()
    call = server.start(Scenario(dial_gate=gate, answered_ms=answered_ms))
    assert call.dial_reached.wait(30)
    return call, gate


def left_to_the_sweep(tariff, call, policy, state, balance):
    """``call`` is as a killed per-call script leaves it: reserved, its CDR
    active, until a later sweep settles it by ``policy``."""
    assert "ASTBILL_COST" not in call.wait().variables_set
    assert tariff.reservations() == [(call.uniqueid,)]
    assert tariff.cdr(call.uniqueid)["state"] == "active"
    assert tariff.sweep() == []                # may still be up
    done = sweep_later(tariff)
    assert [(d["uniqueid"], d["action"]) for d in done] == [(call.uniqueid, policy + "d")]
    assert tariff.cdr(call.uniqueid)["state"] == state
    assert tariff.balance("1001") == Decimal(balance)
    invariants(tariff, D10)


def billed(tariff, result, billsec, cost, balance):
    text = result.dialogue_text()
    assert result.returncode == 0, text           # the server closed the connection
    assert result.variables_set["ASTBILL_STATUS"] == "OK", text
    assert (result.variables_set["ASTBILL_BILLSEC"], result.variables_set["ASTBILL_COST"]) == (
        str(billsec), cost), text
    assert tariff.balance("1001") == Decimal(balance)
    cdr = tariff.cdr(result.uniqueid)
    assert (cdr["billsec"], cdr["cost"], cdr["state"]) == (billsec, Decimal(cost), "settled")


def test_an_answered_call_is_billed_over_fastagi(tariff, server):
    result = server.call(Scenario(answered_ms=61_500))
    billed(tariff, result, 62, "0.1200", "9.88")
    assert result.dial_args == "PJSIP/4912345678@trunk,60,L(3600000)"
    assert server.wait_for(rf"astbill: {re.escape(result.uniqueid)} settled: 62s, cost 0.1200")
    second = server.call(Scenario(answered_ms=1_000))     # the kept session serves again
    billed(tariff, second, 1, "0.0600", "9.82")
    invariants(tariff, D10)


@pytest.mark.parametrize("agisighup", [True, False], ids=["hangup-line", "agisighup-no"])
def test_a_caller_hangup_mid_dial_is_billed_its_real_talk_time(tariff, server, agisighup):
    result = server.call(Scenario(answered_ms=4004, caller_hangup=True, agisighup=agisighup),
                         number="4915123456")
    assert ("AST", "HANGUP") in result.dialogue or not agisighup
    billed(tariff, result, 5, "0.0100", "9.99")
    invariants(tariff, D10)


@pytest.mark.parametrize("dialstatus", ["BUSY", "NOANSWER"])
def test_unanswered_calls_cost_nothing(tariff, server, dialstatus):
    result = server.call(Scenario(dialstatus=dialstatus))
    billed(tariff, result, 0, "0.0000", "10")
    assert tariff.cdr(result.uniqueid)["disposition"] in ("BUSY", "NO ANSWER")
    invariants(tariff, D10)


def test_failover_over_trunks(tariff):
    from test_routing import BUY, HEADER
    for name, rates in BUY.items():
        tariff.admin_ok("trunk", "add", name, "--dial", f"SIP/{name}/{{number}}")
        path = tariff.path / f"{name}.csv"
        path.write_text(HEADER + rates)
        tariff.admin_ok("rate", "import", str(path), "--trunk", name)
    server = Server(tariff)
    try:
        result = server.call(Scenario(earlier_dials=("CHANUNAVAIL", "CONGESTION"),
                                      answered_ms=61_000))
    finally:
        server.stop()
    dials = [c for c in result.commands if c.startswith("EXEC Dial")]
    assert [d.split()[2].strip('"').split(",")[0] for d in dials] == [
        "SIP/carrier-c/4912345678", "SIP/carrier-a/4912345678", "SIP/carrier-b/4912345678"]
    assert result.variables_set["ASTBILL_TRUNK"] == "carrier-b"
    billed(tariff, result, 61, "0.1200", "9.88")


def test_refusals_over_fastagi(tariff, server):
    tariff.admin_ok("account", "add", "poor", "--balance", "0")
    assert server.call(Scenario(), account="poor").variables_set["ASTBILL_STATUS"] == "NOFUNDS"
    assert server.call(Scenario(), number="819012345").variables_set["ASTBILL_STATUS"] == "NORATE"
    tariff.admin_ok("account", "set", "1001", "--max-calls", "1")
    held, gate = held_in_its_dial(server, answered_ms=1000)
    assert server.call(Scenario()).variables_set["ASTBILL_STATUS"] == "MAXCALLS"
    gate.set()
    assert held.wait().variables_set["ASTBILL_COST"] == "0.0600"
    tariff.admin_ok("trunk", "add", "only-us", "--dial", "SIP/us/{number}")
    path = tariff.path / "us.csv"
    path.write_text("prefix,destination,rate,connect_fee,min_secs,increment\n1,USA,0.001,0,1,1\n")
    tariff.admin_ok("rate", "import", str(path), "--trunk", "only-us")
    refused = server.call(Scenario())
    assert refused.variables_set["ASTBILL_STATUS"] == "NOROUTE", refused.dialogue_text()
    assert server.wait_for("astbill: NOROUTE no trunk carries 4912345678")
    invariants(tariff, {"1001": Decimal("10"), "poor": Decimal("0")})


def test_a_profile_names_a_config_beside_the_servers(tariff, server):
    profile = tariff.path / "cheap.yaml"
    profile.write_text(tariff.config.read_text() + "dial: \"SIP/cheap/{number}\"\n"
                       if "dial:" not in tariff.config.read_text() else
                       re.sub(r"(?m)^dial: .*$", "dial: SIP/cheap/{number}", tariff.config.read_text()))
    result = server.call(Scenario(answered_ms=1000), script="astbill/cheap")
    assert result.dial_args.startswith("SIP/cheap/4912345678,"), result.dialogue_text()
    bad = server.call(Scenario(), script="astbill/../etc")
    assert bad.variables_set["ASTBILL_STATUS"] == "ERROR" and bad.dial_args is None
    assert "is not a plain word" in bad.verbose[-1]


def test_an_outage_at_authorization_is_refused(tariff, server):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), lock_wait_secs=2)
    result = server.call(Scenario(answered_ms=1000))
    assert result.variables_set["ASTBILL_STATUS"] == "ERROR" and result.dial_args is None
    tariff.write_config(database=good)
    assert server.call(Scenario(answered_ms=1000)).variables_set["ASTBILL_COST"] == "0.0600"


def test_an_outage_at_settlement_is_spooled_then_replayed(tariff, server, request):
    call, gate = held_in_its_dial(server)
    restore = take_database_down(tariff, request)
    gate.set()
    result = call.wait()
    restore()
    assert "ASTBILL_COST" not in result.variables_set
    assert "settlement spooled to" in result.verbose[-1], result.dialogue_text()
    # The next call reconnects (no restart) and its replay settles the spooled one.
    assert server.call(Scenario(answered_ms=1000)).variables_set["ASTBILL_COST"] == "0.0600"
    deadline = time.monotonic() + 20     # the replay runs after the reply, off the call's path
    while list(tariff.spool.glob("*.call")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tariff.spool.glob("*.call")) == []
    assert tariff.balance("1001") == Decimal("9.82")
    invariants(tariff, D10)


MARIADB_ONLY = pytest.mark.parametrize("billing", ["mariadb", "mariadb-pymysql"], indirect=True)


def server_connections(mariadb, tariff):
    """The ids of the connections open on ``tariff``'s database."""
    name = tariff.settings["database"].rsplit("/", 1)[1]
    return mariadb.execute("SELECT id FROM information_schema.processlist"
                           f" WHERE db = '{name}'").split()


def pings(mariadb):
    status = mariadb.execute("SHOW GLOBAL STATUS LIKE 'Com_admin_commands'")
    return int(status.split()[1])


@MARIADB_ONLY
def test_back_to_back_calls_send_no_ping(tariff, server, mariadb):
    server.call(Scenario(answered_ms=1000))
    before = pings(mariadb)
    for _ in range(3):
        assert server.call(Scenario(answered_ms=1000)).variables_set["ASTBILL_COST"] == "0.0600"
    # Its kept connection answered a moment ago: no round trip to check it.
    assert pings(mariadb) == before
    time.sleep(1.2)
    server.call(Scenario(answered_ms=1000))
    assert pings(mariadb) > before     # after a second of silence it is checked again


@MARIADB_ONLY
def test_a_call_takes_eight_round_trips_to_the_database(tariff, server, mariadb):
    """Statements whose results are not read wait for the next one or the
    COMMIT: 15 statements in 8 round trips (2 to price, 2 to authorize --
    START TRANSACTION with the row lock, the writes with the COMMIT -- and
    4 to settle)."""
    server.call(Scenario(answered_ms=1000))     # the server's session is open and kept
    ids = ",".join(server_connections(mariadb, tariff))
    mariadb.execute("SET GLOBAL log_output = 'TABLE'; TRUNCATE mysql.general_log;"
                    " SET GLOBAL general_log = 1")
    try:
        assert server.call(Scenario(answered_ms=1000)).variables_set["ASTBILL_COST"] == "0.0600"
    finally:
        mariadb.execute("SET GLOBAL general_log = 0")
    trips, statements = mariadb.execute(
        "SELECT COUNT(*), SUM(1 + LENGTH(argument) - LENGTH(REPLACE(argument, ';', '')))"
        f" FROM mysql.general_log WHERE command_type = 'Query' AND thread_id IN ({ids})").split()
    assert (int(trips), int(statements)) == (8, 15)
    assert tariff.balance("1001") == Decimal("9.88")
    invariants(tariff, D10)


@MARIADB_ONLY
def test_a_kept_connection_the_database_closed_is_replaced_within_the_call(
        tariff, server, mariadb):
    assert server.call(Scenario(answered_ms=1000)).variables_set["ASTBILL_COST"] == "0.0600"
    killed = server_connections(mariadb, tariff)
    assert killed
    for connection in killed:
        mariadb.execute(f"KILL CONNECTION {connection}")
    # At once, so that it is handed out unpinged: its first statement fails,
    # and the call runs again on a new connection.
    result = server.call(Scenario(answered_ms=1000))
    assert result.variables_set["ASTBILL_COST"] == "0.0600", result.dialogue_text()
    assert tariff.balance("1001") == Decimal("9.88")
    assert not set(killed) & set(server_connections(mariadb, tariff))
    invariants(tariff, D10)


def test_a_repeated_uniqueid_is_refused(tariff, server):
    first = server.call(Scenario(answered_ms=61_000))
    again = server.call(Scenario(answered_ms=61_000), agi_uniqueid=first.uniqueid)
    assert again.variables_set["ASTBILL_STATUS"] == "ERROR" and again.dial_args is None
    assert tariff.balance("1001") == Decimal("9.88")


def test_garbled_input_costs_nothing_and_is_logged_once(tariff, server):
    for junk in (b"this is not agi\n\n", b"agi_network: yes\n" + b"agi_x: " + b"y" * 9000 + b"\n",
                 b"agi_network: yes\n" + b"".join(b"agi_arg_%d: x\n" % i for i in range(1, 9000))):
        with socket.create_connection(server.address) as sock:
            sock.sendall(junk)
            sock.settimeout(10)
            assert sock.recv(100) == b""          # closed, nothing asked of Asterisk
    assert server.wait_for("not an AGI environment line")
    assert server.wait_for("AGI line too long")
    assert server.wait_for("AGI environment longer than")
    # A garbled reply before the Dial: the reservation is released.
    block = fastagi_env(port=server.port, agi_accountcode="1001", agi_extension="4912345678")
    with socket.create_connection(server.address) as sock:
        sock.sendall("".join(f"{k}: {v}\n" for k, v in block.items()).encode() + b"\n")
        f = sock.makefile("rb")
        f.readline()                               # the channel read
        sock.sendall(b"garbage\n")
        sock.settimeout(10)
        while f.readline():
            sock.sendall(b"200 result=1\n")
    assert tariff.query("SELECT COUNT(*) FROM astcdr") == [(0,)]
    assert tariff.balance("1001") == Decimal("10") and tariff.reservations() == []


def test_a_connection_from_elsewhere_is_closed_unread(tariff):
    tariff.write_config(fastagi_allow=["10.0.0.0/8"])
    server = Server(tariff)
    try:
        with socket.create_connection(server.address) as sock:
            sock.settimeout(10)
            assert sock.recv(100) == b""
        assert server.wait_for("connection from 127.0.0.1 closed: not in fastagi_allow")
        assert not any("astbill:" in line for line in server.lines)
    finally:
        server.stop()


def test_a_call_over_the_bound_gets_error_at_once_and_an_idle_client_is_dropped(tariff):
    tariff.write_config(fastagi_max_calls=1, fastagi_idle_secs=1)
    server = Server(tariff)
    try:
        held, gate = held_in_its_dial(server, answered_ms=1000)
        started = time.monotonic()
        over = server.call(Scenario())
        assert time.monotonic() - started < 3
        assert over.variables_set == {"ASTBILL_STATUS": "ERROR", "ASTBILL_CAUSE": "38"}
        assert over.dial_args is None
        assert server.wait_for(r"1 calls in progress already \(fastagi_max_calls\)")
        # Refused before anything was read: nothing reserved, no CDR, no charge.
        assert tariff.reservations() == [(held.uniqueid,)]
        assert tariff.cdr(over.uniqueid) is None
        gate.set()
        assert held.wait().variables_set["ASTBILL_COST"] == "0.0600"
        assert [c["uniqueid"] for c in invariants(tariff, D10)] == [held.uniqueid]
        with socket.create_connection(server.address) as sock:
            started = time.monotonic()
            sock.settimeout(10)
            assert sock.recv(100) == b""
            assert time.monotonic() - started < 5
        assert server.wait_for("no complete AGI environment within 1s")
        server.proc.send_signal(signal.SIGUSR1)
        assert server.wait_for("calls in progress 0, served 1, refused 1, errors 1")
    finally:
        server.stop()


def test_a_killed_server_leaves_the_call_to_the_sweep(tariff, server):
    call, gate = held_in_its_dial(server)
    server.proc.kill()
    server.proc.wait()
    gate.set()
    call.wait()
    assert tariff.reservations() == [(call.uniqueid,)]
    tariff.backdate(2 * 3600)
    assert [d["uniqueid"] for d in tariff.sweep()] == [call.uniqueid]
    invariants(tariff, D10)


@pytest.mark.parametrize("policy, state, balance", [
    ("release", "released", "10"), ("charge", "charged", "6.4")])
def test_a_second_sigterm_exits_at_once_and_leaves_the_call_to_the_sweep(
        tariff, servers, policy, state, balance):
    tariff.write_config(sweep_policy=policy)
    server = servers()
    call, gate = held_in_its_dial(server)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_for("SIGTERM: not accepting")
    stopped = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 1
    assert time.monotonic() - stopped < 5
    assert server.wait_for("second SIGTERM: exiting now, 1 calls in progress left to the sweep")
    gate.set()
    left_to_the_sweep(tariff, call, policy, state, balance)


@pytest.mark.parametrize("billing", ["sqlite"], indirect=True)   # the same clock on every backend
def test_calls_still_up_at_the_drain_deadline_are_left_to_the_sweep(tariff, servers):
    from astbill.config import load
    from astbill.main.fastagi import call_timeout, drain_bound
    # The shortest bound there is: a call may ring 1 s, talk 1 s and settle.
    tariff.write_config(max_call_secs=1, ring_timeout=1, lcr_max_trunks=1, lock_wait_secs=1)
    settings = load(str(tariff.config))
    bound = drain_bound(settings)
    assert bound < call_timeout(settings)      # the call's own socket timeout is not what ends it
    server = servers()
    call, gate = held_in_its_dial(server)      # an Asterisk whose Dial outlasts its limit
    server.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert server.proc.wait(bound + 30) == 1
    assert bound - 1 < time.monotonic() - stopped < bound + 10
    assert server.wait_for("drain deadline passed, 1 calls in progress left to the sweep")
    gate.set()
    left_to_the_sweep(tariff, call, "release", "released", "10")


def test_sigterm_drains_a_call_in_progress(tariff, server):
    call, gate = held_in_its_dial(server)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_for("SIGTERM: not accepting")
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=2).close()
    assert server.proc.poll() is None          # still up for the call
    gate.set()
    result = call.wait()
    result.uniqueid = call.uniqueid
    billed(tariff, result, 61, "0.1200", "9.88")
    assert server.proc.wait(30) == 0
    invariants(tariff, D10)


def a_hundred_calls_on_one_account(tariff, servers):
    """100 calls at once on an account whose balance covers 25 of them at
    their longest, turn about through ``servers``: at no sampled moment is
    more reserved than the balance, exactly 25 are granted, and the books
    balance.  Which server's calls win the money is a race, never decided."""
    tariff.write_config(max_call_secs=120)
    balance, reserved_each = Decimal("3.00"), Decimal("0.12")   # 120 s at 0.06 a minute
    tariff.admin_ok("account", "add", "pool", "--balance", str(balance))
    gate = threading.Event()
    calls = [servers[i % len(servers)].start(
        Scenario(dial_gate=gate, answered_ms=30_000 + 300 * i), account="pool")
        for i in range(100)]
    watch = OverdraftWatch(tariff)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(c.dial_reached.is_set() or c.finished
                                                  for c in calls):
        time.sleep(0.1)
    gate.set()      # every call is in its Dial or refused: all were up at once
    results = [c.wait() for c in calls]
    assert watch.stop() == []
    statuses = [r.variables_set.get("ASTBILL_STATUS") for r in results]
    assert set(statuses) <= {"OK", "NOFUNDS"}, statuses
    assert statuses.count("OK") == balance / reserved_each
    cdrs = invariants(tariff, {"1001": Decimal("10"), "pool": balance})
    assert sorted(c["uniqueid"] for c in cdrs) == sorted(
        c.uniqueid for c, s in zip(calls, statuses) if s == "OK")


def test_a_hundred_simultaneous_calls_never_overspend(tariff, server):
    a_hundred_calls_on_one_account(tariff, [server])


@pytest.mark.parametrize("billing", ["mariadb", "mariadb-pymysql"], indirect=True)
def test_a_hundred_calls_through_two_servers_on_one_database_never_overspend(tariff, servers):
    a_hundred_calls_on_one_account(tariff, [servers(), servers()])


@pytest.fixture
def two_processes(tariff):
    s = Server(tariff, processes=2)
    yield s
    s.stop()


@MARIADB_ONLY
def test_a_hundred_calls_through_two_processes_never_overspend(tariff, two_processes):
    assert len(two_processes.children()) == 2
    a_hundred_calls_on_one_account(tariff, [two_processes])


@pytest.mark.parametrize("argv, words", [
    (["--processes", "0"], "usage: astbill-fastagi"),
    (["--processes", "65"], "(N from 1 to 64)"),
    (["--processes", "two"], "usage: astbill-fastagi"),
    (["--processes"], "usage: astbill-fastagi")])
def test_a_bad_number_of_processes_is_refused_in_one_line(tariff, argv, words):
    done = subprocess.run([sys.executable, SERVER, "-c", str(tariff.config), *argv],
                          capture_output=True, text=True, env=tariff.env, timeout=30)
    assert (done.returncode, done.stdout) == (2, "")
    assert len(done.stderr.splitlines()) == 1 and words in done.stderr, done.stderr


@pytest.mark.parametrize("billing", ["sqlite"], indirect=True)
def test_sqlite_is_served_by_one_process(tariff):
    done = subprocess.run([sys.executable, SERVER, "-c", str(tariff.config), "--listen",
                           "127.0.0.1:0", "--processes", "2"],
                          capture_output=True, text=True, env=tariff.env, timeout=30)
    assert (done.returncode, done.stderr) == (2, (
        "astbill-fastagi: --processes 2 needs MySQL or MariaDB: on SQLite one process's"
        " threads take turns for the file's lock\n"))


def cpus_of(pid):
    """The CPUs each thread of process ``pid`` may run on, as one set of sets."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


ALLOWED = sorted(os.sched_getaffinity(0))
# With one CPU a server is on it whatever it does: nothing to see.
TWO_CPUS = pytest.mark.skipif(len(ALLOWED) < 2, reason="one CPU: nothing to keep to")


def pinned(server, processes, cpus):
    """Each of the server's processes keeps to one CPU, every thread of it
    (the workers too, once a call has been served): the CPUs it may run
    on, from the highest down, in turn."""
    assert server.call(Scenario()).variables_set["ASTBILL_STATUS"] == "OK"
    serving = server.children() if processes > 1 else [server.proc.pid]
    allowed = sorted(cpus, reverse=True)
    planned = [allowed[index % len(allowed)] for index in range(processes)]
    expected = sorted(planned)

    def kept():
        found = [cpus_of(pid) for pid in serving]
        return (all(len(threads) == 1 and len(next(iter(threads))) == 1 for threads in found)
                and sorted(min(next(iter(threads))) for threads in found) == expected)
    # A forked process may not have reached its CPU yet when the call is served.
    assert until(kept, 10), [cpus_of(pid) for pid in serving]
    assert server.wait_for(r"pinned to CPUs? " + ",".join(map(str, planned)) + r"\)$")


@TWO_CPUS
def test_the_server_keeps_to_one_cpu(tariff):
    server = Server(tariff)
    try:
        pinned(server, 1, ALLOWED)
    finally:
        server.stop()


def test_the_server_keeps_to_the_cpus_it_is_given(tariff):
    # Not the highest, which it would take if it looked past what it is given.
    given = {ALLOWED[0]}
    server = Server(tariff, cpus=given)
    try:
        pinned(server, 1, given)
    finally:
        server.stop()


@TWO_CPUS
@MARIADB_ONLY
def test_each_process_keeps_to_a_cpu_of_its_own_in_turn(tariff):
    server = Server(tariff, processes=2)
    try:
        pinned(server, 2, ALLOWED)
    finally:
        server.stop()
    # More processes than CPUs: they share them in turn.
    given = {ALLOWED[0]}
    server = Server(tariff, processes=2, cpus=given)
    try:
        pinned(server, 2, given)
    finally:
        server.stop()


@TWO_CPUS
def test_no_pin_leaves_the_server_to_the_scheduler(tariff):
    server = Server(tariff, args=["--no-pin"])
    try:
        assert server.call(Scenario()).variables_set["ASTBILL_STATUS"] == "OK"
        assert cpus_of(server.proc.pid) == {frozenset(ALLOWED)}
        assert "pinned" not in server.log()
    finally:
        server.stop()


def test_a_cpu_it_cannot_keep_to_is_said_on_the_listening_line():
    from astbill.main.fastagi import listening
    from astbill.main.prefork import keep_to
    before = os.sched_getaffinity(0)
    problem = keep_to(ALLOWED[-1] + 4096)   # no such CPU
    assert os.sched_getaffinity(0) == before
    assert problem == (f"cannot keep to CPU {ALLOWED[-1] + 4096}: Invalid argument; left to the"
                       " scheduler")
    assert listening("127.0.0.1", 4573, "/etc/astbill/astbill.yaml", 1, [9], problem) == (
        "astbill-fastagi: listening on 127.0.0.1:4573 (config /etc/astbill/astbill.yaml;"
        f" {problem})")
    assert listening("127.0.0.1", 4573, "/etc/astbill/astbill.yaml", 2, [1, 0]) == (
        "astbill-fastagi: listening on 127.0.0.1:4573 (config /etc/astbill/astbill.yaml,"
        " 2 processes, pinned to CPUs 1,0)")


@MARIADB_ONLY
def test_the_bound_counts_the_calls_of_every_process(tariff):
    tariff.write_config(fastagi_max_calls=2)
    server = Server(tariff, processes=2)
    try:
        held = [held_in_its_dial(server, answered_ms=1000) for _ in range(2)]
        # Whichever process takes them, a third call is one too many.
        for _ in range(3):
            over = server.call(Scenario())
            assert over.variables_set == {"ASTBILL_STATUS": "ERROR", "ASTBILL_CAUSE": "38"}
        server.proc.send_signal(signal.SIGUSR1)
        assert server.wait_for("astbill-fastagi: calls in progress 2, served 0, refused 3,"
                               " errors 0"), server.log()
        for call, gate in held:
            gate.set()
            assert call.wait().variables_set["ASTBILL_COST"] == "0.0600"
        assert server.call(Scenario(answered_ms=1000)).variables_set["ASTBILL_COST"] == "0.0600"
        server.proc.send_signal(signal.SIGUSR1)
        assert server.wait_for("calls in progress 0, served 3, refused 3, errors 0"), server.log()
        invariants(tariff, D10)
    finally:
        server.stop()


def held_in_each_process(server):
    """A call held in its Dial in each of the server's processes: while the
    others are stopped (SIGSTOP), one of them takes the connection."""
    held, pids = [], server.children()
    for serving in pids:
        others = [pid for pid in pids if pid != serving]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            held.append(held_in_its_dial(server))
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)
    return held


@MARIADB_ONLY
def test_sigterm_drains_the_calls_of_every_process(tariff, two_processes):
    held = held_in_each_process(two_processes)
    two_processes.proc.send_signal(signal.SIGTERM)
    for n in (1, 2):
        assert two_processes.wait_for(f"process {n} of 2: SIGTERM: not accepting; waiting for"
                                      " 1 calls in progress"), two_processes.log()
    with pytest.raises(OSError):
        socket.create_connection(two_processes.address, timeout=2).close()
    for call, gate in held:
        gate.set()
        result = call.wait()
        assert result.variables_set["ASTBILL_COST"] == "0.1200", result.dialogue_text()
    assert two_processes.proc.wait(30) == 0
    assert two_processes.lines[-1] == (
        f"astbill-fastagi: calls in progress 0, served {len(held)}, refused 0, errors 0")
    assert tariff.balance("1001") == Decimal("10") - len(held) * Decimal("0.12")
    invariants(tariff, D10)


@MARIADB_ONLY
def test_a_second_sigterm_leaves_the_calls_of_every_process_to_the_sweep(tariff, two_processes):
    held = held_in_each_process(two_processes)
    two_processes.proc.send_signal(signal.SIGTERM)
    assert two_processes.wait_for("process 2 of 2: SIGTERM: not accepting")
    assert two_processes.wait_for("process 1 of 2: SIGTERM: not accepting")
    two_processes.proc.send_signal(signal.SIGTERM)
    assert two_processes.proc.wait(10) == 1
    left = sum(int(re.search(r"exiting now, (\d+) calls", line).group(1))
               for line in two_processes.lines if "second SIGTERM: exiting now" in line)
    assert left == len(held), two_processes.log()
    for call, gate in held:
        gate.set()
        assert "ASTBILL_COST" not in call.wait().variables_set
    assert len(tariff.reservations()) == len(held)
    done = sweep_later(tariff)
    assert sorted(d["uniqueid"] for d in done) == sorted(c.uniqueid for c, _ in held)
    assert tariff.balance("1001") == Decimal("10")      # released: the default policy
    invariants(tariff, D10)


@MARIADB_ONLY
def test_a_killed_process_is_replaced_and_its_call_left_to_the_sweep(tariff, two_processes):
    first = two_processes.children()
    call, gate = held_in_its_dial(two_processes)
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    assert two_processes.wait_for("process 1 of 2 was killed by SIGKILL; its calls in"
                                  " progress are left to the sweep; starting it again")
    assert two_processes.wait_for("process 2 of 2 was killed by SIGKILL")
    gate.set()
    assert "ASTBILL_COST" not in call.wait().variables_set
    # Two new processes, none of the killed ones.
    assert until(lambda: len(two_processes.children()) == 2
                 and not set(two_processes.children()) & set(first), 20)
    # The new processes serve; the old call waits for the sweep.
    result = two_processes.call(Scenario(answered_ms=1000))
    assert result.variables_set["ASTBILL_COST"] == "0.0600", result.dialogue_text()
    assert tariff.reservations() == [(call.uniqueid,)]
    assert [d["uniqueid"] for d in sweep_later(tariff)] == [call.uniqueid]
    invariants(tariff, D10)


def test_sigusr1_again_and_again_under_load_stops_nothing(tariff):
    sigusr1_under_load(tariff, processes=1)


@MARIADB_ONLY
def test_sigusr1_again_and_again_to_every_process_under_load_stops_nothing(tariff):
    sigusr1_under_load(tariff, processes=2)


def sigusr1_under_load(tariff, processes):
    """The counts line is written by a signal handler, which runs in the
    thread it interrupts -- perhaps one holding the counts' locks: it
    reads them without.  SIGUSR1 to every process (systemctl kill -s USR1)
    200 times while 20 clients call: every call is billed, and SIGTERM
    then drains."""
    tariff.admin_ok("account", "add", "load", "--balance", "100000")
    server = Server(tariff, processes=processes)
    stop, results = threading.Event(), []

    def caller():
        while not stop.is_set():
            results.append(server.call(Scenario(answered_ms=1000), account="load"))
    try:
        callers = [threading.Thread(target=caller) for _ in range(20)]
        for t in callers:
            t.start()
        for _ in range(200):
            for pid in [server.proc.pid] + server.children():
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.02)
        stop.set()
        for t in callers:
            t.join(60)
        assert not any(t.is_alive() for t in callers), server.log()
        assert len(results) > 50
        assert all(r.variables_set.get("ASTBILL_COST") == "0.0600" for r in results)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert server.lines[-1] == (f"astbill-fastagi: calls in progress 0, served"
                                    f" {len(results)}, refused 0, errors 0")
        invariants(tariff, {"1001": Decimal("10"), "load": Decimal("100000")})
    finally:
        stop.set()
        server.stop()


@MARIADB_ONLY
def test_one_sigterm_to_every_process_drains_them(tariff, two_processes):
    """systemctl stop sends SIGTERM to every process of the unit, and the
    first passes its own on as well: a process drains however many it gets."""
    held = held_in_each_process(two_processes)
    for pid in [two_processes.proc.pid] + two_processes.children():
        os.kill(pid, signal.SIGTERM)
    for n in (1, 2):
        assert two_processes.wait_for(f"process {n} of 2: SIGTERM: not accepting")
    time.sleep(0.5)
    assert two_processes.proc.poll() is None
    for call, gate in held:
        gate.set()
        assert call.wait().variables_set["ASTBILL_COST"] == "0.1200"
    assert two_processes.proc.wait(30) == 0
    assert "second SIGTERM" not in two_processes.log()
    assert tariff.reservations() == []
    invariants(tariff, D10)


@MARIADB_ONLY
def test_a_sigterm_while_a_process_is_being_replaced_forks_none(tariff, two_processes):
    first, _ = two_processes.children()
    os.kill(first, signal.SIGKILL)      # died young: forked again after a pause
    assert two_processes.wait_for("was killed by SIGKILL")
    two_processes.proc.send_signal(signal.SIGTERM)      # within the pause
    assert two_processes.proc.wait(30) == 0, two_processes.log()
    assert "Error" not in two_processes.log()


@pytest.mark.parametrize("billing", ["sqlite"], indirect=True)
def test_a_signal_right_after_the_listening_line_is_handled(tariff):
    """The line says the server is up: its signal handlers are in place."""
    for _ in range(10):
        server = Server(tariff)
        try:
            server.proc.send_signal(signal.SIGUSR1)
            assert server.wait_for("calls in progress 0, served 0"), server.log()
            assert server.proc.poll() is None
        finally:
            server.stop()


def test_a_process_the_system_cannot_fork_yet_is_tried_again(monkeypatch, capsys):
    from astbill.main import prefork
    real_fork, failures = os.fork, [OSError(11, "Resource temporarily unavailable")]

    def fork():
        if failures:
            raise failures.pop()
        return real_fork()
    monkeypatch.setattr(prefork.os, "fork", fork)
    monkeypatch.setattr(prefork, "RESPAWN_PAUSE_SECS", 0.01)
    children = {}
    prefork._fork(children, 0, lambda index: 7, [])
    [(pid, (index, _))] = children.items()
    assert index == 0 and os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
    assert ("astbill-fastagi: cannot start process 1: Resource temporarily unavailable"
            in capsys.readouterr().err)


@MARIADB_ONLY
def test_when_the_parent_is_killed_its_processes_settle_their_calls_and_end(
        tariff, two_processes):
    children = two_processes.children()
    call, gate = held_in_its_dial(two_processes)
    two_processes.proc.kill()
    two_processes.proc.wait()
    assert two_processes.wait_for("process 1 of 2: the parent process is gone")
    assert two_processes.wait_for("process 2 of 2: the parent process is gone")
    with pytest.raises(OSError):
        socket.create_connection(two_processes.address, timeout=2).close()
    gate.set()
    result = call.wait()
    result.uniqueid = call.uniqueid
    billed(tariff, result, 61, "0.1200", "9.88")
    assert until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), 30)
    invariants(tariff, D10)


@pytest.mark.parametrize("billing", ["sqlite"], indirect=True)   # one writer at a time there
def test_a_hundred_writers_in_one_server_take_turns_and_none_is_refused_busy(tariff, server):
    tariff.write_config(lock_wait_secs=1)
    tariff.admin_ok("account", "add", "busy", "--balance", "1000")
    results = []

    def client():
        for _ in range(3):
            results.append(server.call(Scenario(answered_ms=1000), account="busy"))
    clients = [threading.Thread(target=client) for _ in range(100)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    statuses = [r.variables_set.get("ASTBILL_STATUS") for r in results]
    assert statuses == ["OK"] * 300, [r.verbose for r in results if r.verbose][:3]
    cdrs = invariants(tariff, {"1001": Decimal("10"), "busy": Decimal("1000")})
    assert len(cdrs) == 300 and {c["cost"] for c in cdrs} == {Decimal("0.0600")}


def test_the_config_is_read_again_when_it_changes_and_on_sighup(tariff, server):
    assert server.call(Scenario(answered_ms=1000)).dial_args.startswith("PJSIP/4912345678@trunk,")
    tariff.write_config(dial="SIP/other/{number}")
    assert server.call(Scenario(answered_ms=1000)).dial_args.startswith("SIP/other/4912345678,")
    server.proc.send_signal(signal.SIGHUP)
    assert server.wait_for("astbill-fastagi: config reloaded")
    assert server.call(Scenario(answered_ms=1000)).variables_set["ASTBILL_COST"] == "0.0600"
    assert server.proc.poll() is None


@pytest.mark.parametrize("key, value, words", [
    ("fastagi_allow", ["not-an-address"], "fastagi_allow must list addresses or networks"),
    ("fastagi_allow", "127.0.0.1", "fastagi_allow must be list"),
    ("fastagi_max_calls", 0, "fastagi_max_calls must be between 1 and 10000"),
    ("fastagi_idle_secs", 0, "fastagi_idle_secs must be between 1 and 300"),
])
def test_the_fastagi_settings_are_checked_in_one_line(tariff, key, value, words):
    tariff.write_config(**{key: value})
    started = subprocess.run([sys.executable, SERVER, "-c", str(tariff.config), "--listen",
                              "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert started.returncode == 2
    assert words in started.stderr and len(started.stderr.splitlines()) == 1, started.stderr
