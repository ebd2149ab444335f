"""The per-call benchmark: the real astbill.py, measured beside its floor.

Runs astbill.py as a process against a lean scripted AGI peer (the replies
a real Asterisk 20 gives to an answered call) and prints, side by side in
one run, medians and p95 of:

  authorize  process start -> the EXEC Dial line written (post-dial delay)
  settle     Dial's answer -> process exit
  floor      `python -c pass` with the same interpreter, measured in the same run

on SQLite and MariaDB (loopback), with tariffs of 100 and 100,000 prefixes
and astcdr holding 0 and 1,000,000 rows, and with least-cost routing over
10 trunks of 100,000 prefixes each, every prefix (sold and bought) priced
in 4 periods of the week; peak RSS of a live call's process
beside the bare interpreter's; and call setups per second with 20, 50 and
100 calls started at once, with the p99 wait for the account lock.
"""
import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "tests"))

from astbill.config import load  # noqa: E402
from astbill.store import open_store  # noqa: E402
from astbill.store.schema import migrate  # noqa: E402

PY = sys.executable
ASTBILL = str(ROOT / "astbill.py")
ENV_KEYS = ["agi_request", "agi_channel", "agi_language", "agi_type", "agi_uniqueid",
            "agi_version", "agi_callerid", "agi_calleridname", "agi_callingpres",
            "agi_callingani2", "agi_callington", "agi_callingtns", "agi_dnid", "agi_rdnis",
            "agi_context", "agi_extension", "agi_priority", "agi_enhanced",
            "agi_accountcode", "agi_threadid"]
_ids = iter(range(1, 10**9))
_ids_lock = threading.Lock()


def uniqueid():
    with _ids_lock:
        return f"{int(time.time())}.{next(_ids)}"


class Sample:
    __slots__ = ("authorize", "settle", "rss_kb", "status")


def reply_to(line, uid):
    """(what Asterisk answers to ``line`` on an answered 61 s call, the
    ASTBILL_STATUS it sets or None)."""
    if line.startswith("EXEC Dial"):
        return "200 result=-1", None
    if line.startswith("GET FULL VARIABLE \"${CHANNEL(state)}"):
        return f"200 result=1 (Ring|0.000000|{uid})", None
    if line.startswith("GET FULL VARIABLE"):
        return "200 result=1 (ANSWER|61000|61|61.000000|SIP/trunk-1)", None
    if line.startswith("SET VARIABLE ASTBILL_STATUS"):
        return "200 result=1", line.split('"')[1]
    return "200 result=1", None


