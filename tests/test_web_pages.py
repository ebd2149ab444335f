"""The operator console and the customer portal over real HTTP: astbill-web
started as a process on Debian's Python (as test_web_api.py does), on
SQLite and on MariaDB, driven by a cookie-keeping client that never
follows a redirect, and by a real browser (Debian's headless chromium
through Debian's python3-selenium).  Each security property has a test
that fails without its defence.
"""
import http.cookiejar
import io
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal

import pytest

import debian
from conftest import start_held_call
from test_admin import record_cdrs
from test_web_api import Web, web_billing

from astbill.admin import actions
from astbill.ledger import timestamp

PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password",
             "1001": "customer 1001's password", "2002": "customer 2002's password"}
BUY = "prefix,destination,rate,connect_fee,min_secs,increment\n49,Germany,0.01,0,60,60\n"
SCRIPT, IMAGE = "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>'


def with_stdin(billing, text, *argv):
    """astbill-admin in-process, its stdin ``text``."""
    kept, sys.stdin = sys.stdin, io.StringIO(text + "\n")
    try:
        return billing.admin_ok(*argv)
    finally:
        sys.stdin = kept


def make_logins(billing):
    """alice (admin), bob (support), and portal passwords for 1001 and 2002."""
    for name, role in (("alice", "admin"), ("bob", "support")):
        with_stdin(billing, PASSWORDS[name], "user", "add", name, "--role", role,
                   "--password-stdin")
    for account in ("1001", "2002"):
        with_stdin(billing, PASSWORDS[account], "account", "password", account,
                   "--password-stdin")


@pytest.fixture(params=["sqlite", "pymysql"])
def console(request, tmp_path):
    """astbill-web on SQLite or MariaDB: accounts 1001 (10.0000) and 2002
    (5.0000), a trunk, staff users and portal passwords."""
    python, billing = web_billing(request, tmp_path)
    billing.admin_ok("account", "add", "2002", "--balance", "5")
    billing.admin_ok("trunk", "add", "carrier-a", "--dial", "SIP/carrier-a/{number}")
    (tmp_path / "buy.csv").write_text(BUY)
    billing.admin_ok("rate", "import", str(tmp_path / "buy.csv"), "--trunk", "carrier-a")
    make_logins(billing)
    server = Web(billing, python)
    yield server
    log = server.stop()
    assert "Traceback" not in log, log
    assert not any(p in log for p in PASSWORDS.values())


