"""Named points where a job can be held, so fault tests act at an exact moment, not a guess.

With `CXR_HOLD_AT=NAME@PIPE` in its environment (PIPE a named pipe the test made with
os.mkfifo), a job that reaches the point NAME writes its pid into PIPE, which wakes the test
blocked reading it, then blocks until the test opens PIPE for writing and closes it. No side
polls: each waits in open()/read(). Without the variable a point does nothing. Points:

- `etl:before-commit`: the version is written in full, not yet sealed (no `_version.json`) nor current.
- `train:<stage>:<epoch>`: rank 0 has saved checkpoint.pth after that epoch.
"""
from __future__ import annotations

import os

VARIABLE = "CXR_HOLD_AT"


def hold_at(name: str) -> None:
    point, _, pipe = os.environ.get(VARIABLE, "").partition("@")
    if point != name or not pipe:
        return
    with open(pipe, "w") as reached:  # blocks until the test is listening
        reached.write(f"{os.getpid()}\n")
    with open(pipe) as release:  # blocks until the test lets the job go on
        release.read()
