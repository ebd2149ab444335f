"""Bill a handful of calls through the real astbill.py, on SQLite.

Each call runs astbill.py as its own process against a scripted AGI peer
that answers as Asterisk 20 does, exactly as Asterisk would run it.
"""
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from agipeer import Scenario, agi_env, run_call, start_call  # noqa: E402

RUN = ROOT / "demo-run"
CONFIG = RUN / "astbill.yaml"
ENV = {"ASTBILL_CONFIG": str(CONFIG), "PATH": "/usr/bin:/bin"}


def admin(*argv):
    result = subprocess.run([sys.executable, str(ROOT / "astbill-admin"), *argv],
                            env=ENV, capture_output=True, text=True, check=True)
    return result.stdout


def call(account, number, scenario, held=False):
    env = agi_env(agi_accountcode=account, agi_extension=number)
    cmd = [sys.executable, str(ROOT / "astbill.py")]
    if held:
        return start_call(cmd, scenario, env, ENV, 60)
    return run_call(cmd, scenario, env, ENV, 60)


def show(label, result):
    v = result.variables_set
    print(f"  {label:<44} {v.get('ASTBILL_STATUS', '-'):<9} {v.get('ASTBILL_MAXSECS', '-'):>7}"
          f" {v.get('ASTBILL_BILLSEC', '-'):>7} {v.get('ASTBILL_COST', '-'):>8}"
          f"  {v.get('ASTBILL_TRUNK', '')}")


def main():
    shutil.rmtree(RUN, ignore_errors=True)
    (RUN / "spool").mkdir(parents=True)
    CONFIG.write_text("database: sqlite://astbill.db\n"
                      "dial: \"PJSIP/{number}@trunk\"\n"
                      f"spool_dir: {RUN / 'spool'}\n")
    CONFIG.chmod(0o600)
    admin("init-db")
    print(admin("rate", "import", str(ROOT / "conf" / "rates.sample.csv"), "--tariff", "default"), end="")
    admin("account", "add", "1001", "--balance", "5.00")
    admin("account", "add", "2002", "--balance", "5.00")
    admin("account", "add", "3003", "--balance", "0.05")
    print("\nAccounts before the calls:")
    print(admin("account", "list"))

    print(f"  {'call':<44} {'status':<9} {'maxsecs':>7} {'billsec':>7} {'cost':>8}")
    show("1001 -> Germany 60/60, answered, 125 s", call("1001", "004912345678", Scenario(answered_ms=125_400)))
    show("1001 -> Berlin 30/6 + fee, answered, 95 s", call("1001", "+4930123456", Scenario(answered_ms=95_000)))
    show("1001 -> UK mobile, busy", call("1001", "00447700900123", Scenario(dialstatus="BUSY")))
    show("1001 -> Germany mobile 1/1, caller hangs up", call(
        "1001", "4915123456", Scenario(answered_ms=42_700, caller_hangup=True)))

    gate = threading.Event()
    first = call("2002", "4912345678", Scenario(answered_ms=600_000, dial_gate=gate), held=True)
    first.dial_reached.wait(30)
    second = call("2002", "4912345678", Scenario(answered_ms=300_000, dial_gate=gate), held=True)
    second.dial_reached.wait(30)
    print("\n  Calls in progress on 2002 while both are up (astbill-admin calls):")
    print("    " + admin("calls").replace("\n", "\n    ").rstrip())
    gate.set()
    show("2002 -> Germany, overlapping call 1, 10 min", first.wait())
    show("2002 -> Germany, overlapping call 2, 5 min", second.wait())
    show("3003 -> Germany, balance 0.05", call("3003", "4912345678", Scenario(answered_ms=60_000)))
    show("1001 -> 7123456, no rate", call("1001", "7123456", Scenario(answered_ms=60_000)))
    announced()

    carriers()
    fastagi()

    print("\nAccounts after the calls:")
    print(admin("account", "list"))
    print("CDRs:")
    print(admin("cdr"))
    print(admin("audit"), end="")
    print(f"\nThe database is {RUN / 'astbill.db'}; try astbill-admin -c {CONFIG} cdr --csv")
    console()


