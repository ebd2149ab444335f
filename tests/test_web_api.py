"""astbill-web over real HTTP: the service started as a process, as systemd
runs it (Debian's /usr/bin/python3 with python3-flask and python3-waitress),
on a free loopback port, on SQLite and on MariaDB; every request through
urllib.  Each security property has a test that fails without its defence.
"""
import hashlib
import json
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal

import pytest

import debian
from conftest import RATES, ROOT, AccountLock, Billing, fresh_database, start_held_call
from test_admin import record_cdrs

WEB = str(ROOT / "astbill-web")
API = "/api/v1"


class Web:
    """A running astbill-web for one Billing, and a token of each role."""

    def __init__(self, billing, python, args=(), tokens=None):
        """``tokens``: those of a Web already serving ``billing``, else new ones."""
        self.billing = billing
        self.tokens = tokens if tokens is not None else {role: json.loads(billing.admin_ok(
            "token", "add", f"{role}-1", "--role", role, "--json"))["token"]
            for role in ("admin", "support", "shop")}
        self.process = subprocess.Popen(
            [python, "-I", WEB, "-c", str(billing.config), "--listen", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=debian.env())
        first = self.process.stderr.readline()
        assert first.startswith("astbill-web: listening on http://127.0.0.1:"), (
            first + self.process.stderr.read())
        self.url = first.split()[-1]
        self.log = []
        self._reader = threading.Thread(target=lambda: self.log.extend(self.process.stderr))
        self._reader.start()

    def call(self, method, path, role="admin", body=None, token=None, headers=(), raw=None,
             content_type=None):
        """(status, reply headers, the reply: JSON decoded, else text)."""
        data, sent = raw, dict(headers)
        if body is not None:
            data, content_type = json.dumps(body).encode(), "application/json"
        if content_type:
            sent["Content-Type"] = content_type
        token = token if token is not None else (self.tokens[role] if role else None)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + API + path, data=data, headers=sent,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                status, got, text = reply.status, reply.headers, reply.read().decode()
        except urllib.error.HTTPError as exc:
            status, got, text = exc.code, exc.headers, exc.read().decode()
        if got.get_content_type() == "application/json":
            return status, got, json.loads(text)
        return status, got, text

    def ok(self, method, path, **kw):
        status, _, reply = self.call(method, path, **kw)
        assert status in (200, 201), (method, path, status, reply)
        return reply

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self._reader.join()
        return "".join(self.log)


def web_billing(request, tmp_path):
    """(Debian's Python with Flask and waitress, a Billing on the backend
    ``request.param`` names: sqlite, mysqlclient or pymysql) with the sample
    rates and account 1001 holding 10.0000."""
    python = debian.require_python({**debian.PACKAGES, **debian.WEB_PACKAGES})
    database = fresh_database(request, tmp_path, request.param)
    settings = {} if request.param == "sqlite" else {"mysql_driver": request.param}
    billing = Billing(tmp_path, database, **settings)
    billing.backend = "sqlite" if request.param == "sqlite" else "mariadb"
    billing.admin_ok("init-db")
    billing.setup_rates(RATES)
    billing.admin_ok("account", "add", "1001", "--balance", "10")
    return python, billing


@pytest.fixture(params=["sqlite", "mysqlclient", "pymysql"])
def web(request, tmp_path):
    """astbill-web on SQLite, or on MariaDB through Debian's mysqlclient or PyMySQL."""
    python, billing = web_billing(request, tmp_path)
    server = Web(billing, python)
    yield server
    log = server.stop()
    assert "Traceback" not in log, log
    assert not any(token in log for token in server.tokens.values())   # never logged


def topup(web, amount, key, account="1001", role="admin"):
    return web.call("POST", f"/accounts/{urllib.parse.quote(account, safe='')}/topups",
                    role=role, body={"amount": amount}, headers={"Idempotency-Key": key})


def ledger_rows(web, kind):
    return web.billing.query("SELECT account, amount, actor FROM astledger WHERE kind = ?"
                             " ORDER BY id", (kind,))


# -- authentication and roles ----------------------------------------------------

def every_operation(web):
    """(method, path) of every operation the OpenAPI document lists, with
    its path's parameters filled in."""
    document = web.ok("GET", "/openapi.json", role=None)
    filled = {"account": "1001", "kind": "tariff", "name": "default"}
    for path, operations in document["paths"].items():
        for method in operations:
            yield method.upper(), path.format(**filled)


def test_no_token_or_a_wrong_one_is_401_on_every_operation(web):
    stored = web.billing.query("SELECT token_hash FROM asttoken WHERE name = 'admin-1'")[0][0]
    forged = [None, "", "not-a-token", web.tokens["admin"][:-1], stored]
    operations = list(every_operation(web))
    assert len(operations) == 15
    for method, path in operations:
        for token in forged:
            status, headers, reply = web.call(method, path, role=None, token=token,
                                              body={} if method != "GET" else None)
            assert (status, reply) == (401, {
                "error": "a valid token is needed: Authorization: Bearer TOKEN"}), (method, path)
            assert headers["WWW-Authenticate"] == 'Bearer realm="astbill"'
    status, _, _ = web.call("GET", "/accounts/1001", role=None,
                            headers={"Authorization": "Basic " + web.tokens["admin"]})
    assert status == 401
    assert web.billing.balance("1001") == Decimal(10)


def test_a_token_is_stored_as_its_sha256_only(web):
    rows = web.billing.query("SELECT name, role, token_hash FROM asttoken ORDER BY name")
    assert rows == [(f"{role}-1", role, hashlib.sha256(web.tokens[role].encode()).hexdigest())
                    for role in ("admin", "shop", "support")]
    assert all(len(token) == 43 for token in web.tokens.values())   # 32 random bytes
    dump = repr(web.billing.query("SELECT * FROM asttoken"))
    assert not any(token in dump for token in web.tokens.values())
    web.billing.admin_ok("token", "remove", "shop-1")
    assert web.call("GET", "/accounts/1001", role="shop")[0] == 401


# What each role may do: (method, path, body, Idempotency-Key).
WRITES = [
    ("POST", "/accounts", {"account": "2002", "balance": "1"}),
    ("PATCH", "/accounts/1001", {"max_calls": 3}),
    ("POST", "/accounts/1001/adjustments", {"amount": "-1"}),
    ("POST", "/trunks/carrier-a/disable", None),
    ("POST", "/trunks/carrier-a/enable", None),
]
READS = ["/accounts", "/calls", "/cdrs", "/cdrs?format=csv", "/rates/tariff/default", "/trunks",
         "/route?number=4930123&account=1001", "/audit"]


def test_roles_are_checked_by_the_server(web):
    web.billing.admin_ok("trunk", "add", "carrier-a", "--dial", "SIP/carrier-a/{number}")
    books = web.billing.query("SELECT * FROM astaccount"), web.billing.query(
        "SELECT * FROM astledger"), web.billing.query("SELECT * FROM asttrunk")
    # shop: a balance and top-ups, nothing else
    assert web.ok("GET", "/accounts/1001", role="shop")["balance"] == "10.0000"
    for path in READS:
        assert web.call("GET", path, role="shop")[:3:2] == (
            403, {"error": "a shop token may not do this"}), path
    for method, path, body in WRITES:
        assert web.call(method, path, role="shop", body=body,
                        headers={"Idempotency-Key": "x"})[0] == 403, path
    rates = RATES.encode()
    assert web.call("POST", "/rates/tariff/gold", role="shop", raw=rates,
                    content_type="text/csv")[0] == 403
    # support: reads, no change of any kind
    for path in READS:
        assert web.call("GET", path, role="support")[0] == 200, path
    for method, path, body in WRITES:
        assert web.call(method, path, role="support", body=body,
                        headers={"Idempotency-Key": "x"})[:3:2] == (
            403, {"error": "a support token may not do this"}), path
    assert topup(web, "5", "support-key", role="support")[0] == 403
    assert web.call("POST", "/rates/tariff/gold", role="support", raw=rates,
                    content_type="text/csv")[0] == 403
    assert (web.billing.query("SELECT * FROM astaccount"), web.billing.query(
        "SELECT * FROM astledger"), web.billing.query("SELECT * FROM asttrunk")) == books
    # a shop's top-up goes through, recorded as the shop's
    assert topup(web, "2.50", "shop-key", role="shop")[0] == 200
    assert [(a, actor) for a, _, actor in ledger_rows(web, "topup")] == [("1001", "token:shop-1")]
    # admin: everything
    for path in READS:
        assert web.call("GET", path)[0] == 200, path
    for method, path, body in WRITES:
        assert web.call(method, path, body=body,
                        headers={"Idempotency-Key": f"admin-{path}"})[0] in (200, 201), path
    assert web.billing.balance("1001") == Decimal("11.5")
    assert web.billing.balance("2002") == Decimal(1)


# -- idempotent money --------------------------------------------------------------

def test_the_same_idempotency_key_tops_up_once(web):
    first = topup(web, "2.5", "order-17")
    again = topup(web, "2.50", "order-17")   # the same amount, written otherwise
    assert first[0] == again[0] == 200
    assert first[2] == again[2] == {
        "account": "1001", "tariff": "default", "balance": "12.5000", "reserved": "0.0000",
        "credit_limit": "0.0000", "available": "12.5000", "max_calls": 0, "calls": 0}
    assert topup(web, "3", "order-17")[::2] == (
        422, {"error": "idempotency key 'order-17' was used for another request"})
    web.billing.admin_ok("account", "add", "2002", "--balance", "0")
    assert topup(web, "2.5", "order-17", account="2002")[0] == 422
    assert web.call("POST", "/accounts/1001/topups", body={"amount": "1"})[::2] == (
        400, {"error": "an Idempotency-Key header is required: the same key again changes"
                       " nothing"})
    assert len(ledger_rows(web, "topup")) == 1
    assert web.billing.balance("1001") == Decimal("12.5")
    assert web.billing.balance("2002") == Decimal(0)


def test_each_token_has_idempotency_keys_of_its_own(web):
    # Two shops that happen to number their orders alike: neither top-up is
    # swallowed by the other's key, and neither learns the other's keys.
    other = json.loads(web.billing.admin_ok("token", "add", "shop-2", "--role", "shop",
                                            "--json"))["token"]
    web.billing.admin_ok("account", "add", "2002", "--balance", "0")
    assert topup(web, "5", "order-1", role="shop")[0] == 200
    status, _, reply = web.call("POST", "/accounts/1001/topups", token=other,
                                body={"amount": "5"}, headers={"Idempotency-Key": "order-1"})
    assert (status, reply["balance"]) == (200, "20.0000")
    status, _, reply = web.call("POST", "/accounts/2002/topups", token=other,
                                body={"amount": "7"}, headers={"Idempotency-Key": "order-2"})
    assert (status, reply["balance"]) == (200, "7.0000")
    assert topup(web, "7", "order-2", account="2002", role="shop")[0] == 200  # its own order-2
    assert [(account, actor) for account, _, actor in ledger_rows(web, "topup")] == [
        ("1001", "token:shop-1"), ("1001", "token:shop-2"), ("2002", "token:shop-2"),
        ("2002", "token:shop-1")]
    assert (web.billing.balance("1001"), web.billing.balance("2002")) == (20, 14)


def test_a_balance_beyond_what_can_be_stored_is_refused(web):
    assert topup(web, "999999999989.999999", "big-1")[0] == 200   # the largest there is
    assert topup(web, "0.000001", "big-2")[::2] == (
        400, {"error": "0.000001 would take account '1001' beyond the largest balance"})
    assert web.billing.balance("1001") == Decimal("999999999999.999999")
    assert web.billing.admin("audit")[0] == 0


def test_a_token_with_the_longest_name_is_recorded_whole(web):
    name = "s" * 80
    token = json.loads(web.billing.admin_ok("token", "add", name, "--role", "shop",
                                            "--json"))["token"]
    status, _, _ = web.call("POST", "/accounts/1001/topups", token=token, body={"amount": "1"},
                            headers={"Idempotency-Key": "k" * 80})
    assert status == 200
    assert [actor for _, _, actor in ledger_rows(web, "topup")] == [f"token:{name}"]


def test_two_keys_at_once_on_one_account_both_apply_exactly_once(web):
    """Eight keys, each sent twice, all sixteen requests at once."""
    keys = [f"burst-{n}" for n in range(8)]
    start, replies = threading.Barrier(16), []

    def send(key):
        start.wait()
        replies.append(topup(web, "1.25", key))
    threads = [threading.Thread(target=send, args=(key,)) for key in keys * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in replies) == [200] * 16, [r[2] for r in replies]
    assert len(ledger_rows(web, "topup")) == 8
    assert web.billing.balance("1001") == Decimal(20)
    assert sorted(r[2]["balance"] for r in replies)[-1] == "20.0000"
    assert web.billing.query("SELECT COUNT(*) FROM astidempotency") == [(8,)]
    status, _, _ = web.billing.admin("audit")
    assert status == 0


def test_an_adjustment_is_signed_once_and_never_below_the_available_credit(web):
    reply = web.ok("POST", "/accounts/1001/adjustments", body={"amount": "-2.5"},
                   headers={"Idempotency-Key": "fix-1"})
    assert reply["balance"] == "7.5000"
    assert web.call("POST", "/accounts/1001/adjustments", body={"amount": "-8"},
                    headers={"Idempotency-Key": "fix-2"})[::2] == (
        400, {"error": "adjustment -8 would take account '1001' below its available credit"})
    assert [(a, actor) for a, _, actor in ledger_rows(web, "adjust")] == [("1001", "token:admin-1")]


# -- accounts ----------------------------------------------------------------------

def test_accounts_are_created_read_changed_and_listed_by_page(web):
    created = web.call("POST", "/accounts", body={
        "account": "a/b 7", "balance": "0.50", "credit_limit": 5, "max_calls": 2})
    assert created[::2] == (201, {
        "account": "a/b 7", "tariff": "default", "balance": "0.5000", "reserved": "0.0000",
        "credit_limit": "5.0000", "available": "5.5000", "max_calls": 2, "calls": 0})
    assert web.ok("GET", "/accounts/a%2Fb%207")["available"] == "5.5000"
    assert web.ok("GET", "/accounts/a/b%207")["account"] == "a/b 7"
    assert web.ok("PATCH", "/accounts/a/b 7".replace(" ", "%20"),
                  body={"max_calls": "4"})["max_calls"] == 4
    assert topup(web, "1", "slash", account="a/b 7")[2]["balance"] == "1.5000"
    for n in range(3):
        web.ok("POST", "/accounts", body={"account": f"shop-{n}", "balance": 1.5})
    first = web.ok("GET", "/accounts?limit=2")
    assert ([a["account"] for a in first["accounts"]], first["next"]) == (["1001", "a/b 7"],
                                                                           "a/b 7")
    second = web.ok("GET", "/accounts?limit=2&after=" + urllib.parse.quote(first["next"]))
    assert [a["account"] for a in second["accounts"]] == ["shop-0", "shop-1"]
    assert [a["account"] for a in web.ok("GET", "/accounts?search=op-")["accounts"]] == [
        "shop-0", "shop-1", "shop-2"]
    assert web.ok("GET", "/accounts?search=%25")["accounts"] == []
    refused = [
        (("POST", "/accounts"), {"account": "1001", "balance": "1"}, 409, "account '1001' exists"),
        (("POST", "/accounts"), {"account": "x", "balance": 1e-7}, 400,
         "more than 6 decimals: 0.0000001"),
        (("POST", "/accounts"), {"account": "x", "balance": "1e3"}, 400,
         "not a plain decimal number: '1e3'"),
        (("POST", "/accounts"), {"account": "x", "balance": True}, 400,
         "not an exact amount: True"),
        (("POST", "/accounts"), {"account": "x"}, 400, "the field balance is required"),
        (("POST", "/accounts"), {"account": "x", "balance": "1", "colour": "red"}, 400,
         "unknown field 'colour'"),
        (("POST", "/accounts"), ["x"], 400, "the body must be a JSON object"),
        (("GET", "/accounts/nobody"), None, 404, "no account 'nobody'"),
        (("PATCH", "/accounts/1001"), {"tariff": "gold"}, 400,
         "unknown tariff 'gold': it has no rates (astbill-admin rate import)"),
        (("GET", "/accounts?limit=0"), None, 400,
         "limit must be a whole number from 1 to 1000: '0'"),
    ]
    for (method, path), body, status, error in refused:
        assert web.call(method, path, body=body)[::2] == (status, {"error": error}), (path, body)
    assert web.billing.query("SELECT COUNT(*) FROM astaccount") == [(5,)]


def test_a_malformed_body_or_path_is_one_json_line(web):
    for raw, content_type, error in ((b"{", "application/json", "the body is not JSON"),
                                     (b'{"amount": NaN}', "application/json",
                                      "the body is not JSON"),
                                     (b"\xff", "application/json", "the body is not JSON"),
                                     # which amount would count?
                                     (b'{"amount": "1", "amount": "2"}', "application/json",
                                      "the body is not JSON"),
                                     (b"[" * 60_000, "application/json",
                                      "the body is not JSON"),
                                     (b'{"amount": "1", "pad": "' + b" " * 70_000 + b'"}',
                                      "application/json", None),
                                     (b"amount=1", "application/x-www-form-urlencoded",
                                      "send a JSON object (Content-Type: application/json)")):
        expected = (400, {"error": error}) if error else (
            413, {"error": "the body is longer than 65536 bytes"})   # refused unread
        assert web.call("POST", "/accounts/1001/topups", raw=raw, content_type=content_type,
                        headers={"Idempotency-Key": "k"})[::2] == expected
    assert web.call("GET", "/nothing")[::2] == (404, {"error": "not found"})
    status, headers, reply = web.call("DELETE", "/accounts/1001")
    assert (status, reply, headers["Allow"]) == (405, {"error": "method not allowed"},
                                                 "GET, HEAD, OPTIONS, PATCH")
    assert web.billing.balance("1001") == Decimal(10)


def test_the_access_log_takes_no_line_from_a_client(web):
    # A newline in the path (%0A) would forge an admin's adjustment into the log.
    forged = "/x%0A127.0.0.1%20POST%20/api/v1/accounts/1001/adjustments%20200%20token:admin-1"
    assert web.call("GET", forged, role=None)[0] == 401
    # X-Forwarded-For is believed from the proxy --trusted-proxy names alone.
    web.call("GET", "/accounts/1001", headers={"X-Forwarded-For": "203.0.113.9"})
    log = web.stop()
    web.process.wait()
    assert not any(line.startswith("127.0.0.1 POST") for line in log.splitlines())
    assert "GET /api/v1/x\\n127.0.0.1 POST /api/v1/accounts/1001/adjustments 200" in log
    assert "astbill-web: 127.0.0.1 GET /api/v1/accounts/1001 200 token:admin-1" in log
    behind = Web(web.billing, debian.PYTHON, args=("--trusted-proxy", "127.0.0.1"),
                 tokens=web.tokens)
    behind.call("GET", "/accounts/1001", headers={"X-Forwarded-For": "203.0.113.9"})
    assert "astbill-web: 203.0.113.9 GET /api/v1/accounts/1001 200 token:admin-1" in behind.stop()


def test_a_database_failure_is_one_line_with_no_sql_and_is_logged(web):
    store = web.billing.store()
    store.execute_script(["DROP TABLE astidempotency"])
    store.close()
    assert topup(web, "1", "k")[::2] == (503, {"error": "the database is unavailable; try again"})
    assert web.billing.balance("1001") == Decimal(10)
    log = web.stop()
    assert "astidempotency" in log and "Traceback" not in log
    assert "POST /api/v1/accounts/1001/topups 503 token:admin-1\n" in log   # the access log
    web.process.wait()


# -- calls, CDRs, rates, trunks, routes ------------------------------------------

def test_calls_in_progress_and_no_lock_is_held_between_requests(web):
    gate = threading.Event()
    call = start_held_call(web.billing, gate, answered_ms=61_000)
    try:
        assert call.dial_reached.wait(30)
        found = web.ok("GET", "/calls", role="support")["calls"]
        assert [(c["uniqueid"], c["account"], c["dst"], c["max_secs"]) for c in found] == [
            (call.uniqueid, "1001", "4912345678", 3600)]
        shown = web.ok("GET", "/accounts/1001", role="shop")
        assert (shown["calls"], shown["reserved"], shown["available"]) == (1, "3.6000", "6.4000")
        assert topup(web, "1", "while-up", role="shop")[2]["balance"] == "11.0000"
        # Between requests the server holds no account lock (nor an open
        # transaction): another session gets the row at once.
        AccountLock(web.billing).release()
    finally:
        gate.set()
    assert call.wait().variables_set["ASTBILL_COST"] == "0.1200"
    assert web.ok("GET", "/calls")["calls"] == []
    assert web.ok("GET", "/accounts/1001")["balance"] == "10.8800"


def test_cdrs_by_account_and_time_paged_as_json_and_streamed_as_the_clis_csv(web):
    record_cdrs(web.billing, [(f"1.{n}", f"2026-02-01 00:00:{n:02d}", "1001" if n % 2 else "2002",
                               "=1+1" if n == 3 else "4930111222") for n in range(1, 8)])
    first = web.ok("GET", "/cdrs?limit=2&account=1001", role="support")
    assert [c["uniqueid"] for c in first["cdrs"]] == ["1.1", "1.3"]
    assert first["cdrs"][0]["margin"] == "-0.0100" and first["cdrs"][1]["src"] == "=1+1"
    rest = web.ok("GET", "/cdrs?account=1001&after=" + urllib.parse.quote(first["next"]))
    assert ([c["uniqueid"] for c in rest["cdrs"]], rest["next"]) == (["1.5", "1.7"], None)
    window = web.ok("GET", "/cdrs?since=2026-02-01%2000:00:02&until=2026-02-01%2000:00:05")
    assert [c["uniqueid"] for c in window["cdrs"]] == ["1.2", "1.3", "1.4"]
    status, headers, text = web.call("GET", "/cdrs?format=csv&account=1001")
    assert (status, headers.get_content_type()) == (200, "text/csv")
    # Sent as read: chunked, its length unknown when it starts.
    assert (headers["Transfer-Encoding"], headers["Content-Length"]) == ("chunked", None)
    assert text == web.billing.admin_ok("cdr", "--csv", "--account", "1001")
    assert ",'=1+1," in text
    assert web.call("GET", "/cdrs?since=2026-02-30")[::2] == (
        400, {"error": "since must look like 'YYYY-MM-DD HH:MM' (UTC): '2026-02-30'"})
    assert web.call("GET", "/cdrs?since=2026-02-02&until=2026-02-01&format=csv")[::2] == (
        400, {"error": "since '2026-02-02 00:00:00' is not before until '2026-02-01 00:00:00'"})


def test_rates_are_imported_all_or_nothing_and_listed_at_a_date(web):
    good = "prefix,destination,rate,connect_fee,min_secs,increment\n49,Germany gold,0.03,0,60,60\n"
    assert web.ok("POST", "/rates/tariff/gold", raw=good.encode(), content_type="text/csv") == {
        "tariff": "gold", "imported": 1, "rows": 1, "from": "1970-01-01 00:00:00"}
    later = good.replace("0.03", "0.02")
    assert web.ok("POST", "/rates/tariff/gold?from=2030-01-01", raw=later.encode(),
                  content_type="text/csv")["from"] == "2030-01-01 00:00:00"
    bad = ("prefix,destination,rate,connect_fee,min_secs,increment\n49,A,0.01,0,60,60\n"
           "49,B,0.01,0,60,60\n3a,C,0.01,0,60,60\n")
    assert web.call("POST", "/rates/tariff/gold", raw=bad.encode(), content_type="text/csv")[::2] == (
        400, {"error": "rates refused: 2 problems",
              "lines": ["rates:3: prefix 49 repeats line 2",
                        "rates:4: prefix must be 1 to 32 digits: '3a'"]})
    assert [r["rate"] for r in web.ok("GET", "/rates/tariff/gold")["rates"]] == ["0.0300"]
    assert [r["rate"] for r in web.ok("GET", "/rates/tariff/gold?at=2030-06-01")["rates"]] == [
        "0.0200"]
    assert web.call("GET", "/rates/tariff/gold?at=1969-01-01")[::2] == (
        404, {"error": "tariff 'gold' has no rates in force at 1969-01-01 00:00:00"})
    assert web.call("POST", "/rates/trunk/nobody", raw=good.encode(), content_type="text/csv")[
        ::2] == (404, {"error": "no trunk 'nobody' (astbill-admin trunk add nobody --dial ...)"})
    assert web.call("GET", "/rates/carrier/x")[0] == 400
    assert web.billing.query("SELECT COUNT(*) FROM astdeck WHERE name = 'gold'") == [(2,)]


def test_trunks_are_listed_enabled_and_disabled_and_routes_follow(web):
    web.billing.admin_ok("trunk", "add", "carrier-a", "--dial", "SIP/carrier-a/{number}")
    buy = "prefix,destination,rate,connect_fee,min_secs,increment\n49,Germany,0.01,0,60,60\n"
    web.ok("POST", "/rates/trunk/carrier-a", raw=buy.encode(), content_type="text/csv")
    route = web.ok("GET", "/route?number=004930123&account=1001")
    assert (route["status"], [t["name"] for t in route["trunks"]]) == ("OK", ["carrier-a"])
    assert web.ok("POST", "/trunks/carrier-a/disable")["enabled"] is False
    assert web.ok("GET", "/trunks")["trunks"][0]["enabled"] is False
    assert web.ok("GET", "/route?number=004930123&account=1001")["status"] == "NOROUTE"
    assert web.ok("POST", "/trunks/carrier-a/enable")["enabled"] is True
    assert web.call("POST", "/trunks/nobody/enable")[::2] == (404, {"error": "no trunk 'nobody'"})
    assert web.call("GET", "/route?number=x&account=1001")[::2] == (
        400, {"error": "not a number to dial: 'x'"})
    assert web.call("GET", "/route?number=4930")[::2] == (
        400, {"error": "the query parameter account is required"})


def test_the_openapi_document_describes_what_is_served(web):
    document = web.ok("GET", "/openapi.json", role=None)
    assert document["openapi"].startswith("3.")
    operations = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert operations == {
        ("GET", "/accounts"), ("POST", "/accounts"), ("GET", "/accounts/{account}"),
        ("PATCH", "/accounts/{account}"), ("POST", "/accounts/{account}/topups"),
        ("POST", "/accounts/{account}/adjustments"), ("GET", "/calls"), ("GET", "/cdrs"),
        ("POST", "/rates/{kind}/{name}"), ("GET", "/rates/{kind}/{name}"), ("GET", "/trunks"),
        ("POST", "/trunks/{name}/enable"), ("POST", "/trunks/{name}/disable"), ("GET", "/route"),
        ("GET", "/audit")}
    topups = document["paths"]["/accounts/{account}/topups"]["post"]
    assert {"name": "Idempotency-Key", "in": "header", "required": True}.items() <= {
        k: v for p in topups["parameters"] for k, v in p.items()
        if p["name"] == "Idempotency-Key"}.items()
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                                   "scheme": "bearer"}
    assert {p["name"]: p["required"] for p in document["paths"]["/route"]["get"]["parameters"]} == {
        "number": True, "account": True}