def one_call(env, account, number):
    """One call through astbill.py; a Sample of its timings."""
    uid = uniqueid()
    values = {"agi_request": "astbill.py", "agi_channel": "SIP/bench-1", "agi_uniqueid": uid,
              "agi_callerid": "4930111222", "agi_extension": number, "agi_accountcode": account}
    block = "".join(f"{k}: {values.get(k, '')}\n" for k in ENV_KEYS) + "\n"
    sample = Sample()
    sample.rss_kb = sample.settle = None
    started = time.perf_counter()
    proc = subprocess.Popen([PY, ASTBILL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    proc.stdin.write(block.encode())
    proc.stdin.flush()
    status = "?"
    for raw in proc.stdout:
        line = raw.decode()
        if line.startswith("EXEC Dial"):
            sample.authorize = time.perf_counter() - started
            sample.rss_kb = peak_rss_kb(proc.pid)
            answered = time.perf_counter()
        reply, set_status = reply_to(line, uid)
        status = set_status or status
        proc.stdin.write(reply.encode() + b"\n")
        proc.stdin.flush()
    proc.wait()
    if status == "OK":
        sample.settle = time.perf_counter() - answered
    else:
        sample.authorize = time.perf_counter() - started
    sample.status = status
    return sample


FASTAGI = str(ROOT / "astbill-fastagi")
MARIADB_SOCKET = None   # the bench's MariaDB's Unix socket, once it is started


def start_fastagi(config, processes=1, pin=True):
    """An astbill-fastagi server on a free loopback port: (process, port)."""
    import re
    proc = subprocess.Popen([PY, FASTAGI, "-c", str(config), "--listen", "127.0.0.1:0",
                             "--processes", str(processes), *([] if pin else ["--no-pin"])],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    found = re.search(r"listening on [\d.]+:(\d+)", line)
    if not found:
        raise SystemExit(f"bench: astbill-fastagi did not start: {line}")
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()  # its call log
    return proc, int(found.group(1))


def fastagi_call(port, account, number):
    """One call over FastAGI: (seconds from connect to EXEC Dial written, status)."""
    import socket
    uid = uniqueid()
    values = {"agi_request": f"agi://127.0.0.1:{port}/astbill", "agi_channel": "SIP/bench-1",
              "agi_uniqueid": uid, "agi_callerid": "4930111222", "agi_extension": number,
              "agi_accountcode": account}
    block = ("agi_network: yes\nagi_network_script: astbill\n"
             + "".join(f"{k}: {values.get(k, '')}\n" for k in ENV_KEYS) + "\n")
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(block.encode())
    status, authorize = "?", None
    for raw in sock.makefile("rb"):
        line = raw.decode()
        if line.startswith("EXEC Dial"):
            authorize = time.perf_counter() - started
        reply, set_status = reply_to(line, uid)
        status = set_status or status
        sock.sendall(reply.encode() + b"\n")
    sock.close()
    return (authorize if authorize is not None else time.perf_counter() - started), status


def fastagi_clients(port, clients, calls, accounts=("shared",)):
    """``calls`` calls from ``clients`` concurrent clients, client i on
    account ``accounts[i % len(accounts)]``: (setups/s, refused)."""
    refused = [0]
    counter = iter(range(calls))
    lock = threading.Lock()

    def client(account):
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            if fastagi_call(port, account, "4912345678")[1] != "OK":
                refused[0] += 1

    threads = [threading.Thread(target=client, args=(accounts[i % len(accounts)],))
               for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls / (time.perf_counter() - started), refused[0]


def current_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fastagi_report(label, config, runs, volumes, floor_rss, processes=1, pin=True):
    proc, port = start_fastagi(config, processes, pin)
    try:
        times = sorted(fastagi_call(port, "shared", "4912345678")[0] for _ in range(runs))
        p99 = times[max(0, int(len(times) * 0.99) - 1)] * 1000
        rates = []
        # Long enough for a steady state: the server's worker threads are
        # started by the first calls of a cell and kept for the next.
        many = tuple(f"many{i}" for i in range(100))
        for clients, accounts, name in ((1, ("shared",), "1"), (10, ("shared",), "10"),
                                        (100, ("shared",), "100 on one account"),
                                        (100, many, "100 on 100 accounts")):
            rate, refused = fastagi_clients(port, clients, max(clients * 30, 1000), accounts)
            rates.append(f"{name}: {rate:.0f}/s" + (f" ({refused} refused)" if refused else ""))
        print(f"  {label:20} connect -> EXEC Dial median {statistics.median(times) * 1000:.1f} ms,"
              f" p99 {p99:.1f} ms; setups/s with clients {', '.join(rates)}")
        if not volumes:
            return
        done, sizes = 0, []
        for volume in volumes:
            fastagi_clients(port, 10, volume - done)
            done = volume
            sizes.append(current_rss_kb(proc.pid))
        growth = sizes[-1] / sizes[0]
        print(f"  {'':20} server RSS after " + ", ".join(
                  f"{v:,} calls {kb / 1024:.1f} MB ({kb / floor_rss:.2f}x floor)"
                  for v, kb in zip(volumes, sizes))
              + f"; last / first {growth:.3f} ({'within' if growth <= 1.1 else 'NOT within'} 10%)")
    finally:
        proc.terminate()
        proc.wait(60)


def peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def floor_once():
    t = time.perf_counter()
    subprocess.run([PY, "-c", "pass"], check=True)
    return time.perf_counter() - t


def floor_rss_kb():
    proc = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    time.sleep(0.3)
    rss = peak_rss_kb(proc.pid)
    proc.communicate(b"")
    return rss


def med(values):
    return statistics.median(values) * 1000


def p95(values):
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)] * 1000


# -- the databases -----------------------------------------------------------

def prepare(workdir, database, label, big=True):
    """A config and a database with the two tariffs (the big one unless
    not ``big``) and the accounts."""
    config = new_database(workdir, database, label)
    admin(config, "rate", "import", str(rates_csv(workdir, 100)), "--tariff", "small")
    admin(config, "account", "add", "small", "--balance", "100000", "--tariff", "small")
    if big:
        admin(config, "rate", "import", str(rates_csv(workdir, 100_000)), "--tariff", "big")
        admin(config, "account", "add", "big", "--balance", "100000", "--tariff", "big")
    admin(config, "account", "add", "shared", "--balance", "100000", "--tariff", "small")
    store = open_store(load(str(config)))
    store.atomic(lambda tx: [tx.add_account(f"many{i}", "small", Decimal(1000), "2026-01-01 00:00:00")
                             for i in range(100)])
    store.close()
    return config


# A week in four periods: weekday nights, days and evenings, and the weekend.
PERIODS = (("mon-fri", "00:00-08:00"), ("mon-fri", "08:00-18:00"), ("mon-fri", "18:00-24:00"),
           ('"sat,sun"', ""))
TRUNKS = 10


def prepare_routed(workdir, database, label, prefixes):
    """A config and a database whose calls are routed over the trunks: a
    tariff and ``TRUNKS`` trunk decks of ``prefixes`` prefixes in 4 periods."""
    config = new_database(workdir, database, label)
    # Random decks may buy dearer than they sell: route every call anyway.
    with open(config, "a") as f:
        f.write("lcr_allow_loss: true\n")
    carrier = rates_csv(workdir, prefixes, periods=True)
    admin(config, "rate", "import", str(carrier), "--tariff", "carrier")
    admin(config, "account", "add", "carrier", "--balance", "100000", "--tariff", "carrier")
    add_trunks(config, carrier, TRUNKS)
    return config


def new_database(workdir, database, label):
    config = write_config(workdir, database, label)
    store = open_store(dict(load(str(config)), create_database=True))
    migrate(store)
    store.close()
    return config


def write_config(workdir, database, label, driver="auto"):
    """A config for ``database``, through the MySQL ``driver``."""
    config = workdir / f"{label}.yaml"
    config.write_text(f"database: {database}\ndial: \"PJSIP/{{number}}@trunk\"\n"
                      f"spool_dir: {workdir}\nmysql_driver: {driver}\n")
    config.chmod(0o600)
    return config


def rates_csv(workdir, count, periods=False):
    path = workdir / f"rates{count}{'-periods' if periods else ''}.csv"
    if path.exists():
        return path
    rng = random.Random(count)
    prefixes = {"49"}
    while len(prefixes) < count:
        prefixes.add(str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 7))))
    with open(path, "w") as f:
        f.write("prefix,destination,rate,connect_fee,min_secs,increment"
                + (",days,hours\n" if periods else "\n"))
        for p in sorted(prefixes):
            for days, hours in PERIODS if periods else [(None, None)]:
                f.write(f"{p},Destination {p},0.0{rng.randint(10, 99)},0,60,60"
                        + (f",{days},{hours}\n" if periods else "\n"))
    return path


