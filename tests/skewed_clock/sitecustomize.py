"""Python loads this at start-up when its folder is on PYTHONPATH: the
process's clock then runs ASTBILL_TEST_CLOCK_SKEW seconds off, as another
box's clock would."""
import os
import time

_skew = float(os.environ.get("ASTBILL_TEST_CLOCK_SKEW", "0"))
if _skew:
    _time, _gmtime = time.time, time.gmtime
    time.time = lambda: _time() + _skew
    time.gmtime = lambda secs=None: _gmtime(_time() + _skew if secs is None else secs)
