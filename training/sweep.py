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
import html
import logging
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr_pipeline.config import dump_config, parse_args
from cxr_pipeline.etl import versions
from cxr_pipeline.training.report import STYLE, number_table, with_interval
from cxr_pipeline.training.results import ENGINES, NO_TABLE, read_run_rows, write_results
from cxr_pipeline.training.train import STAGES, new_run_id
from cxr_pipeline.training.train import build_parser as train_parser

log = logging.getLogger("sweep")
TRAIN_SCRIPT = Path(__file__).with_name("train.py")
# train.py options the sweep sets for every run; given after -- they would contradict the grid
RESERVED = {"dataset": "--dataset", "model": "--model", "stages": "--stages", "run_id": "--sweep-id",
            "output_dir": "--output-dir", "results_table": "--results-table", "results_engine": "--results-engine",
            "backend": "(one process per run)", "resume": "(not for a sweep)"}
# comparison.csv: these, then test_auroc_<label> per label, then where each run's files are
LEADING_COLUMNS = ["sweep_id", "model", "image_size", "stage", "run_id", "status", "test_mean_auroc",
                   "test_mean_auroc_ci_low", "test_mean_auroc_ci_high", "val_mean_auroc", "best_epoch", "epochs",
                   "train_images_per_s", "run_wall_s"]
TRAILING_COLUMNS = ["run_dir", "log", "error"]


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
    runs.add_argument("--results-engine", choices=ENGINES, default="auto",
                      help="how to write them: auto (default: delta-spark for a catalog table name or on "
                           "Databricks, else deltalake), deltalake or delta-spark")
    runs.add_argument("--compare-only", action="store_true",
                      help="train nothing and append nothing: rebuild the comparison from the run folders, e.g. "
                           "after the Databricks job cxr_sweep trained the cells as separate tasks")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after --: flags for every training/train.py, e.g. -- --epochs-kt 1 --weights none")
    return parser


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


def make_grid(args) -> list[Cell]:
    """Models in the order given, sizes ascending; every cell of a size reads the same dataset version (each
    dataset's current version, resolved here once)."""
    datasets = {size: str(versions.resolve(path).path) for size, path in parse_datasets(args.dataset).items()}
    cells = []
    for model in args.model:
        for size, dataset in sorted(datasets.items()):
            name = run_id(args.sweep_id, model, size)
            cells.append(Cell(model, size, dataset, name, runs_dir(args.output_dir, args.sweep_id) / name,
                              Path(args.output_dir) / args.sweep_id / "logs" / f"{name}.log"))
    return cells


def train_argv(cell: Cell, args) -> list[str]:
    """The train.py command line of a cell: --config (its 'train:' section), the flags after --, then the grid's."""
    config = ["--config", args.config] if args.config else []
    return [*config, *args.train_args, "--dataset", cell.dataset, "--model", cell.model, "--stages", args.stages,
            "--run-id", cell.run_id, "--output-dir", str(cell.run_dir.parent),
            "--results-table", NO_TABLE, "--backend", "single"]


def check_train_args(cells: list[Cell], args) -> None:
    """Refuse flags after -- that the grid sets, then parse each run's command line as train.py will, so a typo
    or an unknown model stops the sweep before anything is trained."""
    given = train_parser()
    given.prog = "training/train.py (flags after --)"
    given.add_argument("--config")
    for action in given._actions:  # only the flags given show up
        action.default = argparse.SUPPRESS
    clashes = sorted(set(vars(given.parse_known_args(args.train_args)[0])) & set(RESERVED))
    if clashes:
        raise SystemExit("after --: " + ", ".join(f"--{name.replace('_', '-')} is set by the sweep's {RESERVED[name]}"
                                                  for name in clashes))
    for cell in cells:
        parser = train_parser()
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


def train_cell(cell: Cell, args, env: dict[str, str], number: str) -> Outcome:
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


def train_grid(cells: list[Cell], args, gpus: list[str], cores: int) -> dict[str, Outcome]:
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


def publish(cells: list[Cell], table_uri: str, engine: str) -> tuple[int, int]:
    """Write every run's rows to the shared table in one commit: (rows, runs with rows)."""
    frames = [rows for rows in (read_run_rows(cell.run_dir) for cell in cells) if not rows.empty]
    if not frames:
        return 0, 0
    write_results(table_uri, pd.concat(frames, ignore_index=True), engine)
    return sum(map(len, frames)), len(frames)


