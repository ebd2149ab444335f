"""The benchmark runs (its numbers are read by people, never asserted here)."""
import subprocess
import sys

from conftest import ROOT


def test_the_benchmark_runs_end_to_end():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--runs", "3",
                             "--cdr-rows", "100", "--bursts", "5", "--no-mariadb",
                             "--trunk-prefixes", "1000", "--fastagi-calls", "20,60"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "floor: `python -c pass`" in out and "SQLite authorize, 100,000 prefixes, 100 CDRs" in out
    assert "SQLite authorize, 10 trunks x 1,000 x 4 periods" in out
    assert "after the bursts: audit: ok" in out
    assert "refused 0" in out
    assert "SQLite               connect -> EXEC Dial median" in out and "60 calls" in out
    assert "SQLite unpinned      connect -> EXEC Dial median" in out
    assert "SQLite dashboard, first (30 days read)" in out and "SQLite CDR page" in out
    assert "SQLite: authorize" in out and "while a console refreshes every second" in out
