"""The AGI entry point: set up the channel, load the config, bill the call.

Whatever happens, the script exits 0 with ASTBILL_STATUS set where the
channel still listens, one readable line in Asterisk's log, and no Python
traceback on Asterisk's console.
"""
import sys

# The C module itself: ``signal`` wraps it in enums, whose import costs more
# than the rest of a call's start-up.
import _signal as signal

from . import callflow, spool
from .agi import AGIError, Channel, Hangup
from .config import ConfigError, load
from .credit import ERROR


def main(argv, stdin=None, stdout=None):
    channel = Channel(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
    # A caller hangup sends SIGHUP, whose default action would kill us
    # before the call is settled.
    signal.signal(signal.SIGHUP, channel.note_hangup)
    try:
        channel.read_env()
        settings = load(config_arg(argv))
        callflow.handle(channel, settings)
    except ConfigError as exc:
        report(channel, f"{ERROR} {exc}")
        return 0
    except (Hangup, AGIError) as exc:
        sys.stderr.write(f"astbill: {exc}\n")
        return 0
    except Exception as exc:  # a bug must not leave the dialplan without a status
        report(channel, f"{ERROR} internal error: {type(exc).__name__}: {exc}")
        return 0
    replay_spool(settings)
    return 0


def config_arg(argv):
    """``AGI(astbill.py,-c,/etc/astbill/astbill.yaml)`` picks a config file."""
    if len(argv) >= 2 and argv[0] in ("-c", "--config"):
        return argv[1]
    return None


def report(channel, message):
    try:
        channel.set("ASTBILL_STATUS", ERROR)
        channel.verbose(f"astbill: {' '.join(message.split())}")
    except (Hangup, AGIError):
        sys.stderr.write(f"astbill: {message}\n")


def replay_spool(settings):
    """After our own call is settled, retry settlements that earlier calls
    could not write; the database is evidently back."""
    if not spool.pending(settings["spool_dir"]):
        return
    from .store import StoreError, open_store
    store = open_store(settings)
    try:
        spool.replay(store, settings["spool_dir"], settings["decimals"])
    except StoreError:
        pass
    finally:
        store.close()
