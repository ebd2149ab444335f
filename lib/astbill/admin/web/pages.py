"""The operator console and the customer portal: pages rendered by the
server (Jinja, autoescaped; no script but static/live.js, which refreshes
the calls in progress), under the same service as the API.

Staff users (``astbill-admin user add``) log in to the console: a support
user reads, an admin changes too -- checked here, on every page and form.
A customer logs in to the portal with their account's name and the
password the operator set (``astbill-admin account password``) and sees
that account, and nothing else: no portal URL names an account.

A session is a random cookie (HttpOnly, SameSite=Lax, Secure over TLS),
of which the database keeps only the SHA-256; it ends at logout or after
``auth.SESSION_SECONDS``.  Every form carries the session's CSRF token
(the login forms: a token that is also a cookie), and a POST without it
is refused.  Failed logins are counted per name and per address.  An error
is one line on a page; what went wrong inside goes to the log.
"""
import functools
import secrets
import threading
import time
import traceback
from decimal import Decimal

from flask import (Blueprint, Response, abort, current_app, g, redirect, render_template,
                   request, stream_with_context, url_for)
from werkzeug.exceptions import HTTPException

from ... import config
from ...store import StoreError, open_store
from .. import actions, auth
from ..actions import ActionError
from .replies import STATUS, log, shown_path

