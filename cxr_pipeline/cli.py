"""The installed commands, each the CLI of one module: COMMANDS is the one list, which setup.py reads for its
console scripts and from which the functions below are made.

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
    "cxr-monitor": "cxr_pipeline.training.monitor",
}


def _command(module: str):
    def run() -> None:
        status = importlib.import_module(module).main()
        sys.exit(status if isinstance(status, int) else 0)

    run.__doc__ = f"python -m {module}"
    return run


def function_name(command: str) -> str:
    """The attribute of this module that runs `command` (setup.py's entry points name it): its last word."""
    return command.split("-", 1)[1]


globals().update({function_name(command): _command(module) for command, module in COMMANDS.items()})
