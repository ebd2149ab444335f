"""The JSON API under /api/v1: one table of routes, served and documented.

Each route names its method, its path, what a token's role must allow
(``auth.GRANTS``), the library function's face here, and what its
OpenAPI description says; the Flask rules and /api/v1/openapi.json are both
made from that table, so the document cannot drift from what is served.
"""
import json
import traceback
from decimal import Decimal

from flask import Flask, Response, g, request, stream_with_context
from werkzeug.exceptions import HTTPException

from ... import __version__, config
from ...store import StoreError, open_store
from .. import actions, auth
from ..actions import ActionError
from .pages import bp as console_and_portal
from .replies import STATUS, log, shown_path

BASE = "/api/v1"
PAGE, MOST = 100, 1000
MAX_BODY = 32 * 1024 * 1024   # a deck of a million prefixes is about 30 MB
MAX_JSON = 64 * 1024          # any JSON request AstBill takes is far shorter


class Route:
    """``query``: (name, description) of its query parameters, those in
    ``required`` required; ``body``: {field: type}, or "text/csv";
    ``idempotent``: it needs an Idempotency-Key."""

    def __init__(self, method, path, grant, run, summary, query=(), body=None, status=200,
                 required=(), idempotent=False):
        self.method, self.path, self.grant, self.run = method, path, grant, run
        self.summary, self.query, self.body, self.status = summary, query, body, status
        self.required, self.idempotent = required, idempotent


# -- the faces of the actions --------------------------------------------------------

def accounts_list():
    limit = page_size()
    found = actions.list_accounts(g.settings, g.store, arg("search"), arg("after"), limit)
    return {"accounts": found, "next": found[-1]["account"] if len(found) == limit else None}


def account_create():
    b = body(required=("account", "balance"),
             optional=("tariff", "credit_limit", "max_calls"))
    return actions.add_account(g.settings, g.store, b["account"], b["balance"],
                               b.get("tariff", "default"), b.get("credit_limit", "0"),
                               b.get("max_calls", "0"), actor=g.actor)


def account_read(account):
    return actions.show_account(g.settings, g.store, account)


def account_change(account):
    b = body(optional=("tariff", "credit_limit", "max_calls"))
    return actions.change_account(g.settings, g.store, account, b.get("tariff"),
                                  b.get("credit_limit"), b.get("max_calls"))


def topup(account):
    return actions.topup(g.settings, g.store, account, body(required=("amount",))["amount"],
                         actor=g.actor, key=idempotency_key())


def adjustment(account):
    return actions.adjust(g.settings, g.store, account, body(required=("amount",))["amount"],
                          actor=g.actor, key=idempotency_key())


def calls():
    return {"calls": actions.calls_in_progress(g.settings, g.store)}