def add_trunks(config, rates, count):
    """``count`` trunks, each with a deck like ``rates``: the first imported,
    the others copied in SQL (a little cheaper each), the bulk way."""
    for i in range(count):
        admin(config, "trunk", "add", f"carrier-{i}", "--dial", f"SIP/carrier-{i}/{{number}}")
    admin(config, "rate", "import", str(rates), "--trunk", "carrier-0")
    store = open_store(dict(load(str(config)), lock_wait_secs=60))
    first = store.read(lambda tx: tx.one("SELECT id FROM astdeck WHERE name = 'carrier-0'"))[0]
    for i in range(1, count):
        def copy(tx, i=i):
            tx.run("INSERT INTO astdeck (kind, name, starts, created) VALUES"
                   " ('trunk', ?, '1970-01-01 00:00:00', '2026-01-01 00:00:00')", (f"carrier-{i}",))
            deck = tx.one("SELECT id FROM astdeck WHERE name = ?", (f"carrier-{i}",))[0]
            tx.run("INSERT INTO astprice (deck, prefix, days, start_min, end_min, destination,"
                   " rate, connect_fee, min_secs, increment) SELECT ?, prefix, days, start_min,"
                   " end_min, destination, rate * ?, connect_fee, min_secs, increment"
                   " FROM astprice WHERE deck = ?", (deck, 100 - i, first))
            tx.run("UPDATE astprice SET rate = rate / 100 WHERE deck = ?", (deck,))
        store.atomic(copy)
    store.close()


