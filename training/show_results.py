"""Print a run's per-label AUROC table from the Delta results table, whichever engine wrote it.

    python -m training.show_results --table outputs/results_delta            # latest run
    python -m training.show_results --table outputs/results_delta --run-id R --history
    python -m training.show_results --table main.cxr.auroc_results         # a catalog table, through Spark
"""
from __future__ import annotations

import argparse

import pandas as pd

from cxr_pipeline.training.evaluation.results import (add_engine_argument, auroc_table, dataset_version, latest_run,
                                                      read_results, table_history)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="outputs/results_delta",
                        help="Delta table: a folder (default outputs/results_delta) or catalog.schema.table")
    add_engine_argument(parser, "--engine")
    parser.add_argument("--run-id", help="run to show (default: the latest)")
    parser.add_argument("--history", action="store_true", help="also list the table's versions (one per write)")
    args = parser.parse_args(argv)

    run = latest_run(read_results(args.table, args.engine), args.run_id)
    if run.empty:
        raise SystemExit(f"no rows{' for run ' + args.run_id if args.run_id else ''} in {args.table}")
    first = run.iloc[0]
    print(f"run {first.run_id}: {first.model} on {first.dataset} at {first.image_size}px, "
          f"{first.world_size} {first.backend} rank(s), created {first.created_at:%Y-%m-%d %H:%M:%S} UTC")
    print(f"dataset read: ETL output {dataset_version(first)}")
    counts = run[run["stage"] == run["stage"].iloc[0]].pivot_table(index="label", columns="split",
                                                                  values="n_pos", aggfunc="first")
    table = auroc_table(run)
    table.columns = [f"{stage}/{split}" for stage, split in table.columns]
    table = table.join(counts.add_prefix("n_pos/"))
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 160):
        print(table.to_string(na_rep="-"))
    if args.history:
        for version, operation, written in table_history(args.table, args.engine):
            print(f"version {version}: {operation} at {written:%Y-%m-%d %H:%M:%S} UTC")


if __name__ == "__main__":
    main()
