"""The configuration file: found, read, checked and cached.

The YAML file is the source of truth.  Importing and parsing YAML costs
more than the rest of a call's start-up, so the checked settings are cached
beside it in marshal form (built in, nothing to import; mode 0600, it holds
the database password) and reused while the YAML file's size and mtime and
the interpreter's marshal version are unchanged -- and so are its inode and
ctime (a file replaced or touched within one mtime tick), and AstBill's
version (whose defaults and checks the cache holds).
"""
import _thread
import marshal
import os

from . import __version__
from .agi import ANNOUNCE_MODES, dial_field_problem, sound_problem

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "conf", "astbill.yaml")

DEFAULTS = {
    "account_source": "accountcode",
    "international_prefix": "00",
    "national_prefix": "",
    "country_code": "",
    "max_call_secs": 3600,
    "ring_timeout": 60,
    "dial_options": "",
    "warning_secs": 0,
    "decimals": 4,
    "lock_wait_secs": 3,
    "on_db_error": "refuse",
    "db_error_allow_secs": 60,
    # Calls of one account let through an outage at once, on one box (the
    # database and its call caps cannot be read then).
    "db_error_max_calls": 1,
    "spool_dir": "/var/spool/astbill",
    # Where a settlement goes when spool_dir cannot be written (disk full, a
    # broken deploy): memory, on another filesystem, in a directory made at
    # boot for AstBill's user alone (conf/astbill.tmpfiles) -- never in a
    # directory any local user could make first.  "" for none.
    "spool_fallback_dir": "/run/astbill",
    "connect_timeout_secs": 1,
    "sweep_grace_secs": 300,
    "sweep_policy": "release",
    "asterisk_cdr_table": "",
    "database_password_env": "",
    "mysql_driver": "auto",
    "tariffs": {},
    "timezone": "UTC",
    "lcr_allow_loss": False,
    "lcr_max_trunks": 3,
    "billsec_rounding": "up",
    "trust_callerid": False,
    # astbill-fastagi: calls served at once (one more is refused at once),
    # how long a client may take to send its AGI environment, and the
    # addresses and networks it may connect from.
    "fastagi_max_calls": 100,
    "fastagi_idle_secs": 5,
    "fastagi_allow": ["127.0.0.1/32", "::1/128"],
    # What the caller hears: the balance and/or the minutes before the Dial
    # (ASTBILL_ANNOUNCE overrides it for a call), in these currency words;
    # the L() warning's sound (Asterisk's own "you have N minutes" by
    # default); a prompt per refusal, for the dialplan to play.
    "announce": "none",
    "currency_unit": "digits/dollars",
    "currency_cents": "cents",
    "warning_sound": "timeleft",
    "refusal_prompts": {},
}
_TYPES = {
    "database": str, "account_source": str, "international_prefix": str,
    "national_prefix": str, "country_code": str, "max_call_secs": int,
    "ring_timeout": int, "dial": str, "dial_options": str, "warning_secs": int,
    "decimals": int, "lock_wait_secs": int, "on_db_error": str,
    "db_error_allow_secs": int, "db_error_max_calls": int, "spool_dir": str, "spool_fallback_dir": str,
    "connect_timeout_secs": int, "sweep_grace_secs": int,
    "sweep_policy": str, "asterisk_cdr_table": str, "database_password_env": str,
    "mysql_driver": str, "tariffs": dict, "timezone": str, "lcr_allow_loss": bool,
    "lcr_max_trunks": int, "billsec_rounding": str, "trust_callerid": bool,
    "fastagi_max_calls": int, "fastagi_idle_secs": int, "fastagi_allow": list,
    "announce": str, "currency_unit": str, "currency_cents": str, "warning_sound": str,
    "refusal_prompts": dict,
}
_CHOICES = {"on_db_error": ("refuse", "allow"), "sweep_policy": ("release", "charge"),
            "mysql_driver": ("auto", "mysqlclient", "pymysql"),
            "billsec_rounding": ("up", "down"), "announce": ANNOUNCE_MODES}