def admin(config, *argv):
    subprocess.run([PY, str(ROOT / "astbill-admin"), "-c", str(config), *argv], check=True,
                   stdout=subprocess.DEVNULL)


def fill_cdr(config, rows, days=None):
    """Add ``rows`` settled, unanswered CDRs (cost 0: the books stay
    balanced), the bulk way each backend allows: all started on one day
    long ago, or (``days``) spread over the ``days`` up to now."""
    # One long statement: the lock and the reply may take minutes.
    store = open_store(dict(load(str(config)), lock_wait_secs=60, read_timeout_secs=900))
    if store.placeholder == "?":
        start = ("datetime('now', '-' || (i % {days}) || ' days', '-' || (i * 37 % 86400)"
                 " || ' seconds')" if days else "'2026-01-01 00:00:00'").format(days=days)
        sql = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
               " INSERT INTO astcdr (uniqueid, start, account, tariff, prefix, rate, connect_fee,"
               " min_secs, increment, max_secs, cost, state, dst, billsec)"
               f" SELECT 'old.' || i, {start}, 'many' || (i % 100), 'small', '49',"
               " 60000, 0, 60, 60, 3600, 0, 'settled', '4912345678', 0 FROM n")
        store.atomic(lambda tx: tx.run(sql, (rows,)))
    else:
        start = (f"UTC_TIMESTAMP() - INTERVAL (seq % {days}) DAY - INTERVAL (seq * 37 % 86400)"
                 " SECOND" if days else "'2026-01-01 00:00:00'")
        sql = ("INSERT INTO astcdr (uniqueid, start, account, tariff, prefix, rate, connect_fee,"
               " min_secs, increment, max_secs, cost, state, dst, billsec)"
               f" SELECT CONCAT('old.', seq), {start}, CONCAT('many', seq % 100),"
               " 'small', '49', 0.06, 0, 60, 60, 3600, 0, 'settled', '4912345678', 0"
               f" FROM seq_1_to_{rows}")
        store.atomic(lambda tx: tx.run(sql))
    store.close()


def questions(config):
    """(statements, connections) the MariaDB server has seen so far."""
    store = open_store(load(str(config)))
    rows = dict(store.read(lambda tx: tx.all(
        "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Connections')")))
    store.close()
    return int(rows["Questions"]), int(rows["Connections"])


# The standard library modules PyMySQL imports that a call on mysqlclient
# never loads: the part of PyMySQL's cost no choice of AstBill's can avoid.
PYMYSQL_STDLIB = "socket, re, hashlib, datetime, configparser, struct"
DRIVER_COST = """
import sys, time
sys.path.insert(0, sys.argv[1])
from astbill.config import load
from astbill.store import mysql, open_store
settings = load(sys.argv[2])
started = time.perf_counter()
if sys.argv[3] == "stdlib":
    import %s
    print(time.perf_counter() - started, 0)
else:
    store = open_store(settings)
    loaded = time.perf_counter()
    store.connection()
    print(loaded - started, time.perf_counter() - loaded)
""" % PYMYSQL_STDLIB


