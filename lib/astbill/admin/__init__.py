"""Administration: every action once, and the faces that call it.

``actions`` holds one function per action (accounts, money, rates, trunks,
reports), ``auth`` the staff users and the API tokens; ``cli`` is the
``astbill-admin`` command line and ``web`` the HTTP API (``astbill-web``).
A face parses its input, calls one library function and shows its result:
the checks, the one-line refusals, the SQL and the money rules are the
library's alone.  Nothing here is imported on a call's path.
"""
