"""What every part of astbill-web says the same way: the HTTP status of
each kind of refusal, and the service's log lines."""
import sys

PROG = "astbill-web"
# The HTTP status of each kind of ActionError, for the API and the pages.
STATUS = {"invalid": 400, "missing": 404, "exists": 409, "large": 413, "reused": 422}


def shown_path():
    """The request's path, escaped: a newline in it (%0A) must not write a
    line of its own into the log."""
    from flask import request   # here: astbill-web's command line loads no Flask
    return request.path.encode("unicode_escape").decode("ascii")


def log(text):
    """A line of the service's log (stderr: the journal, under systemd)."""
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()