def driver_costs(config, runs, what="driver"):
    """Median ms to import the configured MySQL driver and to connect, each
    run in a fresh interpreter that has loaded the rest of AstBill already;
    or, for what="stdlib", to import PYMYSQL_STDLIB there instead."""
    costs = [subprocess.run([PY, "-c", DRIVER_COST, str(ROOT / "lib"), str(config), what],
                            check=True, capture_output=True, text=True).stdout.split()
             for _ in range(runs)]
    return [statistics.median(float(c[i]) for c in costs) * 1000 for i in (0, 1)]


# -- the runs ----------------------------------------------------------------

def latency(env, account, number, runs):
    """(call samples, floor samples), taken in turn so that the machine's
    noise weighs on both alike."""
    samples, floors = [], []
    for _ in range(runs):
        floors.append(floor_once())
        samples.append(one_call(env, account, number))
    bad = [s.status for s in samples if s.status != "OK"]
    if bad:
        raise SystemExit(f"bench: calls refused: {bad[:3]}")
    return samples, floors


def burst(env, config, n, shared, timings):
    """n calls started at once; (setups per second, p99 lock wait ms, refused)."""
    timings.write_text("")
    env = dict(env, ASTBILL_TIMINGS=str(timings))
    results = [None] * n
    go = threading.Event()

    def run(i):
        go.wait()
        results[i] = (time.perf_counter(), one_call(env, "shared" if shared else f"many{i}", "4912345678"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    last = max(t0 + s.authorize for t0, s in results)
    waits = sorted(float(line.split()[1]) for line in timings.read_text().split("\n") if line)
    p99 = waits[max(0, int(len(waits) * 0.99) - 1)] if waits else float("nan")
    refused = sum(s.status != "OK" for _, s in results)
    return n / (last - start), p99, refused


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="calls per latency cell")
    parser.add_argument("--no-mariadb", action="store_true")
    parser.add_argument("--cdr-rows", type=int, default=1_000_000)
    parser.add_argument("--trunk-prefixes", type=int, default=100_000,
                        help="prefixes in the routed tariff and in each trunk's deck")
    parser.add_argument("--bursts", default="20,50,100", help="calls started at once, comma-separated")
    parser.add_argument("--fastagi-calls", default="1000,100000",
                        help="after how many FastAGI calls the server's RSS is read, comma-separated")
    parser.add_argument("--console-only", action="store_true",
                        help="measure the operator console only")
    parser.add_argument("--fastagi-only", action="store_true",
                        help="only the FastAGI rows (and the floor's RSS beside them)")
    args = parser.parse_args()
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "lib")], check=True,
                   stdout=subprocess.DEVNULL)
    workdir = Path(tempfile.mkdtemp(prefix="astbill-bench-"))
    backends = [("SQLite", f"sqlite://{workdir / 'bench.db'}", f"sqlite://{workdir / 'routed.db'}",
                 f"sqlite://{workdir / 'console.db'}")]
    server = None
    if not args.no_mariadb:
        from mariadb_server import MariaDBServer
        server = MariaDBServer(workdir / "mariadb")
        server.start()
        global MARIADB_SOCKET
        MARIADB_SOCKET = server.socket
        backends.append(("MariaDB", server.create_database("astbill_bench"),
                         server.create_database("astbill_routed"),
                         server.create_database("astbill_console")))
    try:
        if args.console_only:
            console_report(workdir, backends, args)
        elif args.fastagi_only:
            for label, database, *_ in backends:
                prepare(workdir, database, label.lower(), big=False)
                if label == "MariaDB":
                    write_config(workdir, database, "pymysql", "pymysql")
            print(f"machine: {os.uname().machine}, {os.cpu_count()} cores,"
                  f" Python {sys.version.split()[0]}")
            fastagi_rows(workdir, backends, args)
        else:
            report(workdir, backends, args)
    finally:
        if server:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def print_cell(name, label, samples, floor):
    """Print a cell's authorize and settle rows; its authorize x floor."""
    auth = [s.authorize for s in samples]
    print(f"{name:52}{med(auth):8.1f}{p95(auth):8.1f}{med(floor):8.1f}"
          f"{med(auth) / med(floor):9.2f}")
    settle = [s.settle for s in samples]
    print(f"{label + ' settle':52}{med(settle):8.1f}{p95(settle):8.1f}")
    return med(auth) / med(floor)