bp = Blueprint("pages", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")

COOKIE = "astbill_session"
LOGIN_COOKIE = "astbill_login"   # the login form's CSRF token, before there is a session
LOGINS = {"pages.login", "pages.portal_login"}
CDR_PAGE = 100
HEADERS = {
    # Nothing from elsewhere, no inline script: a tag that slipped through
    # escaping would still not run.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Throttle:
    """Failed logins of the last WINDOW seconds per key (a name, an
    address): at MOST of them, the key is refused until the oldest ages out.
    Kept in the service's memory: one process serves every request."""
    WINDOW = 15 * 60
    KEYS = 100_000

    def __init__(self, most):
        self.most, self.failures, self.lock = most, {}, threading.Lock()

    def refused(self, key):
        # Reads only: a name asked about must not take memory of its own.
        with self.lock:
            since = time.monotonic() - self.WINDOW
            return sum(t > since for t in self.failures.get(key, ())) >= self.most

    def failed(self, key):
        with self.lock:
            now = time.monotonic()
            if len(self.failures) > self.KEYS:   # names sprayed at random: forget the old
                self.failures = {k: t for k, t in self.failures.items()
                                 if t and t[-1] > now - self.WINDOW}
            self.failures[key] = [t for t in self.failures.get(key, ())
                                  if t > now - self.WINDOW] + [now]


BY_NAME, BY_ADDRESS = Throttle(5), Throttle(20)
PAST_DAYS = {}   # the dashboard's days before today, as actions.statistics keeps them


# -- every request ---------------------------------------------------------------

@bp.before_request
def session():
    """The request's session, and its CSRF token checked on every POST;
    without a session nothing but a login page (and static files) is served."""
    if request.endpoint == "pages.static":
        return None
    g.settings = config.load(current_app.config["ASTBILL_CONFIG"])
    g.store = open_store(g.settings)
    found = auth.session(g.store, request.cookies.get(COOKIE))
    g.kind, g.name, g.csrf, g.role = found or (None, None, None, None)
    if found:
        g.actor = f"{g.kind}:{g.name}"
    if request.endpoint in LOGINS:
        expected = request.cookies.get(LOGIN_COOKIE)
    elif found is None:
        portal = request.path.startswith("/portal")
        return redirect(url_for("pages.portal_login" if portal else "pages.login"))
    else:
        expected = g.csrf
    if request.method == "POST" and not (expected and secrets.compare_digest(
            request.form.get("csrf", "").encode(), expected.encode())):   # bytes: any text
        abort(403, "this form has expired or did not come from here: reload the page")
    return None


@bp.after_request
def headers(reply):
    reply.headers.update(HEADERS)
    return reply


def staff(grant):
    """A console page: a staff user's session whose role allows ``grant``
    ("read" or "write", as for tokens)."""
    def wrap(view):
        @functools.wraps(view)
        def checked(**params):
            if g.kind != "user":
                abort(403, "this page is for staff")
            if not auth.allows(g.role, grant):
                abort(403, f"a {g.role} user may not do this")
            return view(**params)
        return checked
    return wrap


def customer(view):
    @functools.wraps(view)
    def checked(**params):
        if g.kind != "account":
            abort(403, "this page is for customers")
        return view(**params)
    return checked


def page(template, status=200, **values):
    return render_template(template, kind=g.get("kind"), role=g.get("role"),
                           user=g.get("name"), csrf=g.get("csrf"), **values), status


# -- logging in and out ----------------------------------------------------------

@bp.route("/login", methods=["GET", "POST"])
def login():
    return login_page("login.html", "user", "pages.dashboard")


@bp.route("/portal/login", methods=["GET", "POST"])
def portal_login():
    return login_page("portal_login.html", "account", "pages.portal")


def login_page(template, kind, home):
    """A login form, or a login: the name and the address are throttled
    before the password is checked."""
    if request.method == "GET":
        return login_form(template)
    name, address = request.form.get("name", ""), request.remote_addr
    if len(name) > 80:   # no user or account has such a name: not worth a throttle's key
        return login_form(template, "wrong name or password", 401)
    if BY_NAME.refused((kind, name)) or BY_ADDRESS.refused(address):
        return login_form(template, "too many failed logins: try again in 15 minutes", 429)
    check = auth.login if kind == "user" else auth.account_login
    if check(g.store, name, request.form.get("password", "")) is None:
        BY_NAME.failed((kind, name))
        BY_ADDRESS.failed(address)
        log(f"{address} failed login of {kind} {name!r}")
        return login_form(template, "wrong name or password", 401)
    cookie = auth.open_session(g.settings, g.store, kind, name)
    g.actor = f"{kind}:{name}"
    reply = redirect(url_for(home))
    set_cookie(reply, COOKIE, cookie, auth.SESSION_SECONDS)
    reply.delete_cookie(LOGIN_COOKIE)
    return reply


def login_form(template, error=None, status=200):
    token = secrets.token_urlsafe(32)
    reply = Response(render_template(template, error=error, csrf=token, kind=None), status)
    set_cookie(reply, LOGIN_COOKIE, token, 3600)
    return reply


def set_cookie(reply, name, value, seconds):
    # Secure over TLS: behind a proxy, when astbill-web trusts its
    # X-Forwarded-Proto (--trusted-proxy).
    reply.set_cookie(name, value, max_age=seconds, httponly=True, samesite="Lax",
                     secure=request.is_secure)


@bp.route("/logout", methods=["POST"])
def logout():
    auth.close_session(g.settings, g.store, request.cookies.get(COOKIE))
    reply = redirect(url_for("pages.portal_login" if g.kind == "account" else "pages.login"))
    reply.delete_cookie(COOKIE)
    return reply


# -- the console -------------------------------------------------------------------

@bp.route("/")
@staff("read")
def dashboard():
    figures = actions.statistics(g.settings, g.store, kept=PAST_DAYS)
    charts = {
        "hours": chart([h["label"] for h in figures["hours"]],
                       [[h["calls"] for h in figures["hours"]]]),
        "days": chart([d["label"][5:] for d in figures["days"]],
                      [[d["revenue"] for d in figures["days"]],
                       [d["margin"] for d in figures["days"]]]),
        "trunks": chart([t["label"] or "none" for t in figures["trunks"]],
                        [[t["minutes"] for t in figures["trunks"]]]),
    }
    return page("dashboard.html", figures=figures, charts=charts,
                calls=actions.calls_in_progress(g.settings, g.store))


@bp.route("/live/calls")
@staff("read")
def live_calls():
    """The dashboard's calls in progress, which live.js fetches again and again."""
    return page("calls.html", calls=actions.calls_in_progress(g.settings, g.store))


@bp.route("/accounts")
@staff("read")
def accounts():
    search = request.args.get("search", "")
    return page("accounts.html", search=search,
                accounts=actions.list_accounts(g.settings, g.store, search, None, 200))


@bp.route("/accounts", methods=["POST"])
@staff("write")
def account_add():
    f = request.form
    added = actions.add_account(g.settings, g.store, f.get("account", ""), f.get("balance", ""),
                                f.get("tariff") or "default", f.get("credit_limit") or "0",
                                f.get("max_calls") or "0", actor=g.actor)
    return redirect(url_for("pages.account", account=added["account"]))


@bp.route("/accounts/<path:account>")
@staff("read")
def account(account):
    shown = actions.show_account(g.settings, g.store, account)
    return page("account.html", account=shown, done=request.args.get("done"),
                key=secrets.token_urlsafe(16), **account_details(shown["account"]))


def account_details(name):
    """What both the console's and the portal's page of an account show."""
    return {"calls": actions.calls_in_progress(g.settings, g.store, name),
            "history": actions.credit_history(g.settings, g.store, name),
            "cdrs": actions.recent_cdrs(g.settings, g.store, name)}


@bp.route("/accounts/<path:account>/topup", methods=["POST"])
@staff("write")
def account_topup(account):
    # The form's own key: sent twice (a double click, a reload), it tops up once.
    actions.topup(g.settings, g.store, account, request.form.get("amount", ""), actor=g.actor,
                  key=request.form.get("key") or None)
    return redirect(url_for("pages.account", account=account, done="topup"))


@bp.route("/accounts/<path:account>/change", methods=["POST"])
@staff("write")
def account_change(account):
    f = request.form
    actions.change_account(g.settings, g.store, account, f.get("tariff") or None,
                           f.get("credit_limit") or None, f.get("max_calls") or None)
    return redirect(url_for("pages.account", account=account, done="change"))


@bp.route("/accounts/<path:account>/password", methods=["POST"])
@staff("write")
def account_password(account):
    auth.set_account_password(g.settings, g.store, account, request.form.get("password", ""))
    return redirect(url_for("pages.account", account=account, done="password"))


@bp.route("/rates")
@staff("read")
def rates():
    return page("rates.html", decks=actions.list_decks(g.settings, g.store))


@bp.route("/rates", methods=["POST"])
@staff("write")
def rates_import():
    f, upload = request.form, request.files.get("file")
    try:
        text = (upload.read() if upload else b"").decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ActionError("the rates are not UTF-8 text") from None
    done = actions.import_rates(g.settings, g.store, f.get("kind", ""), f.get("name", ""),
                                text=text, starts=f.get("from") or None, option="from")
    return page("rates.html", decks=actions.list_decks(g.settings, g.store), done=done)


@bp.route("/trunks")
@staff("read")
def trunks():
    return page("trunks.html", trunks=actions.list_trunks(g.settings, g.store))


@bp.route("/trunks/<path:name>/<any(enable, disable):change>", methods=["POST"])
@staff("write")
def trunk_change(name, change):
    actions.enable_trunk(g.settings, g.store, name, enabled=change == "enable")
    return redirect(url_for("pages.trunks"))


def cdr_filter():
    return {k: request.args.get(k) or None for k in ("account", "since", "until")}


@bp.route("/cdrs")
@staff("read")
def cdrs():
    chosen = cdr_filter()
    found = list(actions.cdrs(g.settings, g.store, **chosen, limit=CDR_PAGE,
                              after=request.args.get("after") or None,
                              options=("since", "until")))
    after = actions.cursor(found[-1]) if len(found) == CDR_PAGE else None
    return page("cdrs.html", cdrs=found, chosen=chosen, after=after)


@bp.route("/cdrs.csv")
@staff("read")
def cdrs_csv():
    """Every CDR of the filter: the CSV the API streams, formula-safe."""
    records = actions.cdrs(g.settings, g.store, **cdr_filter(), options=("since", "until"))
    return Response(stream_with_context(actions.csv_lines(records, actions.CDR_COLUMNS)),
                    mimetype="text/csv",
                    headers={"Content-Disposition": "attachment; filename=cdrs.csv"})


@bp.route("/audit")
@staff("read")
def audit():
    return page("audit.html", problems=actions.audit(g.settings, g.store))


# -- the portal --------------------------------------------------------------------

@bp.route("/portal")
@customer
def portal():
    """The customer's own account, and what a number they typed would cost."""
    shown = actions.show_account(g.settings, g.store, g.name)
    number, quote = request.args.get("number", "").strip(), None
    if number:
        found = actions.route(g.settings, g.store, number, g.name)
        # What the customer may know: the price and the time, never the
        # trunks, their Dial strings or what they cost to buy.
        quote = {key: found.get(key) for key in ("number", "status", "rate", "max_secs")}
    return page("portal.html", account=shown, number=number, quote=quote,
                **account_details(g.name))


# -- charts ------------------------------------------------------------------------

def chart(labels, series, width=720, height=150):
    """An inline SVG bar chart's geometry, in whole pixels: a bar per value
    of each of ``series`` (lists of ints or amounts as text), side by side
    for each label, measured from a zero line.  Scaled with Decimal: an
    amount is never a float, not even on its way to a pixel."""
    values = [[Decimal(str(v)) for v in s] for s in series]
    top = max([Decimal(0), *(v for s in values for v in s)])
    bottom = min([Decimal(0), *(v for s in values for v in s)])
    span = (top - bottom) or Decimal(1)
    zero = int(top * height / span)
    slot = min(width // max(len(labels), 1), 80)   # a lone bar stays a bar
    bar = max(1, (slot - 2) // max(len(series), 1))
    bars = [{"x": i * slot + j * bar, "y": zero - int(max(v, 0) * height / span),
             "h": max(1, int(abs(v) * height / span)) if v else 0, "w": max(1, bar - 1),
             "series": j, "title": f"{label}: {series[j][i]}"}
            for j, s in enumerate(values) for i, (label, v) in enumerate(zip(labels, s))]
    every = max(1, len(labels) // 12)   # no more labels than fit
    return {"width": width, "height": height, "zero": zero, "bars": bars, "top": top,
            "labels": [(i * slot, label) for i, label in enumerate(labels) if i % every == 0]}


# -- errors ------------------------------------------------------------------------

@bp.errorhandler(ActionError)
def refused(exc):
    return page("error.html", STATUS[exc.kind], message=" ".join(str(exc).split()),
                lines=exc.lines or [])


@bp.errorhandler(StoreError)
def database(exc):
    log(f"database error on {request.method} {shown_path()}: {exc}")
    return page("error.html", 503, message="the database is unavailable; try again")


@bp.errorhandler(config.ConfigError)
def bad_config(exc):
    log(str(exc))
    return page("error.html", 500, message="the server's config file cannot be used")


@bp.errorhandler(HTTPException)
def http(exc):
    return page("error.html", exc.code, message=exc.description if exc.code == 403
                else (exc.name or "error").lower())


@bp.errorhandler(Exception)
def crash(exc):
    log(f"{request.method} {shown_path()}:\n{traceback.format_exc()}")
    return page("error.html", 500, message="internal error (logged)")
