"""The exit statuses of every `medclear` command, one meaning each (README, "Exit status").

2 is click's usage error (a wrong option or command), so no command uses it for anything
else: a script can tell "I called it wrong" from "it was refused".
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    ERROR = 1  # could not run (stack not running, a server down, a bad file): the message says
    USAGE = 2  # a wrong command, option or value (click's own)
    DECLINED = 3  # decided and refused: a swipe declined, a window operation refused
    DIFFERENCES = 4  # recon ran and found differences
    CHECK_FAILED = 5  # a drill or the gateway fuzz found a problem


EPILOG = (
    "Exit status: 0 done · 1 could not run · 2 usage error · 3 declined or refused (the "
    "result code is printed) · 4 recon found differences · 5 a drill or fuzz check failed."
)
