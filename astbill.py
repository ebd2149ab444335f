#!/usr/bin/env python3
"""AstBill: real-time prepaid billing for Asterisk, one AGI run per call.

    exten => _X.,1,AGI(astbill.py)
    same  => n,GotoIf($["${ASTBILL_STATUS}" != "OK"]?refused)

Reads the AGI dialogue on stdin and answers on stdout; run it by hand with
a transcript:  ./astbill.py < tests/fixtures/answered.agi
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "lib"))

from astbill.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
