"""astbill-web: AstBill's HTTP API, operator console and customer portal, a
Flask application served by waitress.

Every API request is authenticated by a token (``Authorization: Bearer
TOKEN``; ``astbill-admin token add``), every page by a session (``pages``),
its role checked by the server, and handled by the same library function
``astbill-admin`` calls.  It reads the config file and the database the
calls use; each write is one short transaction, no lock is held between
requests.  Every error is a one-line message (JSON from the API, a page
from the console); what went wrong inside (a traceback, the database's
own words) goes to stderr only.
"""
import argparse
import sys

from ... import __version__, config
from .replies import PROG

DEFAULT_LISTEN = "127.0.0.1:8080"
THREADS = 8


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        host, port = listen_address(args.listen)
        config.load(args.config)   # refused now, not at the first request
    except (ValueError, config.ConfigError) as exc:
        sys.stderr.write(f"{PROG}: {' '.join(str(exc).split())}\n")
        return 1
    import waitress

    from ...store import keep_sessions
    from .api import MAX_BODY, create_app
    keep_sessions()   # a database session per worker thread, between requests
    # Only a proxy named by --trusted-proxy is believed when it says who the
    # client is (X-Forwarded-For, for the log) and that the browser came
    # over TLS (X-Forwarded-Proto: https): the session cookie is then sent
    # Secure.  Anyone else's X-Forwarded-* headers are dropped.  Waitress
    # itself refuses a body longer than any request takes (413).
    proxy = {"trusted_proxy": args.trusted_proxy, "trusted_proxy_count": 1,
             "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"}
             } if args.trusted_proxy else {}
    server = waitress.create_server(create_app(args.config), host=host, port=port,
                                    threads=THREADS, ident=PROG, clear_untrusted_proxy_headers=True,
                                    max_request_body_size=MAX_BODY + 4096, **proxy)
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(f"{PROG}: listening on http://{shown}:{server.effective_port}\n")
    sys.stderr.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


def parser():
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="AstBill's HTTP API (JSON under /api/v1, its OpenAPI document at"
                    "\n/api/v1/openapi.json; tokens: astbill-admin token add), the operator"
                    "\nconsole at / (staff: astbill-admin user add) and the customer portal at"
                    "\n/portal (astbill-admin account password).",
        epilog="examples:\n"
               f"  {PROG} -c /etc/astbill/astbill.yaml\n"
               f"  {PROG} -c /etc/astbill/astbill.yaml --listen 127.0.0.1:8081\n"
               "  curl -H 'Authorization: Bearer TOKEN' http://127.0.0.1:8080/api/v1/accounts/1001")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="the config file (default: $ASTBILL_CONFIG, else conf/astbill.yaml"
                        " beside astbill-web)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"the address to serve on (default: {DEFAULT_LISTEN}; keep it on"
                        " loopback, behind a TLS proxy)")
    p.add_argument("--trusted-proxy", metavar="ADDRESS",
                   help="the TLS proxy in front (such as 127.0.0.1) whose X-Forwarded-Proto is"
                        " believed (default: none is)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def listen_address(text):
    """(host, port) of 'HOST:PORT' or '[IPv6]:PORT'; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (sep and host and port.isascii() and port.isdigit() and int(port) < 65536):
        raise ValueError(f"--listen must be HOST:PORT, such as {DEFAULT_LISTEN}: {text!r}")
    return host, int(port)
