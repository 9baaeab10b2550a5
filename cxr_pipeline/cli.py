"""The installed commands (setup.py's console scripts), each the CLI of one module.

`cxr-train ...` is `python -m cxr_pipeline.training.train ...` (and, in a checkout, `python -m
training.train` or `horovodrun ... python training/train.py`). Modules' `main()` return what they
made, for tests and notebooks; a console script hands that to `sys.exit`, which would print it and
exit 1, so each command here exits 0 unless `main()` returns an int status.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "cxr-etl": "cxr_pipeline.etl.preprocess",
    "cxr-train": "cxr_pipeline.training.train",
    "cxr-predict": "cxr_pipeline.training.predict",
    "cxr-evaluate": "cxr_pipeline.training.evaluate",
    "cxr-ensemble": "cxr_pipeline.training.ensemble",
    "cxr-report": "cxr_pipeline.training.report",
    "cxr-results": "cxr_pipeline.training.show_results",
    "cxr-sweep": "cxr_pipeline.training.sweep",
    "cxr-relabel": "cxr_pipeline.etl.uncertainty",
    "cxr-score": "cxr_pipeline.jobs.score",
}


def _command(module: str):
    def run() -> None:
        status = importlib.import_module(module).main()
        sys.exit(status if isinstance(status, int) else 0)

    run.__doc__ = f"python -m {module}"
    return run


etl = _command(COMMANDS["cxr-etl"])
train = _command(COMMANDS["cxr-train"])
predict = _command(COMMANDS["cxr-predict"])
evaluate = _command(COMMANDS["cxr-evaluate"])
ensemble = _command(COMMANDS["cxr-ensemble"])
report = _command(COMMANDS["cxr-report"])
results = _command(COMMANDS["cxr-results"])
sweep = _command(COMMANDS["cxr-sweep"])
relabel = _command(COMMANDS["cxr-relabel"])
score = _command(COMMANDS["cxr-score"])
