"""Train a grid of models x image sizes from existing ETL outputs in parallel, and compare them in one table.

    python -m training.sweep --dataset 256=/data/nih_256 512=/data/nih_512 --model resnet50 densenet121 \\
        -- --epochs-kt 3 --epochs-finetune 10              # flags after -- go to every training/train.py
    python -m training.sweep --config conf/sweep.yaml      # its 'sweep:' section; its 'train:' one goes to train.py
    python -m training.sweep --compare-only --sweep-id ID --dataset ... --model ...   # rebuild the table

Report 001's experiment: every (model, size) cell is one `training/train.py --backend single` process with run
id SWEEP_ID-MODEL-SIZE, running the --stages (knowledge transfer, then fine-tuning) on that size's ETL output.
Runs go to OUTPUT_DIR/SWEEP_ID/runs/RUN_ID, their logs to OUTPUT_DIR/SWEEP_ID/logs/RUN_ID.log. At most
--parallel run at a time: by default one per GPU (each sees only its own through CUDA_VISIBLE_DEVICES), or
on CPU one per 2 cores, each with OMP_NUM_THREADS = cores / parallel runs. A failed run is reported with its
log and does not stop the others; the exit status is 0 only if every run succeeded and every stage has rows.

Each run keeps its AUROC rows in RUN_DIR/auroc_rows.parquet (train.py --results-table none), as under
jobs/train_distributor.py on Databricks; the sweep then writes them to --results-table in one commit, where a
sweep's rows are those whose run_id starts with 'SWEEP_ID-'. OUTPUT_DIR/SWEEP_ID/comparison.csv and
comparison.html hold one row per model, size and stage, built from each run's own outputs: test mean AUROC with
its 95% patient-level bootstrap CI (the result), val mean AUROC (labelled val: it chose the best epoch and fitted
the calibration), per-label test AUROC, training images/s (summary.csv) and the run's wall time.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd

from cxr_pipeline.config import dump_config, parse_args
from cxr_pipeline.training.evaluation.comparison import compare, render, summary_lines
from cxr_pipeline.training.evaluation.results import add_engine_argument, read_run_rows, write_results
from cxr_pipeline.training.loop.grid import (Cell, Outcome, check_train_args, default_parallel, make_grid,
                                             parse_datasets, train_grid, visible_gpus)
from cxr_pipeline.training.loop.run_ids import new_run_id
from cxr_pipeline.training.train import STAGES

log = logging.getLogger("sweep")


class ListFromConfigOrFlags(argparse.Action):
    """Repeat the flag or list several values; on the command line they replace the --config list."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (list(current) if current is not self.default else []) + list(values))


class SweepParser(argparse.ArgumentParser):
    def error(self, message):
        hint = " (flags for training/train.py go after --)" if message.startswith("unrecognized arguments") else ""
        super().error(message + hint)


def build_parser() -> argparse.ArgumentParser:
    parser = SweepParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--dataset", nargs="+", action=ListFromConfigOrFlags, default=[], metavar="SIZE=PATH",
                      help="one ETL output (etl/preprocess.py --output) per image size, e.g. 256=/data/nih_256; "
                           "in --config also a mapping {256: /data/nih_256}")
    grid.add_argument("--model", nargs="+", action=ListFromConfigOrFlags, default=[], metavar="MODEL",
                      help="train.py --model names, e.g. resnet50 densenet121")
    grid.add_argument("--stages", default="kt,finetune", help="train.py --stages of every run (default kt,finetune)")
    runs = parser.add_argument_group("runs and outputs")
    runs.add_argument("--sweep-id", help="name of the sweep, the prefix of its run ids (default: time + random "
                                         "suffix; required with --compare-only)")
    runs.add_argument("--output-dir", default="outputs/sweeps",
                      help="the sweep goes to OUTPUT_DIR/SWEEP_ID (default outputs/sweeps)")
    runs.add_argument("--parallel", type=int, default=0,
                      help="runs at a time (default 0: one per visible GPU, else one per 2 CPU cores, at least 1)")
    runs.add_argument("--run-timeout", type=float, default=0,
                      help="stop a run after this many seconds and count it as failed (default 0: no limit)")
    runs.add_argument("--results-table", default="outputs/results_delta",
                      help="Delta table the runs' AUROC rows are written to at the end "
                           "(default outputs/results_delta)")
    add_engine_argument(runs)
    runs.add_argument("--compare-only", action="store_true",
                      help="train nothing and append nothing: rebuild the comparison from the run folders, e.g. "
                           "after the Databricks job cxr_sweep trained the cells as separate tasks")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after --: flags for every training/train.py, e.g. -- --epochs-kt 1 --weights none")
    return parser