def fastagi_rows(workdir, backends, args):
    floor_rss = floor_rss_kb()
    print("\nFastAGI (astbill-fastagi, one server, x2: --processes 2, unpinned: --no-pin; a call"
          " is connect -> EXEC Dial -> settled -> close; floor RSS, the bare interpreter:"
          f" {floor_rss / 1024:.1f} MB):")
    volumes = [int(v) for v in args.fastagi_calls.split(",")]
    for label, database, *_ in backends:
        config = workdir / f"{label.lower()}.yaml"
        # Each process is kept to one CPU; left to the scheduler first, so
        # that the pinned rows meet the bigger database.
        fastagi_report(f"{label} unpinned", config, args.runs, [], floor_rss, pin=False)
        if label == "MariaDB":
            fastagi_report("MariaDB x2 unpinned", config, args.runs, [], floor_rss, processes=2,
                           pin=False)
        fastagi_report(label, config, args.runs, volumes, floor_rss)
        if label == "MariaDB":
            fastagi_report("MariaDB (PyMySQL)", workdir / "pymysql.yaml", args.runs, volumes,
                           floor_rss)
            # On one box the database is also reached over its Unix socket
            # (its memory is the TCP row's: not measured again).
            local = f"{database}?unix_socket={MARIADB_SOCKET}"
            for driver, name in (("auto", "MariaDB socket"), ("pymysql", "(PyMySQL) socket")):
                fastagi_report(name, write_config(workdir, local, f"socket-{driver}", driver),
                               args.runs, [], floor_rss)
            # One process per core (--processes): the interpreter lock is
            # each one's own.  Speed only, as for the socket rows.
            for driver, name in (("auto", "MariaDB"), ("pymysql", "(PyMySQL)")):
                for url, where in ((database, "procs"), (local, "socket")):
                    fastagi_report(f"{name} x2 {where}", write_config(
                        workdir, url, f"x2-{driver}-{where}", driver),
                        args.runs, [], floor_rss, processes=2)


