"""Run training/train.py on a Spark cluster with TorchDistributor, then publish its AUROC rows from the driver.

Databricks deprecated HorovodRunner after Runtime 15.4 LTS ML and recommends
`pyspark.ml.torch.distributor.TorchDistributor`: it starts `torchrun` on the cluster's
workers (or on the driver with --local-mode), so train.py runs with its torch.distributed
backend, exactly as under a local `torchrun`.

    python jobs/train_distributor.py --num-processes 8 --use-gpu --results-table main.cxr.auroc_results \\
        -- --config conf/nih.yaml --dataset /Volumes/... --run-id nightly-42

Rank 0 may run on any worker, where no Spark session (and so no Delta on Spark) exists and delta-rs cannot
commit to a FUSE-mounted volume. So train.py writes no table (--results-table none): it keeps its rows in
RUN_DIR/auroc_rows.parquet, and this driver writes them to --results-table with its Spark session (a Unity
Catalog table name, or a Delta folder), replacing rows of the same run id that an earlier attempt wrote.

The run id is fixed before training starts (taken from train.py's --run-id, else made here). When its
folder already holds a checkpoint.pth (a retried job task), training continues from it (--resume)
instead of starting again.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cxr_pipeline.etl.sessions import session_builder
from cxr_pipeline.training.evaluation.results import NO_TABLE, read_run_rows, write_results

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train.py"
log = logging.getLogger("train_distributor")


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s train_distributor %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2, help="training processes (GPUs with --use-gpu)")
    parser.add_argument("--local-mode", action="store_true", help="run the processes on the driver node")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per process (NCCL)")
    parser.add_argument("--results-table",
                        help="where the driver writes the run's AUROC rows: a Unity Catalog table "
                             "(catalog.schema.table) or a Delta folder (default: train.py's --results-table)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for training/train.py, after --")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    train_args, run_dir, run_id, table = driver_owned_run(train_args)
    table = args.results_table or table

    from pyspark.ml.torch.distributor import TorchDistributor

    # TorchDistributor runs on the active session; the results are written through the same one (with Delta)
    session_builder("cxr-train", delta=True).getOrCreate()
    distributor = TorchDistributor(num_processes=args.num_processes, local_mode=args.local_mode,
                                   use_gpu=args.use_gpu)
    distributor.run(str(TRAIN_SCRIPT), *train_args)
    rows = read_run_rows(run_dir)
    if rows.empty:
        raise SystemExit(f"run {run_id} reported no AUROC rows ({run_dir}): see the training log above")
    if table != NO_TABLE:
        write_results(table, rows, "delta-spark")
        log.info("wrote %d AUROC rows of run %s to %s", len(rows), run_id, table)


def driver_owned_run(train_args: list[str]) -> tuple[list[str], Path, str, str]:
    """train.py arguments that keep the rows in the run folder under a run id fixed in advance, continuing
    from the folder's checkpoint when an earlier attempt left one; that folder; the run id; the results table
    the arguments named (train.py's default if none)."""
    from cxr_pipeline.config import parse_args
    from cxr_pipeline.training.loop.run_ids import new_run_id
    from cxr_pipeline.training.train import build_parser

    resolved = parse_args(build_parser(), "train", train_args)
    run_id = resolved.run_id or new_run_id()
    run_dir = Path(resolved.output_dir) / run_id
    extra = [] if resolved.run_id else ["--run-id", run_id]
    checkpoint = run_dir / "checkpoint.pth"
    if checkpoint.exists() and not resolved.resume:
        log.info("%s exists: an earlier attempt of run %s stopped; continuing from it", checkpoint, run_id)
        extra += ["--resume", str(checkpoint)]
    return [*train_args, *extra, "--results-table", NO_TABLE], run_dir, run_id, resolved.results_table


if __name__ == "__main__":
    main()