def announced():
    """What a caller hears with ASTBILL_ANNOUNCE=both: early media, never billed."""
    result = call("1001", "4912345678", Scenario(answered_ms=61_000, sound_ms=1_500,
                                                 variables={"ASTBILL_ANNOUNCE": "both"}))
    show("1001 -> Germany, announced first (both)", result)
    said = [c.split(" ", 2)[2].strip('"').split(",")[0] for c in result.commands
            if c.startswith(("EXEC Playback", "EXEC SayNumber"))]
    print(f"  {'':44} heard: {' '.join(said)}")


def console():
    """A staff login for the operator console, and how to start it."""
    subprocess.run([sys.executable, str(ROOT / "astbill-admin"), "user", "add", "demo", "--role",
                    "admin", "--password-stdin"], input="demo-password\n", env=ENV, text=True,
                   check=True, capture_output=True)
    print("\nThe operator console and the HTTP API, on this database (Debian's python3):\n"
          f"  /usr/bin/python3 {ROOT / 'astbill-web'} -c {CONFIG} --listen 127.0.0.1:8080\n"
          "  then open http://127.0.0.1:8080/ and log in as demo, password demo-password")
    found = subprocess.run(["/usr/bin/python3", "-c", "import flask, waitress"],
                           capture_output=True)
    if found.returncode != 0:
        print("  (it needs Debian's python3-flask and python3-waitress:"
              " apt-get install python3-flask python3-waitress)")


def carriers():
    """Least-cost trunks with failover, rate periods, a postpaid account, a call cap."""
    conf = ROOT / "conf"
    for name in ("carrier-a", "carrier-b"):
        admin("trunk", "add", name, "--dial", f"SIP/{name}/{{number}}")
        admin("rate", "import", str(conf / f"rates.{name}.sample.csv"), "--trunk", name)
    admin("rate", "import", str(conf / "rates.periods.sample.csv"), "--tariff", "periods")
    admin("account", "add", "4004", "--balance", "0", "--credit-limit", "2.00")
    admin("account", "add", "5005", "--balance", "5.00", "--max-calls", "1", "--tariff", "periods")
    print("\nTwo carriers now carry Germany and the UK; each call takes the cheapest first:")
    print("    " + admin("route", "4912345678", "--account", "1001").replace("\n", "\n    ").rstrip())
    print(f"\n  {'call':<44} {'status':<9} {'maxsecs':>7} {'billsec':>7} {'cost':>8}  trunk")
    show("1001 -> Germany, carrier-a unavailable", call(
        "1001", "4912345678", Scenario(earlier_dials=("CHANUNAVAIL",), answered_ms=75_000)))
    show("1001 -> Germany mobile, answered, 30 s", call("1001", "4915123456", Scenario(answered_ms=30_000)))
    show("1001 -> USA: no carrier", call("1001", "12125551234", Scenario(answered_ms=1_000)))
    show("4004 postpaid (limit 2.00) -> Germany 5 min", call(
        "4004", "4912345678", Scenario(answered_ms=300_000)))
    gate = threading.Event()
    held = call("5005", "4912345678", Scenario(answered_ms=90_000, dial_gate=gate), held=True)
    held.dial_reached.wait(30)
    show("5005 (1 call at most) -> a second call", call("5005", "4912345678", Scenario(answered_ms=1)))
    gate.set()
    show("5005 (peak/off-peak tariff) -> Germany, 90 s", held.wait())


def fastagi():
    """The same billing through astbill-fastagi, one server process over TCP."""
    import re
    from agipeer import fastagi_env, run_fastagi_call
    server = subprocess.Popen([sys.executable, str(ROOT / "astbill-fastagi"), "-c", str(CONFIG),
                               "--listen", "127.0.0.1:0"], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+) ", server.stderr.readline()).group(1))
        threading.Thread(target=server.stderr.read, daemon=True).start()
        print(f"\nThrough astbill-fastagi (AGI(agi://127.0.0.1:{port}/astbill)), one process:")
        for label, account, number, scenario in (
                ("1001 -> Germany, answered, 61 s", "1001", "4912345678", Scenario(answered_ms=61_000)),
                ("1001 -> Germany, caller hangs up (HANGUP)", "1001", "4912345678",
                 Scenario(answered_ms=20_000, caller_hangup=True)),
                ("3003 -> Germany, no funds", "3003", "4912345678", Scenario(answered_ms=1_000))):
            block = fastagi_env(port=port, agi_accountcode=account, agi_extension=number)
            show(label, run_fastagi_call(("127.0.0.1", port), scenario, block))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