_RANGES = {"max_call_secs": (1, 86400), "ring_timeout": (1, 600),
           "warning_secs": (0, 3600), "decimals": (0, 6),
           "lock_wait_secs": (1, 60), "db_error_allow_secs": (1, 600),
           "db_error_max_calls": (1, 100),
           "connect_timeout_secs": (1, 30), "lcr_max_trunks": (1, 10),
           "sweep_grace_secs": (0, 86400), "fastagi_max_calls": (1, 10000),
           "fastagi_idle_secs": (1, 300)}


class ConfigError(Exception):
    """The configuration cannot be used; the message says why, in one line."""


def config_path(explicit=None):
    return explicit or os.environ.get("ASTBILL_CONFIG") or DEFAULT_PATH


# What load read last, per path: (stamp, settings).  A process that loads
# its config for every call (astbill-fastagi) re-reads nothing while the
# file's stamp is unchanged; the settings are shared and never changed.
_memo = {}


def load(path=None):
    """The checked settings of the config file at ``path`` (see config_path)."""
    path = config_path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, marshal.version, __version__)
    memo = _memo.get(path)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    cache = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".cache")
    settings = _read_cache(cache, stamp)
    if settings is None:
        settings = check(_parse_yaml(path), path)
        _write_cache(cache, stamp, settings)
    # Relative sqlite:// paths are relative to the config file.
    settings["config_dir"] = os.path.dirname(os.path.abspath(path))
    _memo[path] = (stamp, settings)
    return settings


def forget():
    """Read every config file again at its next load (SIGHUP)."""
    _memo.clear()


def _parse_yaml(path):
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}{_yaml_problem(e, text)}") from None


def _yaml_problem(exc, text):
    """' line N: not valid YAML: why', from what PyYAML says.

    Its marks count lines from 0; the mark of the enclosing construct
    (``context_mark``) may come with the problem's, or instead of it.  A bad
    character comes with an offset into the text, not a mark.
    """
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(getattr(exc, "position", None), int):
        line = text.count("\n", 0, exc.position) + 1
    else:
        line = None
    why = problem or context or str(exc).split("\n", 1)[0]
    opened = getattr(exc, "context_mark", None)
    if problem and context and opened is not None:
        why += f" ({context} from line {opened.line + 1})"
    where = f" line {line}" if line else ""
    return f"{where}: not valid YAML: {' '.join(why.split())}"