def test_a_call_never_loads_the_administration():
    """astbill.py's start-up is the per-call cost: nothing of admin/, Flask
    or waitress is imported on a call's path."""
    python = debian.require_python({**debian.PACKAGES, **debian.WEB_PACKAGES})
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import astbill.main, astbill.callflow,"
            " astbill.recovery; print(sorted(m for m in sys.modules"
            " if m.startswith(('astbill.admin', 'flask', 'waitress', 'werkzeug'))))")
    result = subprocess.run([python, "-I", "-c", code, str(ROOT / "lib")], capture_output=True,
                            text=True, timeout=60, env=debian.env())
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")


def test_a_bad_command_line_or_config_is_one_line(tmp_path):
    python = debian.require_python({**debian.PACKAGES, **debian.WEB_PACKAGES})
    config = tmp_path / "astbill.yaml"
    config.write_text("database: sqlite:///x.db\ndial: 'SIP/{number}'\ncolour: red\n")
    for argv, error in ((["--listen", "8080"], "--listen must be HOST:PORT, such as"
                                               " 127.0.0.1:8080: '8080'"),
                        (["-c", str(config)], f"{config}: unknown setting 'colour'")):
        result = subprocess.run([python, "-I", WEB, *argv], capture_output=True, text=True,
                                timeout=60, env=debian.env())
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "", f"astbill-web: {error}\n"), argv
    result = subprocess.run([python, "-I", WEB, "--help"], capture_output=True, text=True,
                            timeout=60, env=debian.env())
    assert result.returncode == 0 and "\nexamples:\n  astbill-web -c " in result.stdout