def publish(cells: list[Cell], table_uri: str, engine: str) -> tuple[int, int]:
    """Write every run's rows to the shared table in one commit: (rows, runs with rows)."""
    frames = [rows for rows in (read_run_rows(cell.run_dir) for cell in cells) if not rows.empty]
    if not frames:
        return 0, 0
    write_results(table_uri, pd.concat(frames, ignore_index=True), engine)
    return sum(map(len, frames)), len(frames)


def resolve(argv) -> argparse.Namespace:
    args = parse_args(build_parser(), "sweep", argv)
    args.train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        args.dataset = [f"{size}={path}" for size, path in parse_datasets(args.dataset).items()]
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not args.dataset or not args.model:
        raise SystemExit("give the grid: --dataset SIZE=PATH ... and --model MODEL ... (or a --config 'sweep:' "
                         "section with dataset and model)")
    if len(set(args.model)) < len(args.model):
        raise SystemExit(f"--model lists a model twice: {args.model}")
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    if not stages or set(stages) - set(STAGES):
        raise SystemExit(f"--stages must list stages from {STAGES}, got {args.stages!r}")
    if args.compare_only and not args.sweep_id:
        raise SystemExit("--compare-only needs the --sweep-id of the sweep to compare")
    args.sweep_id = args.sweep_id or new_run_id()
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sweep %(levelname)s %(message)s")
    args = resolve(argv)
    cells = make_grid(args)
    sweep_dir = Path(args.output_dir) / args.sweep_id
    outcomes: dict[str, Outcome] = {}
    if not args.compare_only:
        check_train_args(cells, args)
        if sweep_dir.exists():
            raise SystemExit(f"{sweep_dir} exists: choose another --sweep-id, or add --compare-only to rebuild "
                             "its comparison")
        gpus, cores = visible_gpus(), len(os.sched_getaffinity(0))
        args.parallel = args.parallel or default_parallel(gpus, cores)
        sweep_dir.mkdir(parents=True)
        dump_config(args, sweep_dir / "sweep.yaml")
        log.info("sweep %s: %d model(s) x %d size(s) = %d runs, stages %s, %d at a time on %s; outputs in %s",
                 args.sweep_id, len(args.model), len(args.dataset), len(cells), args.stages, args.parallel,
                 f"GPUs {','.join(gpus)}" if gpus else f"CPU ({cores} cores)", sweep_dir)
        started = time.perf_counter()
        outcomes = train_grid(cells, args, gpus, cores)
        succeeded = sum(outcome.returncode == 0 for outcome in outcomes.values())
        log.info("training: %d of %d runs succeeded in %.1f s", succeeded, len(cells), time.perf_counter() - started)
        started = time.perf_counter()
        published, runs_published = publish(cells, args.results_table, args.results_engine)
        log.info("publish: %d AUROC rows of %d runs appended to %s in %.1f s (this sweep: run_id '%s-*')",
                 published, runs_published, args.results_table, time.perf_counter() - started, args.sweep_id)
    started = time.perf_counter()
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    table = compare(cells, stages, outcomes, args.sweep_id)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(sweep_dir / "comparison.csv", index=False)
    (sweep_dir / "comparison.html").write_text(render(table, args.sweep_id, sweep_dir))
    with_results = int(table["test_mean_auroc"].notna().sum())
    log.info("compare: %d rows (%d with a test mean AUROC) in %.1f s -> %s, %s", len(table), with_results,
             time.perf_counter() - started, sweep_dir / "comparison.csv", sweep_dir / "comparison.html")
    for line in summary_lines(table):
        log.info("%s", line)
    failed = table[table["status"] != "ok"].drop_duplicates("run_id")
    for row in failed.itertuples():
        log.error("%s %s%s%s", row.run_id, row.status, f": {row.error}" if row.error else "",
                  f"; log {row.log}" if row.log else "")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