def cdrs():
    how = arg("format") or "json"
    if how not in ("json", "csv"):
        raise ActionError(f"format must be json or csv: {how!r}")
    if how == "csv":   # every CDR of the range, streamed as read
        limit = arg("limit")
        records = actions.cdrs(g.settings, g.store, arg("account"), arg("since"), arg("until"),
                               None if limit is None else actions.whole(limit, "limit", 1, 10 ** 9),
                               arg("after"), options=("since", "until"))
        return Response(stream_with_context(actions.csv_lines(records, actions.CDR_COLUMNS)),
                        mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=cdrs.csv"})
    limit = page_size()
    found = list(actions.cdrs(g.settings, g.store, arg("account"), arg("since"), arg("until"),
                              limit, arg("after"), options=("since", "until")))
    return {"cdrs": found, "next": actions.cursor(found[-1]) if len(found) == limit else None}


def rates_import(kind, name):
    if request.mimetype != "text/csv":
        raise ActionError("send the rates as text/csv")
    try:
        text = request_data(MAX_BODY).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ActionError("the rates are not UTF-8 text") from None
    return actions.import_rates(g.settings, g.store, kind, name, text=text, starts=arg("from"),
                                option="from")


def rates_list(kind, name):
    return {"rates": actions.list_rates(g.settings, g.store, kind, name, arg("prefix"), arg("at"),
                                        option="at")}


def trunks():
    return {"trunks": actions.list_trunks(g.settings, g.store)}


def trunk_enable(name):
    actions.enable_trunk(g.settings, g.store, name)
    return trunk_named(name)


def trunk_disable(name):
    actions.enable_trunk(g.settings, g.store, name, enabled=False)
    return trunk_named(name)


def trunk_named(name):
    return next(t for t in actions.list_trunks(g.settings, g.store) if t["name"] == name)


def route():
    return actions.route(g.settings, g.store, arg("number", required=True),
                         arg("account", required=True))


def audit():
    problems = actions.audit(g.settings, g.store)
    return {"ok": not problems, "problems": problems}


ACCOUNT = {"account": "string", "tariff": "string", "balance": "amount", "reserved": "amount",
           "credit_limit": "amount", "available": "amount", "max_calls": "integer",
           "calls": "integer"}
PAGING = (("limit", f"at most this many (default {PAGE}, at most {MOST})"),
          ("after", "the page after this one: the reply's next"))
CDR_QUERY = (("account", "only this account's calls"),
             ("since", "calls started at or after, UTC: YYYY-MM-DD[ HH:MM[:SS]]"),
             ("until", "calls started before (the same forms)"),
             ("format", "json (paged) or csv (every CDR of the range, streamed; a cell that"
                        " would start a formula starts with ')"), *PAGING)
KINDS = ("tariff", "trunk")
ROUTES = [
    Route("GET", "/accounts", "read", accounts_list, "List accounts by name",
          (("search", "only names that contain this"), *PAGING)),
    Route("POST", "/accounts", "write", account_create, "Add an account with its opening balance",
          body={"account": "string", "balance": "amount", "tariff": "string",
                "credit_limit": "amount", "max_calls": "integer"}, status=201),
    Route("GET", "/accounts/{account}", "balance", account_read,
          "An account: balance, reserved, available, credit limit, call cap, tariff"),
    Route("PATCH", "/accounts/{account}", "write", account_change,
          "Change an account's tariff, credit limit or call cap",
          body={"tariff": "string", "credit_limit": "amount", "max_calls": "integer"}),
    Route("POST", "/accounts/{account}/topups", "topup", topup,
          "Add credit, once per Idempotency-Key", body={"amount": "amount"}, idempotent=True),
    Route("POST", "/accounts/{account}/adjustments", "write", adjustment,
          "Correct a balance by a signed amount, once per Idempotency-Key",
          body={"amount": "amount"}, idempotent=True),
    Route("GET", "/calls", "read", calls, "Calls in progress"),
    Route("GET", "/cdrs", "read", cdrs, "Call detail records by start, oldest first", CDR_QUERY),
    Route("POST", "/rates/{kind}/{name}", "write", rates_import,
          "Import a deck of rates (CSV, as astbill-admin rate import reads): all or nothing",
          (("from", "when it takes effect, UTC (default now; a first deck: always)"),),
          body="text/csv"),
    Route("GET", "/rates/{kind}/{name}", "read", rates_list, "The deck in force at a moment",
          (("at", "the moment, UTC (default now)"), ("prefix", "only prefixes starting so"))),
    Route("GET", "/trunks", "read", trunks, "Trunks"),
    Route("POST", "/trunks/{name}/enable", "write", trunk_enable, "Route calls over a trunk"),
    Route("POST", "/trunks/{name}/disable", "write", trunk_disable,
          "Stop routing calls over a trunk"),
    Route("GET", "/route", "read", route, "What a call to a number would get now, for an account",
          (("number", "the number as dialled"), ("account", "the account that would pay")),
          required=("number", "account")),
    Route("GET", "/audit", "read", audit, "Check the books: balances against the ledger,"
          " reservations, the spool"),
]


# -- requests --------------------------------------------------------------------

def arg(name, required=False):
    value = request.args.get(name)
    if value is None and required:
        raise ActionError(f"the query parameter {name} is required")
    return value


def page_size():
    limit = arg("limit")
    return PAGE if limit is None else actions.whole(limit, "limit", 1, MOST)


def body(required=(), optional=()):
    """The request's JSON object, with its ``required`` fields and no field
    it does not know; numbers exact (a Decimal, never a float)."""
    if request.mimetype != "application/json":
        raise ActionError("send a JSON object (Content-Type: application/json)")
    try:
        data = json.loads(request_data(MAX_JSON).decode("utf-8"), parse_float=Decimal,
                          parse_constant=not_a_number, object_pairs_hook=unique_fields)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ActionError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise ActionError("the body must be a JSON object")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ActionError(f"unknown field {unknown[0]!r}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ActionError(f"the field {missing[0]} is required")
    return data


def not_a_number(text):
    raise ValueError(text)


def unique_fields(pairs):
    """A JSON object that names no field twice (which one would count?)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a field twice")
    return data


def request_data(most):
    """The request's body, refused (413) before it is read if it is longer
    than ``most`` bytes (Flask's MAX_CONTENT_LENGTH guards forms only;
    waitress gives the length of a chunked body too)."""
    if request.content_length is not None and request.content_length > most:
        raise ActionError(f"the body is longer than {most} bytes", kind="large")
    return request.get_data()


def idempotency_key():
    key = request.headers.get("Idempotency-Key")
    if key is None:
        raise ActionError("an Idempotency-Key header is required: the same key again changes"
                          " nothing")
    return key


# -- the application -------------------------------------------------------------

def create_app(config_path=None):
    app = Flask("astbill", static_folder=None)   # the pages have their own
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["ASTBILL_CONFIG"] = config_path
    app.json.sort_keys = False
    app.register_blueprint(console_and_portal)   # sessions, not tokens

    @app.before_request
    def authenticate():
        g.store = None
        if not request.path.startswith(BASE + "/") or request.path == BASE + "/openapi.json":
            return None
        g.settings = config.load(config_path)
        g.store = open_store(g.settings)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        holder = auth.token_holder(g.store, token.strip()) if scheme.lower() == "bearer" else None
        if holder is None:
            return error(401, "a valid token is needed: Authorization: Bearer TOKEN",
                         {"WWW-Authenticate": 'Bearer realm="astbill"'})
        g.name, g.role = holder
        g.actor = f"token:{g.name}"
        return None

    @app.after_request
    def access_log(reply):
        log(f"{request.remote_addr} {request.method} {shown_path()} {reply.status_code}"
            f" {g.get('actor') or '-'}")
        return reply

    @app.teardown_request
    def close(exc=None):
        store = g.pop("store", None)
        if store is not None:
            store.close()

    for r in ROUTES:
        app.add_url_rule(BASE + flask_path(r.path), f"{r.method} {r.path}", served(r),
                         methods=[r.method])
    app.add_url_rule(BASE + "/openapi.json", "openapi", lambda: openapi())

    @app.errorhandler(ActionError)
    def refused(exc):
        reply = {"error": " ".join(str(exc).split())}
        if exc.lines:
            reply["lines"] = exc.lines
        return json_reply(reply, STATUS[exc.kind])

    @app.errorhandler(StoreError)
    def database(exc):
        log(f"database error on {request.method} {shown_path()}: {exc}")
        return error(503, "the database is unavailable; try again")

    @app.errorhandler(config.ConfigError)
    def bad_config(exc):
        log(str(exc))
        return error(500, "the server's config file cannot be used")

    @app.errorhandler(HTTPException)
    def http(exc):
        allowed = getattr(exc, "valid_methods", None)   # a 405 says what is allowed
        return error(exc.code, (exc.name or "error").lower(),
                     {"Allow": ", ".join(sorted(allowed))} if allowed else None)

    @app.errorhandler(Exception)
    def crash(exc):
        log(f"{request.method} {shown_path()}:\n{traceback.format_exc()}")
        return error(500, "internal error (logged)")
    return app


def flask_path(path):
    """An OpenAPI path as a Flask rule: {account} may hold any character."""
    return path.replace("{account}", "<path:account>").replace("{kind}", "<kind>").replace(
        "{name}", "<path:name>")


def served(r):
    def view(**params):
        if not auth.allows(g.role, r.grant):
            return error(403, f"a {g.role} token may not do this")
        if "kind" in params and params["kind"] not in KINDS:
            raise ActionError(f"rates belong to a tariff or a trunk, not {params['kind']!r}")
        result = r.run(**params)
        return result if isinstance(result, Response) else json_reply(result, r.status)
    return view


def json_reply(data, status=200, headers=None):
    return Response(json.dumps(data) + "\n", status, headers, mimetype="application/json")


def error(status, message, headers=None):
    return json_reply({"error": message}, status, headers)


# -- the OpenAPI document --------------------------------------------------------

SCHEMA = {"string": {"type": "string"}, "integer": {"type": "integer"},
          "amount": {"type": "string", "pattern": r"^[+-]?[0-9]+(\.[0-9]{1,6})?$",
                     "description": "exact decimal, as text"}}


def openapi():
    paths = {}
    for r in ROUTES:
        op = {"summary": r.summary, "operationId": r.run.__name__,
              "description": f"A token whose role allows {r.grant!r}: "
                             + ", ".join(role for role in auth.TOKEN_ROLES
                                         if auth.allows(role, r.grant)) + ".",
              "parameters": [{"name": p, "in": "path", "required": True,
                              "schema": {"type": "string"}}
                             for p in ("account", "kind", "name") if "{" + p + "}" in r.path]
              + [{"name": name, "in": "query", "description": text, "schema": {"type": "string"},
                  "required": name in r.required}
                 for name, text in r.query],
              "responses": {str(r.status): {"description": "done"},
                            "400": {"$ref": "#/components/responses/Error"},
                            "401": {"$ref": "#/components/responses/Error"},
                            "403": {"$ref": "#/components/responses/Error"}}}
        if r.idempotent:
            op["parameters"].append({"name": "Idempotency-Key", "in": "header", "required": True,
                                     "schema": {"type": "string", "maxLength": 80},
                                     "description": "the same key again changes nothing and gets"
                                                    " the first reply; another request with it: 422"})
        if r.body == "text/csv":
            op["requestBody"] = {"required": True,
                                 "content": {"text/csv": {"schema": {"type": "string"}}}}
        elif r.body:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {k: SCHEMA[v] for k, v in r.body.items()}}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return json_reply({
        "openapi": "3.0.3",
        "info": {"title": "AstBill", "version": __version__,
                 "description": "Prepaid billing for Asterisk: accounts, top-ups, rates, trunks,"
                                " calls and CDRs.  Amounts are exact decimals, as text."},
        "servers": [{"url": BASE}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Account": {"type": "object", "properties": {
                k: SCHEMA[v] for k, v in ACCOUNT.items()}},
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string"},
                    "lines": {"type": "array", "items": {"type": "string"}}}}},
            "responses": {"Error": {"description": "refused: one line, and for a file, one"
                                                   " line per problem",
                                    "content": {"application/json": {"schema": {
                                        "$ref": "#/components/schemas/Error"}}}}}}})