def check(raw, path="config"):
    """Settings with defaults filled in, or ConfigError naming the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r}")
    for key in ("database", "dial"):
        if key not in raw:
            raise ConfigError(f"{path}: missing setting {key!r}")
    settings = dict(DEFAULTS, **raw)
    if isinstance(settings["database"], list) and settings["database"] and all(
            isinstance(url, str) for url in settings["database"]):
        urls = settings.pop("database")   # a Galera cluster's nodes, tried in order
    else:
        urls = None
    for key, kind in _TYPES.items():
        if key == "database" and urls is not None:
            continue
        value = settings[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{path}: {key} must be {kind.__name__}, not {type(value).__name__}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(_CHOICES[key])}")
        if key in _RANGES and not _RANGES[key][0] <= value <= _RANGES[key][1]:
            raise ConfigError(f"{path}: {key} must be between {_RANGES[key][0]} and {_RANGES[key][1]}")
    if urls is not None:
        settings["database"] = urls
    for url in urls or [settings["database"]]:
        scheme = url.split("://", 1)[0]
        if scheme != "mysql" and (scheme != "sqlite" or urls):
            raise ConfigError(f"{path}: database must be a sqlite:// or mysql:// URL,"
                              " or a list of mysql:// URLs (a cluster's nodes)")
        if scheme == "mysql":
            from .store.mysql import connect_args
            try:
                connect_args(url)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    if settings["timezone"] != "UTC":
        try:
            from zoneinfo import ZoneInfo
            ZoneInfo(settings["timezone"])
        except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
            raise ConfigError(f"{path}: timezone must be an IANA name such as Europe/Berlin,"
                              f" not {settings['timezone']!r}") from None
    from .ledger import settle_time_bound
    bound = settle_time_bound(settings)
    if settings["sweep_grace_secs"] < bound:
        raise ConfigError(f"{path}: sweep_grace_secs must be at least {bound:.0f}, the longest"
                          " a settlement keeps retrying before it spools (lock_wait_secs,"
                          " connect_timeout_secs and the database nodes set it)")
    source = settings["account_source"]
    variable = source[9:] if source.startswith("variable:") else ""
    if source not in ("accountcode", "callerid") and not (
            variable and variable.replace("_", "").isalnum() and variable.isascii()):
        raise ConfigError(f"{path}: account_source must be accountcode, callerid or variable:NAME")
    if source == "callerid" and not settings["trust_callerid"]:
        # The caller sets their own caller ID: anyone could name the account that pays.
        raise ConfigError(f"{path}: account_source callerid lets callers choose who pays;"
                          " set trust_callerid: true only if a proxy you run sets caller ID")
    table = settings["asterisk_cdr_table"]
    if table and not (table.replace("_", "").isalnum() and table.isascii()):
        raise ConfigError(f"{path}: asterisk_cdr_table must be a plain table name")
    problem = dial_field_problem(settings["dial_options"])
    if problem:
        raise ConfigError(f"{path}: dial_options {problem}")
    check_allow(settings["fastagi_allow"], path)
    check_sounds(settings, path)
    for name, tariff in settings["tariffs"].items():
        if not isinstance(tariff, dict) or set(tariff) - {"dial"} or not isinstance(tariff.get("dial", ""), str):
            raise ConfigError(f"{path}: tariffs.{name} may only set dial (a string)")
        check_dial(tariff.get("dial"), f"{path}: tariffs.{name}.dial")
    check_dial(settings["dial"], f"{path}: dial")
    return settings


def check_allow(allow, path):
    """fastagi_allow: a list of addresses or networks (10.0.0.0/8, ::1)."""
    import ipaddress
    for entry in allow:
        try:
            if not isinstance(entry, str):
                raise TypeError(entry)
            ipaddress.ip_network(entry)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: fastagi_allow must list addresses or networks"
                              f" such as 10.0.0.0/8, not {str(entry)[:60]!r}") from None


def check_sounds(settings, path):
    """The sound files AstBill hands Asterisk: file names, nothing else
    (a comma or an & would make Playback read another file)."""
    for key in ("currency_unit", "currency_cents", "warning_sound"):
        # Only the currency words may be "" (not said).
        problem = sound_problem(settings[key]) if settings[key] or key == "warning_sound" else None
        if problem:
            raise ConfigError(f"{path}: {key} {problem}")
    from .ledger import CAUSES
    for status, prompt in settings["refusal_prompts"].items():
        if status not in CAUSES:
            raise ConfigError(f"{path}: refusal_prompts may name {', '.join(CAUSES)},"
                              f" not {str(status)[:40]!r}")
        problem = ("must be a string" if not isinstance(prompt, str)
                   else sound_problem(prompt) if prompt else None)
        if problem:
            raise ConfigError(f"{path}: refusal_prompts.{status} {problem}")


def check_dial(template, where):
    """A Dial template: {number} once or more, nothing else in braces."""
    if template is None:
        return
    problem = dial_field_problem(template)
    if problem:
        raise ConfigError(f"{where} {problem}")
    try:
        template.format(number="0")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"{where} may use only {{number}}") from None
    if "{number}" not in template:
        raise ConfigError(f"{where} must contain {{number}}")


def _read_cache(cache, stamp):
    try:
        with open(cache, "rb") as f:
            cached_stamp, settings = marshal.load(f)
    except (OSError, ValueError, EOFError, TypeError):
        return None
    return settings if cached_stamp == stamp else None


def _write_cache(cache, stamp, settings):
    tmp = f"{cache}.{os.getpid()}.{_thread.get_ident()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            marshal.dump((stamp, settings), f)
        os.replace(tmp, cache)
    except OSError:
        # A read-only config directory only costs the YAML parse each call.
        try:
            os.unlink(tmp)
        except OSError:
            pass