def report(workdir, backends, args):
    env = {k: v for k, v in os.environ.items() if k != "ASTBILL_TIMINGS"}
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]},"
          f" {args.runs} calls per cell; times in ms (median / p95)")
    print("floor: `python -c pass`, run before each call of the cell, in turn with it\n")
    floor_rss = floor_rss_kb()
    print(f"{'':52}{'median':>8}{'p95':>8}{'floor':>8}{'x floor':>9}")
    rss = {}
    for label, database, routed_database, _ in backends:
        config = prepare(workdir, database, label.lower())
        env["ASTBILL_CONFIG"] = str(config)
        cells = {}
        for cdr_label in ("0", f"{args.cdr_rows:,}"):
            if cdr_label != "0":
                fill_cdr(config, args.cdr_rows)
            for tariff, number in (("small", "4912345678"), ("big", "4912345678")):
                if label == "MariaDB" and cdr_label == "0" and tariff == "small":
                    before = questions(config)
                samples, floor = latency(env, tariff, number, args.runs)
                if label == "MariaDB" and cdr_label == "0" and tariff == "small":
                    after = questions(config)
                    per_call = ((after[0] - before[0] - 1) / args.runs, (after[1] - before[1] - 1) / args.runs)
                prefixes = "100" if tariff == "small" else "100,000"
                name = f"{label} authorize, {prefixes} prefixes, {cdr_label} CDRs"
                cells[(prefixes, cdr_label)] = print_cell(name, label, samples, floor)
                rss[label] = max(s.rss_kb for s in samples)
                if label == "MariaDB" and cdr_label == "0" and tariff == "small":
                    # The same database through the fallback driver.
                    env["ASTBILL_CONFIG"] = str(write_config(workdir, database, "pymysql", "pymysql"))
                    samples, floor = latency(env, tariff, number, args.runs)
                    print_cell("MariaDB (PyMySQL) authorize, 100 prefixes, 0 CDRs",
                               "MariaDB (PyMySQL)", samples, floor)
                    rss["MariaDB (PyMySQL)"] = max(s.rss_kb for s in samples)
                    env["ASTBILL_CONFIG"] = str(config)
        env["ASTBILL_CONFIG"] = str(prepare_routed(workdir, routed_database, label.lower() + "-routed",
                                                   args.trunk_prefixes))
        samples, floor = latency(env, "carrier", "4912345678", args.runs)
        auth = [s.authorize for s in samples]
        routed = med(auth) / med(floor)
        name = f"{label} authorize, {TRUNKS} trunks x {args.trunk_prefixes:,} x 4 periods"
        print(f"{name:52}{med(auth):8.1f}{p95(auth):8.1f}{med(floor):8.1f}{routed:9.2f}")
        base = cells[("100", "0")]
        print(f"  {label}, x floor over x floor: 100,000 prefixes / 100 = {cells[('100,000', '0')] / base:.2f};"
              f" {args.cdr_rows:,} CDRs / 0 = {cells[('100', f'{args.cdr_rows:,}')] / base:.2f};"
              f" routed over {TRUNKS} trunks / 100 prefixes = {routed / base:.2f}")
        if label == "MariaDB":
            print(f"  MariaDB: {per_call[0]:.1f} statements and {per_call[1]:.1f} connections per call,"
                  " none open while the call is up")
            mysqlclient, pymysql = (driver_costs(workdir / f"{name}.yaml", args.runs)
                                    for name in ("mariadb", "pymysql"))
            stdlib = driver_costs(workdir / "pymysql.yaml", args.runs, "stdlib")[0]
            print(f"  where the drivers' time goes (ms, fresh interpreter): mysqlclient import"
                  f" {mysqlclient[0]:.1f}, connect {mysqlclient[1]:.1f}; PyMySQL import"
                  f" {pymysql[0]:.1f}, connect {pymysql[1]:.1f};\n  of PyMySQL's import,"
                  f" {stdlib:.1f} is the standard library it needs ({PYMYSQL_STDLIB})")
        print()
    print(f"peak RSS: floor {floor_rss / 1024:.1f} MB; " + "; ".join(
        f"{label} live call {kb / 1024:.1f} MB ({kb / floor_rss:.2f}x)" for label, kb in rss.items()))
    print("\nthroughput: calls started at once -> setups/s, p99 account-lock wait ms, refused")
    for label, *_ in backends:
        config = workdir / f"{label.lower()}.yaml"
        env["ASTBILL_CONFIG"] = str(config)
        for n in map(int, args.bursts.split(",")):
            for shared in (True, False):
                rate, p99, refused = burst(env, config, n, shared, workdir / "timings")
                who = "one account" if shared else "many accounts"
                print(f"  {label:8}{n:4} calls, {who:14}{rate:8.1f}/s{p99:9.2f} ms  refused {refused}")
        audit = subprocess.run([PY, str(ROOT / "astbill-admin"), "-c", str(config), "audit"],
                               capture_output=True, text=True)
        said = (audit.stdout.strip() or audit.stderr.strip() or "(nothing)").splitlines()
        print(f"  {label:8}after the bursts: {said[-1]}")
    fastagi_rows(workdir, backends, args)
    console_report(workdir, backends, args)
    print("\nreference, A2Billing's PHP AGI on this kind of machine: start -> EXEC Dial 3.0x floor,"
          " peak RSS 2.8x floor, 17 statements and 2 connections per call")


