"""Run ids, made in one place for training runs, sweeps, evaluations and ensembles, so every Delta row's run_id
reads alike and sorts by time."""
from __future__ import annotations

import secrets
from datetime import datetime, timezone


def new_run_id(kind: str = "") -> str:
    """`20250101-120000-a1b2c3` (UTC time, then a random suffix), after `<kind>-` when given: eval-..., ensemble-..."""
    made = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    return f"{kind}-{made}" if kind else made
