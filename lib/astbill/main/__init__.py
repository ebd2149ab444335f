"""The AGI entry point: set up the channel, load the config, bill the call.

Whatever happens, the script exits 0 with ASTBILL_STATUS set where the
channel still listens, one readable line in Asterisk's log, and no Python
traceback on Asterisk's console.  The FastAGI server (``main.fastagi``)
bills its calls through ``bill`` too; it lives apart so that a per-call
start-up never imports its sockets and threads.
"""
import sys

# The C module itself: ``signal`` wraps it in enums, whose import costs more
# than the rest of a call's start-up.
import _signal as signal

from .. import callflow
from ..agi import AGIError, BadEnvironment, Channel, Hangup
from ..config import ConfigError, load
from ..ledger import CAUSES, ERROR


def main(argv, stdin=None, stdout=None):
    channel = Channel(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
    # A caller hangup sends SIGHUP, whose default action would kill us
    # before the call is settled.
    signal.signal(signal.SIGHUP, channel.note_hangup)
    settings, settlement, _ = bill(channel, lambda env: parse_args(agi_args(env) or argv))
    if settlement is not None and settlement.cost is not None:
        # The database took our call: retry what earlier calls spooled.
        from ..recovery import replay_after_call
        replay_after_call(settings)
    return 0


def _stderr(message):
    sys.stderr.write(message + "\n")


def bill(channel, arguments, log=_stderr):
    """Read the call's environment and bill it: (settings, Settlement or
    None, the problem that ended it early or None).  ``arguments(env)``
    gives (config file or None, number or None)."""
    settings = None
    try:
        channel.read_env()
        config, target = arguments(channel.env)
        settings = load(config)
        return settings, callflow.handle(channel, settings, target), None
    except (ConfigError, BadEnvironment) as exc:
        problem = f"{ERROR} {exc}"
        report(channel, problem, log, settings)
    except (Hangup, AGIError) as exc:
        problem = str(exc)
        log(f"astbill: {exc}")
    except Exception as exc:  # a bug must not leave the dialplan without a status
        problem = f"{ERROR} internal error: {type(exc).__name__}: {exc}"
        report(channel, problem, log, settings)
    return settings, None, problem


def agi_args(env):
    """The arguments of AGI(astbill.py,...), as Asterisk sends them."""
    args = []
    while f"agi_arg_{len(args) + 1}" in env:
        args.append(env[f"agi_arg_{len(args) + 1}"])
    return args


def parse_args(args):
    """(config file or None, number to dial or None) from the AGI arguments:
    ``AGI(astbill.py[,-c,FILE][,NUMBER])``."""
    config = None
    if len(args) >= 2 and args[0] in ("-c", "--config"):
        config, args = args[1], args[2:]
    return config, (args[0] if args and args[0] else None)


def report(channel, message, log=_stderr, settings=None):
    """ERROR for the dialplan, with its hangup cause and prompt as a
    refusal has them; the message in Asterisk's log (or ours)."""
    try:
        channel.set("ASTBILL_STATUS", ERROR)
        channel.set("ASTBILL_CAUSE", CAUSES[ERROR])
        channel.set("ASTBILL_PROMPT", settings["refusal_prompts"].get(ERROR, "") if settings else "")
        channel.verbose(f"astbill: {' '.join(message.split())}")
    except (Hangup, AGIError):
        log(f"astbill: {message}")
