"""Who may administer AstBill: staff users with passwords, programs with tokens.

A token is 32 random bytes (``secrets.token_urlsafe``), shown once when it
is made; only its SHA-256 is stored, so a copy of the database lets no one
call the API.  A password is kept as a salted scrypt hash (memory-hard:
16 MiB per guess) and compared in constant time.

Roles, checked by the server for every request:

  admin    everything
  support  reads: accounts, calls, CDRs, rates, trunks, routes, the audit
  shop     top-ups, and the balance of an account it names: nothing else
"""
import functools
import hashlib
import hmac
import secrets
import time

from ..ledger import timestamp
from ..store import Conflict, NotFound
from .actions import ActionError, account_named, checked_name, write

TOKEN_ROLES = ("admin", "support", "shop")
USER_ROLES = ("admin", "support")
# What each role may do: "balance" (read one account), "topup", "read"
# (every other read), "write" (every other change).
GRANTS = {"admin": frozenset({"balance", "topup", "read", "write"}),
          "support": frozenset({"balance", "read"}),
          "shop": frozenset({"balance", "topup"})}

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
SALT_BYTES = 16
PASSWORD_CHARS = (10, 1024)


def allows(role, permission):
    return permission in GRANTS.get(role, ())


# -- tokens ----------------------------------------------------------------------

def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def add_token(settings, store, name, role):
    """Make a token for ``name``: the token itself, to be shown once."""
    name, role = checked_name(name, "token name", 80), checked_role(role, TOKEN_ROLES)
    token = secrets.token_urlsafe(32)
    add_holder(settings, "asttoken", name, role, token_hash(token), "token")
    return token


def token_holder(store, token):
    """(name, role) of whoever holds ``token``, or None."""
    if not token or len(token) > 200:
        return None
    row = store.read(lambda tx: tx.token_holder(token_hash(token)))
    return None if row is None else (row[0], row[1])


# -- staff users -----------------------------------------------------------------

def add_user(settings, store, name, role, password):
    name, role = checked_name(name, "user name", 80), checked_role(role, USER_ROLES)
    add_holder(settings, "astuser", name, role, hash_password(checked_password(password)), "user")


def checked_password(password):
    least, most = PASSWORD_CHARS
    if not isinstance(password, str) or not least <= len(password) <= most:
        raise ActionError(f"a password must be {least} to {most} characters")
    return password


def login(store, name, password):
    """The role of user ``name`` if ``password`` is theirs, else None; an
    unknown name costs the same time as a wrong password."""
    return checked_login(store, lambda tx: tx.user_secret(name), name, password)


def account_login(store, account, password):
    """The account's name if ``password`` is its portal password, else
    None (as long for an unknown account, or one without a password)."""
    return checked_login(store, lambda tx: tx.account_secret(account), account, password)


def checked_login(store, secret, name, password):
    """``secret(tx)``'s first column if ``password`` matches its hash, its
    second; a missing row or hash is checked against a made-up one."""
    row = store.read(secret) if isinstance(name, str) and name else None
    stored = row[1] if row is not None and row[1] is not None else unknown_user()
    good = check_password(stored, password if isinstance(password, str) else "")
    return row[0] if good and row is not None and row[1] is not None else None


def set_account_password(settings, store, account, password):
    """Let the account's customer log in to the portal with ``password``."""
    account, secret = account_named(account), hash_password(checked_password(password))
    try:
        write(settings, lambda tx: tx.set_account_secret(account, secret))
    except NotFound:
        raise ActionError(f"no account {account!r}", kind="missing") from None


def hash_password(password):
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, **SCRYPT)
    return "scrypt${n}${r}${p}$".format(**SCRYPT) + f"{salt.hex()}${digest.hex()}"


def check_password(stored, password):
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        found = _scrypt(password, bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    except ValueError:
        return False
    return hmac.compare_digest(found, bytes.fromhex(digest))


def _scrypt(password, salt, n, r, p):
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024,
                          dklen=32)


@functools.lru_cache(maxsize=1)
def unknown_user():
    """What a password is checked against when the name is unknown, so
    that it takes as long."""
    return hash_password(secrets.token_urlsafe(16))


# -- browser sessions ------------------------------------------------------------

SESSION_SECONDS = 8 * 3600   # a working day; then one logs in again


def open_session(settings, store, kind, name):
    """A new session of a user (``kind`` "user") or a customer ("account"):
    its cookie, of which only the SHA-256 is stored, beside the CSRF token
    its forms must carry."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = time.time()
    write(settings, lambda tx: tx.add_session(token_hash(cookie), kind, name, csrf,
                                              timestamp(now + SESSION_SECONDS), timestamp(now)))
    return cookie


def session(store, cookie):
    """(kind, name, csrf, role) of the live session of ``cookie``, or None;
    a user's session ends as soon as the user is removed."""
    if not cookie or len(cookie) > 200:
        return None
    row = store.read(lambda tx: tx.session(token_hash(cookie), timestamp()))
    if row is None or (row[0] == "user" and row[3] is None):
        return None
    return tuple(row)


def close_session(settings, store, cookie):
    if cookie and len(cookie) <= 200:
        write(settings, lambda tx: tx.remove_session(token_hash(cookie)))


# -- both ------------------------------------------------------------------------

def add_holder(settings, table, name, role, secret_hash, what):
    try:
        write(settings, lambda tx: tx.add_holder(table, name, role, secret_hash, timestamp()))
    except Conflict:
        raise ActionError(f"{what} {name!r} exists", kind="exists") from None


def list_tokens(settings, store):
    return holders(store, "asttoken")


def list_users(settings, store):
    return holders(store, "astuser")


def holders(store, table):
    return [{"name": n, "role": r, "created": c}
            for n, r, c in store.read(lambda tx: tx.holders(table))]


def remove_token(settings, store, name):
    remove_holder(settings, "asttoken", name, "token")


def remove_user(settings, store, name):
    remove_holder(settings, "astuser", name, "user")


def remove_holder(settings, table, name, what):
    try:
        write(settings, lambda tx: tx.remove_holder(table, name))
    except NotFound:
        raise ActionError(f"no {what} {name!r}", kind="missing") from None


def checked_role(role, roles):
    if role not in roles:
        raise ActionError(f"role must be {', '.join(roles[:-1])} or {roles[-1]}: {role!r}")
    return role