def stage_rows(rows: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The stage's rows (a retried run replaces its earlier rows of a stage, never adds a second set)."""
    return rows if rows.empty else rows[rows["stage"] == stage]


def training_speed(run_dir: Path, stage: str) -> tuple[int | None, float | None]:
    """(epochs trained, mean training images/s) of a stage, from RUN_DIR/summary.csv (last attempt per epoch)."""
    path = run_dir / "summary.csv"
    if not path.exists():
        return None, None
    epochs = pd.read_csv(path)
    epochs = epochs[epochs["stage"] == stage].drop_duplicates("epoch", keep="last")
    return (len(epochs), float(epochs["images_per_second"].mean())) if len(epochs) else (None, None)


def stage_metrics(found: pd.DataFrame) -> dict:
    """Test and val mean AUROC and per-label test AUROC from one stage's rows."""
    if found.empty:
        return {}
    mean = found[found["label"] == "mean"].set_index("split")
    test = found[(found["split"] == "test") & (found["label"] != "mean")]
    metrics = {"best_epoch": found["best_epoch"].iloc[0]}
    if "test" in mean.index:
        metrics.update({f"test_mean_{column}": mean.loc["test", column]
                        for column in ("auroc", "auroc_ci_low", "auroc_ci_high")})
    if "val" in mean.index:
        metrics["val_mean_auroc"] = mean.loc["val", "auroc"]
    return {**metrics, **{f"test_auroc_{label}": auroc for label, auroc in zip(test["label"], test["auroc"])}}


def compare(cells: list[Cell], stages: list[str], outcomes: dict[str, Outcome], sweep_id: str) -> pd.DataFrame:
    """One row per model, size and stage, in grid order; test figures first, val labelled as val."""
    records = []
    for cell in cells:
        rows, outcome = read_run_rows(cell.run_dir), outcomes.get(cell.run_id)
        for stage in stages:
            found = stage_rows(rows, stage)
            epochs, images_per_s = training_speed(cell.run_dir, stage)
            status = outcome.status if outcome and outcome.returncode != 0 else "no results" if found.empty else "ok"
            records.append({"sweep_id": sweep_id, "model": cell.model, "image_size": cell.size, "stage": stage,
                            "run_id": cell.run_id, "status": status, **stage_metrics(found), "epochs": epochs,
                            "train_images_per_s": images_per_s, "run_wall_s": outcome.wall_s if outcome else None,
                            "run_dir": str(cell.run_dir),
                            "log": str(cell.log_path) if cell.log_path.exists() else "",
                            "error": outcome.error if outcome else ""})
    table = pd.DataFrame(records)
    labels = [column for column in table if column.startswith("test_auroc_")]
    table = table.reindex(columns=[*LEADING_COLUMNS, *labels, *TRAILING_COLUMNS])
    return table.astype({"best_epoch": "Int64", "epochs": "Int64"})


def render(table: pd.DataFrame, sweep_id: str, sweep_dir: Path) -> str:
    """The comparison as one self-contained page: mean AUROC per cell and stage, per-label test AUROC, the runs."""
    means = table[["model", "image_size", "stage"]].copy()
    means["test mean AUROC [95% CI]"] = with_interval(table, "test_mean_auroc")
    means["val mean AUROC (val)"] = table["val_mean_auroc"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    means["best epoch"], means["epochs"] = table["best_epoch"], table["epochs"]
    means["train images/s"] = table["train_images_per_s"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    means["run wall time (s, all stages)"] = table["run_wall_s"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    means["status"] = table["status"]
    label_columns = [column for column in table if column.startswith("test_auroc_")]
    per_label = table.set_index(table["model"] + " " + table["image_size"].astype(str) + "px " + table["stage"])
    per_label = per_label[label_columns].T.rename(index=lambda column: column.removeprefix("test_auroc_"))
    runs = []
    for _, run in table.drop_duplicates("run_id").iterrows():
        report = Path(run["run_dir"]) / "report.html"
        link = (f" <a href='{html.escape(os.path.relpath(report, sweep_dir))}'>report</a>" if report.exists() else "")
        failure = f": {html.escape(run['error'])}" if run["error"] else ""
        log_text = f", log <code>{html.escape(run['log'])}</code>" if run["log"] else ""
        runs.append(f"<li><code>{html.escape(run['run_id'])}</code> {html.escape(run['status'])}{failure}{link}"
                    f"{log_text}</li>")
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(sweep_id)}</title>"
        f"<style>{STYLE}</style></head><body><h1>Sweep <code>{html.escape(sweep_id)}</code></h1>",
        "<p>Mean AUROC over the labels on the test split, with 95% patient-level bootstrap intervals, is the result. "
        "The val figure is labelled val: it chose each stage's best epoch and fitted the calibration, so it is not "
        "an estimate of performance on new patients. Images/s: training throughput, mean over the stage's epochs.</p>",
        number_table(means),
        "<h2>Per-label test AUROC</h2>", number_table(per_label.rename_axis("label").reset_index()),
        f"<h2>Runs ({table['run_id'].nunique()})</h2><ul>{''.join(runs)}</ul></body></html>"])


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
    for row, result in zip(table.itertuples(), with_interval(table, "test_mean_auroc")):
        val = "" if pd.isna(row.val_mean_auroc) else f" (val {row.val_mean_auroc:.3f})"
        log.info("%s %dpx %s: test mean AUROC %s%s, %s", row.model, row.image_size, row.stage, result or "n/a", val,
                 row.status)
    failed = table[table["status"] != "ok"].drop_duplicates("run_id")
    for row in failed.itertuples():
        log.error("%s %s%s%s", row.run_id, row.status, f": {row.error}" if row.error else "",
                  f"; log {row.log}" if row.log else "")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