CONSOLE_DAYS = 365   # the CDRs' starts are spread over a year up to now


def console_report(workdir, backends, args):
    """The operator console (astbill-web on Debian's Python) over HTTP with
    ``--cdr-rows`` CDRs spread over a year: the dashboard and a CDR page
    beside the floor (the login page: a page rendered, no database read),
    the dashboard's first load too;
    then a call's authorize while a console refreshes the dashboard and its
    calls in progress every second, beside the same quiet."""
    import debian
    from conftest import RATES, Billing
    from test_web_api import Web
    from test_web_pages import logged_in, make_logins
    print(f"\nconsole (astbill-web), {args.cdr_rows:,} CDRs over {CONSOLE_DAYS} days;"
          " times in ms (median / p95), floor: GET /login")
    print(f"{'':52}{'median':>8}{'p95':>8}{'floor':>8}{'x floor':>9}")
    for label, *_, database in backends:
        (workdir / f"console-{label}").mkdir()
        billing = Billing(workdir / f"console-{label}", database)
        billing.admin_ok("init-db")
        billing.setup_rates(RATES)
        for account in ("1001", "2002"):
            billing.admin_ok("account", "add", account, "--balance", "100000")
        make_logins(billing)
        fill_cdr(billing.config, args.cdr_rows, days=CONSOLE_DAYS)
        web = Web(billing, debian.PYTHON)
        try:
            client = logged_in(web, "alice")
            # The first dashboard reads the 29 days before today, the next ones
            # (for actions.PAST_SECONDS) today's CDRs alone.
            began = time.perf_counter()
            assert client.get("/")[0] == 200
            print(f"{label + ' dashboard, first (30 days read)':52}"
                  f"{(time.perf_counter() - began) * 1000:8.1f}")
            today = time.strftime("%Y-%m-%d", time.gmtime())
            pages = {"dashboard": "/", "CDR page (100 of today's)": f"/cdrs?since={today}"}
            times = {name: [] for name in ("floor", *pages)}
            for _ in range(args.runs):
                for name, path in (("floor", "/login"), *((n, p) for n, p in pages.items())):
                    began = time.perf_counter()
                    assert client.get(path)[0] == 200, path
                    times[name].append(time.perf_counter() - began)
            floor = times.pop("floor")
            for name, samples in times.items():
                print(f"{label + ' ' + name:52}{med(samples):8.1f}{p95(samples):8.1f}"
                      f"{med(floor):8.1f}{med(samples) / med(floor):9.2f}")
            env = dict(os.environ, ASTBILL_CONFIG=str(billing.config))
            watcher, quiet, busy = logged_in(web, "bob"), [], []
            # In turn, a tenth of the calls at a time: the machine's noise
            # weighs on both alike.
            for _ in range(10):
                quiet += authorize_times(env, max(1, args.runs // 10))
                with refreshing(watcher):
                    busy += authorize_times(env, max(1, args.runs // 10))
            print(f"  {label}: authorize {med(quiet):.1f} ms quiet, {med(busy):.1f} ms while a"
                  f" console refreshes every second ({med(busy) / med(quiet) - 1:+.1%})")
        finally:
            web.stop()


def authorize_times(env, runs):
    return [s.authorize for s in latency(env, "1001", "4912345678", runs)[0]]


@contextlib.contextmanager
def refreshing(client):
    """A console open on the dashboard: the page and its calls in progress
    fetched every second (as live.js does) until the block ends."""
    done = threading.Event()

    def refresh():
        while not done.wait(1):
            client.get("/")
            client.get("/live/calls")
    thread = threading.Thread(target=refresh)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


if __name__ == "__main__":
    main()