class Client:
    """A browser's HTTP: cookies kept, redirects not followed (seen instead)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    def __init__(self, web):
        self.web, self.jar = web, http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  self.NoRedirect)

    def request(self, method, path, fields=None, headers=()):
        """(status, headers, text)."""
        data = None if fields is None else urllib.parse.urlencode(fields).encode()
        req = urllib.request.Request(self.web.url + path, data=data, method=method,
                                     headers=dict(headers))
        try:
            with self.opener.open(req, timeout=60) as reply:
                return reply.status, reply.headers, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read().decode()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, fields, csrf=True, **kw):
        """A form's POST, with the CSRF token of the session's pages."""
        if csrf:
            fields = dict(fields, csrf=self.form_token(self.home))
        return self.request("POST", path, fields, **kw)

    def form_token(self, page):
        return re.search(r'name="csrf" value="([^"]+)"', self.get(page)[2]).group(1)

    home = "/accounts"

    def login(self, name, password=None, portal=False):
        """The login form of the console or the portal, sent with its token."""
        self.home = "/portal" if portal else "/accounts"
        path = "/portal/login" if portal else "/login"
        return self.request("POST", path, {"name": name, "password": password or PASSWORDS[name],
                                           "csrf": self.form_token(path)})

    def cookie(self, name):
        return next((c.value for c in self.jar if c.name == name), None)


def logged_in(web, name, portal=False):
    client = Client(web)
    status, headers, _ = client.login(name, portal=portal)
    assert (status, headers["Location"]) == (302, "/portal" if portal else "/"), name
    return client


def books(web):
    q = web.billing.query
    return (q("SELECT * FROM astaccount ORDER BY account"), q("SELECT * FROM astledger"),
            q("SELECT * FROM asttrunk"), q("SELECT * FROM astdeck"))


# Every page of the console, and every form with what it sends.
PAGES = ["/", "/live/calls", "/accounts", "/accounts?search=10", "/accounts/1001", "/rates",
         "/trunks", "/cdrs", "/cdrs.csv", "/audit"]
FORMS = [("/accounts", {"account": "3003", "balance": "1"}),
         ("/accounts/1001/topup", {"amount": "5", "key": "k"}),
         ("/accounts/1001/change", {"max_calls": "3"}),
         ("/accounts/1001/password", {"password": "a new long password"}),
         ("/rates", {"kind": "tariff", "name": "gold"}),
         ("/trunks/carrier-a/disable", {})]


# -- sessions ------------------------------------------------------------------------

def test_nothing_but_the_login_pages_and_static_files_without_a_session(console):
    before = books(console)
    anonymous = Client(console)
    for path in PAGES:
        status, headers, text = anonymous.get(path)
        assert (status, headers["Location"]) == (302, "/login"), path
        assert "1001" not in text
    assert anonymous.get("/portal")[1]["Location"] == "/portal/login"
    for path, fields in FORMS:
        assert anonymous.request("POST", path, fields)[:2][0] == 302, path
    assert anonymous.request("POST", "/logout", {})[0] == 302
    for path in ("/login", "/portal/login", "/static/style.css", "/static/live.js"):
        assert anonymous.get(path)[0] == 200, path
    # A forged or stale cookie is no session either.
    anonymous.jar.set_cookie(http.cookiejar.Cookie(
        0, "astbill_session", "forged", None, False, "127.0.0.1", False, False, "/", True,
        False, None, False, None, None, {}))
    assert anonymous.get("/accounts/1001")[0] == 302
    assert books(console) == before


def test_a_session_cookie_is_httponly_lax_stored_hashed_and_ends_at_logout_or_expiry(console):
    alice = Client(console)
    status, headers, _ = alice.login("alice")
    cookie = alice.cookie("astbill_session")
    set_cookie = [h for h in headers.get_all("Set-Cookie") if h.startswith("astbill_session=")]
    assert len(set_cookie) == 1 and "HttpOnly" in set_cookie[0] and "SameSite=Lax" in set_cookie[0]
    assert "Secure" not in set_cookie[0]   # plain HTTP, no proxy trusted
    stored = console.billing.query("SELECT session_hash, kind, name FROM astsession")
    assert [(k, n) for _, k, n in stored] == [("user", "alice")]
    assert cookie not in repr(console.billing.query("SELECT * FROM astsession"))
    assert alice.get("/")[0] == 200
    # Expired: refused, whatever the cookie says.
    store = console.billing.store()
    store.atomic(lambda tx: tx.run("UPDATE astsession SET expires = '2000-01-01 00:00:00'"))
    store.close()
    assert alice.get("/")[:2][0] == 302
    # Logged out: the same cookie, sent again, is nobody's.
    alice = logged_in(console, "alice")
    kept = alice.cookie("astbill_session")
    assert alice.post("/logout", {})[0] == 302
    replay = Client(console)
    replay.jar.set_cookie(http.cookiejar.Cookie(
        0, "astbill_session", kept, None, False, "127.0.0.1", False, False, "/", True,
        False, None, False, None, None, {}))
    assert replay.get("/")[0] == 302
    # A user removed is logged out at once, and stays so when added again
    # (the way to give a user a new password).
    bob = logged_in(console, "bob")
    assert bob.get("/accounts")[0] == 200
    console.billing.admin_ok("user", "remove", "bob")
    assert bob.get("/accounts")[0] == 302
    with_stdin(console.billing, "a new password for bob", "user", "add", "bob", "--role",
               "admin", "--password-stdin")
    assert bob.get("/accounts")[0] == 302
    # A customer's new portal password ends the sessions of the old one.
    customer = logged_in(console, "1001", portal=True)
    assert customer.get("/portal")[0] == 200
    with_stdin(console.billing, "another portal password", "account", "password", "1001",
               "--password-stdin")
    assert customer.get("/portal")[0] == 302


def test_the_cookie_is_secure_behind_a_trusted_tls_proxy_only(console):
    https = {"X-Forwarded-Proto": "https"}
    # Not configured: the header is anyone's, and not believed.
    status, headers, _ = Client(console).get("/login", headers=https)
    assert "Secure" not in headers["Set-Cookie"]
    behind = Web(console.billing, debian.PYTHON, args=("--trusted-proxy", "127.0.0.1"),
                 tokens=console.tokens)
    try:
        client = Client(behind)
        status, headers, _ = client.get("/login", headers=https)
        assert "; Secure" in headers["Set-Cookie"]
        assert "Secure" not in client.get("/login")[1]["Set-Cookie"]   # plain HTTP
    finally:
        behind.stop()


def test_every_form_needs_its_csrf_token(console):
    alice = logged_in(console, "alice")
    before = books(console)
    for path, fields in FORMS:
        assert alice.post(path, fields, csrf=False)[0] == 403, path
        assert alice.request("POST", path, dict(fields, csrf="x" * 43))[0] == 403, path
        assert alice.request("POST", path, dict(fields, csrf="é" * 43))[0] == 403, path
    # Another session's token is not this one's.
    bob = logged_in(console, "bob")
    status, _, text = alice.request("POST", "/accounts/1001/topup",
                                    {"amount": "5", "csrf": bob.form_token("/accounts")})
    assert status == 403 and "did not come from here" in text
    assert books(console) == before
    # The login form's token too: a login posted from elsewhere is refused.
    assert Client(console).request("POST", "/login", {"name": "alice",
                                                      "password": PASSWORDS["alice"]})[0] == 403
    assert alice.post("/accounts/1001/topup", {"amount": "5"})[0] == 302
    assert console.billing.balance("1001") == Decimal(15)


def test_a_name_logs_in_only_as_written(console):
    # On MySQL a case- and space-blind name would let ALICE in as alice, and
    # past alice's own throttle.
    for name in ("ALICE", "Alice", "alice ", " alice"):
        assert Client(console).login(name, PASSWORDS["alice"])[0] == 401, name
    assert console.billing.query("SELECT COUNT(*) FROM astsession") == [(0,)]


def test_logins_are_throttled_per_user_and_per_address(console):
    client = Client(console)
    for _ in range(5):
        assert client.login("alice", "wrong password")[0] == 401
    status, _, text = client.login("alice")   # the right password, too late
    assert status == 429 and "too many failed logins" in text
    assert client.login("bob")[0] == 302      # another name from here: not yet
    for n in range(15):
        assert client.login(f"nobody-{n}", "wrong password")[0] == 401
    assert client.login("bob")[0] == 429      # 20 failures from this address
    assert console.billing.query("SELECT kind, name FROM astsession") == [("user", "bob")]


# -- roles -----------------------------------------------------------------------------

def test_support_reads_every_page_and_changes_nothing_admin_changes_as_itself(console):
    bob = logged_in(console, "bob")
    for path in PAGES:
        assert bob.get(path)[0] == 200, path
    before = books(console)
    token = bob.form_token("/accounts")
    for path, fields in FORMS:
        status, _, text = bob.request("POST", path, dict(fields, csrf=token))
        assert (status, "a support user may not do this" in text) == (403, True), path
    assert books(console) == before
    alice = logged_in(console, "alice")
    assert alice.post("/accounts/1001/topup", {"amount": "2.50", "key": "once"})[0] == 302
    assert alice.post("/accounts/1001/topup", {"amount": "2.50", "key": "once"})[0] == 302
    assert console.billing.query("SELECT amount, kind, actor FROM astledger WHERE kind = 'topup'"
                                 ) == [(2500000 if console.billing.backend == "sqlite"
                                        else Decimal("2.500000"), "topup", "user:alice")]
    assert alice.post("/accounts", {"account": "3003", "balance": "1"})[1]["Location"] == (
        "/accounts/3003")
    assert console.billing.query("SELECT actor FROM astledger WHERE account = '3003'") == [
        ("user:alice",)]
    assert alice.post("/trunks/carrier-a/disable", {})[0] == 302
    assert console.billing.query("SELECT enabled FROM asttrunk") == [(0,)]
    # The console's CSV is the API's.
    record_cdrs(console.billing, [("1.1", "2026-02-01 00:00:01", "1001", "=1+1")])
    assert alice.get("/cdrs.csv?account=1001")[2] == console.call(
        "GET", "/cdrs?format=csv&account=1001")[2]


def test_a_customer_sees_their_own_account_and_nothing_else(console):
    record_cdrs(console.billing, [("1.1", timestamp(), "1001", "111"),
                                  ("2.1", timestamp(), "2002", "222")])
    customer = logged_in(console, "1001", portal=True)
    status, _, text = customer.get("/portal")
    assert status == 200 and 'id="balance">10.0000<' in text
    assert "&lt;111&gt;" in text and "&lt;222&gt;" not in text and "2002" not in text
    # Another account's id, anywhere: refused, or the customer's own.
    for path in ("/accounts/2002", "/accounts/1001", "/accounts", "/", "/cdrs", "/cdrs.csv",
                 "/cdrs?account=2002", "/live/calls"):
        assert customer.get(path)[0] == 403, path
    assert "2002" not in customer.get("/portal?account=2002")[2]
    token = customer.form_token("/portal")
    before = books(console)
    for path, fields in FORMS:
        assert customer.request("POST", path, dict(fields, csrf=token))[0] == 403, path
    assert books(console) == before
    # A staff user is no customer, and a customer's password no staff login.
    assert logged_in(console, "alice").get("/portal")[0] == 403
    assert Client(console).login("1001", PASSWORDS["1001"])[0] == 401
    assert Client(console).login("2002", PASSWORDS["1001"], portal=True)[0] == 401


def test_the_portal_prices_a_destination_as_the_clis_route_does(console):
    customer = logged_in(console, "1001", portal=True)
    text = customer.get("/portal?number=004930123")[2]
    assert "4930123:\n0.0300 a minute, 0.0100 to connect;" in text
    assert "carrier-a" not in text   # no trunk of ours is shown to a customer
    route = console.ok("GET", "/route?number=004930123&account=1001")
    assert f"up to {route['max_secs'] // 60} minutes" in text
    status, _, text = customer.get("/portal?number=x")
    assert (status, "not a number to dial: &#39;x&#39;" in text) == (400, True)


# -- what is shown --------------------------------------------------------------------

def test_caller_data_renders_as_text_on_every_page(console):
    record_cdrs(console.billing, [("x.1", timestamp(), "1001", "111")])
    store = console.billing.store()
    store.atomic(lambda tx: tx.run("UPDATE astcdr SET clid = ?, dst = ?, trunk = ?",
                                   (SCRIPT, IMAGE, SCRIPT)))
    store.close()
    console.billing.admin_ok("account", "add", IMAGE, "--balance", "1")
    pages = [(logged_in(console, "alice"), p)
             for p in ("/", "/cdrs", "/accounts", "/accounts/1001",
                       "/accounts/" + urllib.parse.quote(IMAGE, safe=""))]
    pages.append((logged_in(console, "1001", portal=True), "/portal"))
    for client, path in pages:
        status, _, text = client.get(path)
        assert status == 200, path
        assert SCRIPT not in text and IMAGE not in text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text or "&#34;&gt;&lt;img" in text, path
        assert "<img" not in text and "<script>" not in text, path


def test_an_error_is_one_line_with_no_traceback_or_sql_and_is_logged(console):
    alice = logged_in(console, "alice")
    status, _, text = alice.post("/accounts/1001/topup", {"amount": "1e3"})
    assert (status, "not a plain decimal number: &#39;1e3&#39;" in text) == (400, True)
    store = console.billing.store()
    store.execute_script(["DROP TABLE astidempotency"])
    store.close()
    status, _, text = alice.post("/accounts/1001/topup", {"amount": "1", "key": "k"})
    assert status == 503 and "the database is unavailable; try again" in text
    assert "astidempotency" not in text and "Traceback" not in text and "SELECT" not in text
    assert console.billing.balance("1001") == Decimal(10)
    log = console.stop()
    assert "astidempotency" in log and "Traceback" not in log
    assert "POST /accounts/1001/topup 503 user:alice\n" in log
    console.process.wait()


def test_rates_uploaded_with_a_bad_line_are_refused_by_line(console):
    alice = logged_in(console, "alice")
    bad = ("prefix,destination,rate,connect_fee,min_secs,increment\n49,A,0.01,0,60,60\n"
           "3a,B,1,0,1,1\n")
    status, _, text = upload(alice, "gold", bad)
    assert (status, "rates refused: 1 problems" in text) == (400, True)
    assert "rates:3: prefix must be 1 to 32 digits: &#39;3a&#39;" in text
    assert console.billing.query("SELECT COUNT(*) FROM astdeck WHERE name = 'gold'") == [(0,)]
    status, _, text = upload(alice, "gold", bad.replace("3a", "31"))
    assert status == 200 and "Imported 2 prefixes (2 rows)" in text and "gold" in text


def upload(client, name, text):
    """The rates form's POST: multipart, as a browser sends a file."""
    boundary = "astbill-test-boundary"
    fields = {"csrf": client.form_token("/accounts"), "kind": "tariff", "name": name}
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in fields.items())
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="r.csv"\r\n'
             f"Content-Type: text/csv\r\n\r\n{text}\r\n--{boundary}--\r\n")
    req = urllib.request.Request(
        client.web.url + "/rates", data=body.encode(), method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with client.opener.open(req, timeout=60) as reply:
            return reply.status, reply.headers, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


# -- a real browser -----------------------------------------------------------------

DEBIAN_SELENIUM = "/usr/lib/python3/dist-packages"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    """Debian's headless chromium, driven through Debian's python3-selenium
    (setup-env installs chromium, chromium-driver and python3-selenium)."""
    if DEBIAN_SELENIUM not in sys.path:
        sys.path.append(DEBIAN_SELENIUM)   # last: the project's own packages come first
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        found = os.access(CHROMEDRIVER, os.X_OK)
    except ImportError:
        found = False
    if not found:
        why = ("Debian's chromium, chromium-driver and python3-selenium are needed"
               " (scripts/setup-env --with-mariadb)")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(driver, check, seconds=20):
    """``check(driver)`` true; the page may be changing meanwhile (a form's
    reply loading, the calls refreshed)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds, poll_frequency=0.1, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(check)


def browse(driver, web, path):
    driver.get(web.url + path)


def by_id(driver, name):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, name)


def browser_login(driver, web, name, portal=False):
    browse(driver, web, "/portal/login" if portal else "/login")
    by_id(driver, "name").send_keys(name)
    by_id(driver, "password").send_keys(PASSWORDS[name])
    by_id(driver, "login").click()
    wait_for(driver, lambda d: "/login" not in d.current_url)


@pytest.mark.parametrize("console", ["sqlite", "pymysql"], indirect=True)
def test_in_a_browser_top_up_upload_rates_watch_a_call_and_see_the_charts(console, browser,
                                                                          tmp_path):
    from selenium.webdriver.common.by import By
    now = time.time()
    record_cdrs(console.billing, [(f"c.{n}", timestamp(now - n * 3000), "1001", "111")
                                  for n in range(12)])
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser_login(browser, console, "alice")
    # The dashboard's charts, drawn by the server: SVG bars of non-zero size.
    for chart in ("hours", "days", "trunks"):
        bars = browser.find_elements(By.CSS_SELECTOR, f"svg#chart-{chart} rect")
        assert bars and any(int(b.get_attribute("height")) > 0 for b in bars), chart
    assert by_id(browser, "today-calls").text == str(len([n for n in range(12) if timestamp(
        now - n * 3000)[:10] == timestamp(now)[:10]]))
    browser.save_screenshot(str(shots / "dashboard.png"))
    # A top-up, and the new balance.
    browse(browser, console, "/accounts/1001")
    by_id(browser, "amount").send_keys("7.25")
    by_id(browser, "topup").find_element(By.TAG_NAME, "button").click()
    wait_for(browser, lambda d: by_id(d, "balance").text == "17.2500")
    assert "user:alice" in by_id(browser, "summary").find_element(
        By.XPATH, "following::table[contains(@class, 'history')]").text
    browser.save_screenshot(str(shots / "account.png"))
    # A rates file with a bad line: the error, by line.
    bad = tmp_path / "gold.csv"
    bad.write_text("prefix,destination,rate,connect_fee,min_secs,increment\n"
                   "49,Germany,0.05,0,60,60\n49x,Oops,0.05,0,60,60\n")
    browse(browser, console, "/rates")
    by_id(browser, "deck-name").send_keys("gold")
    by_id(browser, "file").send_keys(str(bad))
    by_id(browser, "upload").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "lines"))
    assert by_id(browser, "lines").text == "rates:3: prefix must be 1 to 32 digits: '49x'"
    browser.save_screenshot(str(shots / "rates-refused.png"))
    # A call held by a real astbill.py shows up in calls in progress, unreloaded.
    browse(browser, console, "/")
    gate = threading.Event()
    call = start_held_call(console.billing, gate)
    try:
        assert call.dial_reached.wait(30)
        wait_for(browser, lambda d: "4912345678" in by_id(d, "calls").text)
        browser.save_screenshot(str(shots / "call-in-progress.png"))
    finally:
        gate.set()
    call.wait()
    wait_for(browser, lambda d: "No call in progress." in by_id(d, "calls").text)
    for name, path in (("cdrs", "/cdrs"), ("accounts", "/accounts"), ("trunks", "/trunks"),
                       ("audit", "/audit")):
        browse(browser, console, path)
        browser.save_screenshot(str(shots / f"{name}.png"))
    # The CDRs written above have no ledger rows: the audit names each.
    assert by_id(browser, "audit").text == "12 problems:"
    # The customer's portal: their balance, and a destination's price.
    browser.delete_all_cookies()
    browse(browser, console, "/portal/login")
    browser.save_screenshot(str(shots / "portal-login.png"))
    browser_login(browser, console, "1001", portal=True)
    by_id(browser, "number").send_keys("004930123")
    by_id(browser, "quote").find_element(By.TAG_NAME, "button").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "price"))
    assert "0.0300 a minute" in by_id(browser, "price").text
    assert by_id(browser, "balance").text == console.ok("GET", "/accounts/1001")["balance"]
    browser.save_screenshot(str(shots / "portal.png"))
    print(f"screenshots in {shots}")


# -- the dashboard's figures ------------------------------------------------------

def test_the_dashboards_figures_by_hour_day_and_trunk(tariff):
    """actions.statistics, on each backend: today's CDRs by hour and per
    trunk, the 30 days' by day; older CDRs and tomorrow's are not counted."""
    billing = tariff
    record_cdrs(billing, [("t.1", "2026-03-10 09:15:00", "1001", "1"),
                          ("t.2", "2026-03-10 09:45:00", "1001", "1"),
                          ("t.3", "2026-03-10 17:00:00", "1001", "1"),
                          ("y.1", "2026-03-09 23:59:59", "1001", "1"),
                          ("o.1", "2026-02-08 23:59:59", "1001", "1"),   # 30 days before: out
                          ("n.1", "2026-03-11 00:00:00", "1001", "1")])  # tomorrow: out
    store = billing.store()
    try:
        # One call unanswered, on another trunk, and one sent over no trunk.
        store.atomic(lambda tx: tx.run("UPDATE astcdr SET disposition = 'NO ANSWER', billsec = 0,"
                                       " cost = 0, buy_cost = 0, trunk = 'carrier-b'"
                                       " WHERE uniqueid = 't.2'"))
        store.atomic(lambda tx: tx.run("UPDATE astcdr SET trunk = '', buy_cost = NULL"
                                       " WHERE uniqueid = 't.3'"))
        figures = actions.statistics(load_settings(billing), store, "2026-03-10")
        # The days before it, kept by the caller, give the same figures.
        kept = {}
        for _ in range(2):
            assert actions.statistics(load_settings(billing), store, "2026-03-10", kept) == figures
        assert sorted(kept)[::28] == ["2026-02-09", "2026-03-09"]
    finally:
        store.close()
    assert figures["today"] == {
        "label": "2026-03-10", "calls": 3, "answered": 2, "minutes": "2.0", "revenue": "0.2400",
        "buy_cost": "0.1300", "margin": "-0.0100", "asr": "66.7", "acd": 61}
    assert [(h["label"], h["calls"]) for h in figures["hours"] if h["calls"]] == [
        ("09", 2), ("17", 1)]
    assert len(figures["hours"]) == 24 and len(figures["days"]) == 30
    assert (figures["days"][0]["label"], figures["days"][-1]["label"]) == ("2026-02-09",
                                                                           "2026-03-10")
    assert [(d["label"], d["revenue"]) for d in figures["days"] if d["calls"]] == [
        ("2026-03-09", "0.1200"), ("2026-03-10", "0.2400")]
    assert [(t["label"], t["calls"], t["asr"], t["acd"], t["minutes"]) for t in figures["trunks"]
            ] == [("", 1, "100.0", 61, "1.0"), ("carrier-a", 1, "100.0", 61, "1.0"),
                  ("carrier-b", 1, "0.0", None, "0.0")]


def load_settings(billing):
    from astbill.config import load
    return load(str(billing.config))
