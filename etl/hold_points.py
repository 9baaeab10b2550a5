"""Named points where a job can be held, so fault tests act at an exact moment, not a guess.

With `CXR_HOLD_AT=NAME@FILE` in its environment, a job that reaches the point NAME creates
FILE (holding its pid) and waits while FILE exists. A test waits for FILE, does its damage
(kills a process), then deletes FILE. Without the variable a point does nothing. Points:

- `etl:before-commit`: the dataset is complete in its staging folder, not yet renamed into place.
- `train:<stage>:<epoch>`: rank 0 has saved checkpoint.pth after that epoch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

VARIABLE = "CXR_HOLD_AT"


def hold_at(name: str) -> None:
    point, _, marker = os.environ.get(VARIABLE, "").partition("@")
    if point != name or not marker:
        return
    Path(marker).write_text(str(os.getpid()))
    while os.path.exists(marker):
        time.sleep(0.05)
