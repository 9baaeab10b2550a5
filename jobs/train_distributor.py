"""Run training/train.py on a Spark cluster with TorchDistributor.

Databricks deprecated HorovodRunner after Runtime 15.4 LTS ML and recommends
`pyspark.ml.torch.distributor.TorchDistributor`: it starts `torchrun` on the cluster's
workers (or on the driver with --local-mode), so train.py runs with its torch.distributed
backend, exactly as under a local `torchrun`.

    python jobs/train_distributor.py --num-processes 8 --use-gpu --results-table main.cxr.auroc_results \
        -- --config conf/nih.yaml --dataset /Volumes/...

With a Unity Catalog table name as --results-table, train.py writes its AUROC rows to a Delta
folder of the run (RUN_DIR/results_delta: rank 0 may run on any node, and training never
needs Spark), and this driver appends them to the table with its own Spark session. A path
is passed to train.py unchanged.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cxr_pipeline.etl.sessions import session_builder
from cxr_pipeline.training.results import is_table_name, publish, read_results

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train.py"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2, help="training processes (GPUs with --use-gpu)")
    parser.add_argument("--local-mode", action="store_true", help="run the processes on the driver node")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per process (NCCL)")
    parser.add_argument("--results-table",
                        help="Unity Catalog table (catalog.schema.table) the driver appends the run's AUROC rows "
                             "to, or a Delta folder path for train.py (default: train.py's own --results-table)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for training/train.py, after --")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    staging = None
    if args.results_table and is_table_name(args.results_table):
        train_args, staging, run_id = with_run_folder_table(train_args)
    elif args.results_table:
        train_args = [*train_args, "--results-table", args.results_table]

    from pyspark.ml.torch.distributor import TorchDistributor

    spark = session_builder("cxr-train").getOrCreate()
    distributor = TorchDistributor(num_processes=args.num_processes, local_mode=args.local_mode,
                                   use_gpu=args.use_gpu)
    distributor.run(str(TRAIN_SCRIPT), *train_args)
    if staging is not None:
        rows = read_results(staging)
        rows = rows[rows["run_id"] == run_id]
        publish(spark, rows, args.results_table)
        print(f"appended {len(rows)} AUROC rows of run {run_id} to {args.results_table}")


def with_run_folder_table(train_args: list[str]) -> tuple[list[str], str, str]:
    """train.py arguments that write the results into RUN_DIR/results_delta, that folder, and
    the run id (set here when the arguments name none, so the folder is known in advance)."""
    from cxr_pipeline.config import parse_args
    from cxr_pipeline.training.train import build_parser, new_run_id

    resolved = parse_args(build_parser(), "train", train_args)
    run_id = resolved.run_id or new_run_id()
    staging = str(Path(resolved.output_dir) / run_id / "results_delta")
    extra = [] if resolved.run_id else ["--run-id", run_id]
    return [*train_args, *extra, "--results-table", staging], staging, run_id


if __name__ == "__main__":
    main()
