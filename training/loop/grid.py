"""A sweep's grid: one training/train.py run per (model, image size) cell, each one's command line, and running
them in parallel, one subprocess per cell, with a GPU or a share of the CPU cores each.

training/sweep.py is the command around it; training/evaluation/comparison.py builds the table of the results.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cxr_pipeline.config import given_destinations, parse_args
from cxr_pipeline.etl import versions
from cxr_pipeline.training import train as train_command
from cxr_pipeline.training.evaluation.results import NO_TABLE

log = logging.getLogger("sweep")
TRAIN_SCRIPT = Path(train_command.__file__)
# train.py options that train_argv sets for every run, with the sweep's flag that sets them: given after -- they
# would contradict the grid
RESERVED = {"dataset": "--dataset", "model": "--model", "stages": "--stages", "run_id": "--sweep-id",
            "output_dir": "--output-dir", "results_table": "--results-table", "results_engine": "--results-engine",
            "backend": "(one process per run)", "resume": "(not for a sweep)"}


@dataclass(frozen=True)
class Cell:
    """One grid cell: a model trained on one size's dataset."""

    model: str
    size: int
    dataset: str
    run_id: str
    run_dir: Path
    log_path: Path


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: stopped at --run-timeout
    wall_s: float
    error: str  # the log's last line when the run failed

    @property
    def status(self) -> str:
        if self.returncode == 0:
            return "ok"
        return "timed out" if self.returncode is None else f"failed (exit {self.returncode})"


def run_id(sweep_id: str, model: str, size: int) -> str:
    return f"{sweep_id}-{model}-{size}"


def runs_dir(output_dir: str | Path, sweep_id: str) -> Path:
    """Where the runs of a sweep go: train.py --output-dir of every cell."""
    return Path(output_dir) / sweep_id / "runs"


def parse_datasets(values) -> dict[int, str]:
    """SIZE=PATH strings (the command line) or a {size: path} mapping (a YAML config) -> {size: path}."""
    pairs = values.items() if isinstance(values, dict) else (str(value).partition("=")[::2] for value in values)
    datasets = {}
    for size, path in pairs:
        if not str(size).strip().isdigit() or not str(path).strip():
            raise ValueError(f"--dataset {size}={path}: expected SIZE=PATH, e.g. 256=/data/nih_256")
        if int(size) in datasets:
            raise ValueError(f"--dataset: size {size} given twice")
        datasets[int(size)] = str(path).strip()
    return datasets


def make_grid(args: argparse.Namespace) -> list[Cell]:
    """The cells of the sweep's resolved arguments: models in the order given, sizes ascending; every cell of a
    size reads the same dataset version (each dataset's current version, resolved here once)."""
    datasets = {size: str(versions.resolve(path).path) for size, path in parse_datasets(args.dataset).items()}
    cells = []
    for model in args.model:
        for size, dataset in sorted(datasets.items()):
            name = run_id(args.sweep_id, model, size)
            cells.append(Cell(model, size, dataset, name, runs_dir(args.output_dir, args.sweep_id) / name,
                              Path(args.output_dir) / args.sweep_id / "logs" / f"{name}.log"))
    return cells


def train_argv(cell: Cell, args: argparse.Namespace) -> list[str]:
    """The train.py command line of a cell: --config (its 'train:' section), the flags after --, then the grid's
    (RESERVED), which come last so that they win."""
    config = ["--config", args.config] if args.config else []
    return [*config, *args.train_args, "--dataset", cell.dataset, "--model", cell.model, "--stages", args.stages,
            "--run-id", cell.run_id, "--output-dir", str(cell.run_dir.parent),
            "--results-table", NO_TABLE, "--backend", "single"]


def check_train_args(cells: list[Cell], args: argparse.Namespace) -> None:
    """Refuse flags after -- that the grid sets, then parse each run's command line as train.py will, so a typo
    or an unknown model stops the sweep before anything is trained."""
    given = train_command.build_parser()
    given.prog = "training/train.py (flags after --)"
    given.add_argument("--config")
    clashes = sorted(given_destinations(given, args.train_args) & set(RESERVED))
    if clashes:
        raise SystemExit("after --: " + ", ".join(f"--{name.replace('_', '-')} is set by the sweep's {RESERVED[name]}"
                                                  for name in clashes))
    for cell in cells:
        parser = train_command.build_parser()
        parser.prog = f"training/train.py (run {cell.run_id})"
        parse_args(parser, "train", train_argv(cell, args))


def visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (listed.split(",") if listed else [str(index) for index in range(count)])[:count]


def default_parallel(gpus: list[str], cores: int) -> int:
    return len(gpus) if gpus else max(1, cores // 2)


def run_environment(slot: int, parallel: int, gpus: list[str], cores: int) -> dict[str, str]:
    """What a run in `slot` sees: its own GPU, or on CPU its share of the cores (unless OMP_NUM_THREADS is set)."""
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cores // parallel))}


def last_line(path: Path) -> str:
    """The log's last non-empty line (a progress bar's carriage returns dropped): train.py's error message."""
    if not path.exists():
        return ""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


def train_cell(cell: Cell, args: argparse.Namespace, env: dict[str, str], number: str) -> Outcome:
    """One cell's train.py as a subprocess with `env` added, its output in the cell's log; stopped after
    args.run_timeout seconds (0: no limit)."""
    cell.log_path.parent.mkdir(parents=True, exist_ok=True)
    where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else "CPU"
    log.info("%s start %s on %s; log %s", number, cell.run_id, where, cell.log_path)
    started = time.perf_counter()
    with cell.log_path.open("w") as handle:
        try:
            returncode = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *train_argv(cell, args)],
                                        stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                        timeout=args.run_timeout or None).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    wall = time.perf_counter() - started
    outcome = Outcome(returncode, wall, "" if returncode == 0 else last_line(cell.log_path))
    if returncode == 0:
        log.info("%s done %s in %.1f s", number, cell.run_id, wall)
    else:
        log.error("%s %s %s after %.1f s: %s; log %s", number, cell.run_id, outcome.status, wall,
                  outcome.error or "no output", cell.log_path)
    return outcome


def train_grid(cells: list[Cell], args: argparse.Namespace, gpus: list[str], cores: int) -> dict[str, Outcome]:
    """Every cell's train.py, at most args.parallel at a time; slot k of the pool keeps GPU k (mod GPUs)."""
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(args.parallel):
        slots.put(slot)

    def train(numbered):
        number, cell = numbered
        slot = slots.get()
        try:
            return cell.run_id, train_cell(cell, args, run_environment(slot, args.parallel, gpus, cores),
                                           f"[{number}/{len(cells)}]")
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(args.parallel) as pool:
        return dict(pool.map(train, enumerate(cells, 1)))
