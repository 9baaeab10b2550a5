"""One self-contained HTML page per run: its per-label results with confidence intervals and
operating-point metrics, its figures, and a comparison with every other run in the Delta table.

train.py writes RUN_DIR/report.html at the end of a run; rebuild one (e.g. after more runs were
added to the table) with:

    python -m training.report --table outputs/results_delta [--run-id RUN] [--output report.html]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cxr_pipeline.training.evaluation.results import latest_run, read_results
from cxr_pipeline.training.evaluation.run_report import write_report


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True,
                        help="the Delta results table (train.py --results-table): a folder or catalog.schema.table")
    parser.add_argument("--run-id", help="run to report (default: the run written last)")
    parser.add_argument("--output", help="HTML file to write (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    results = read_results(args.table)
    run = latest_run(results, args.run_id)
    if run.empty:
        raise SystemExit(f"no rows of run {args.run_id!r} in {args.table}" if args.run_id else f"{args.table} is empty")
    output = Path(args.output) if args.output else Path(run["run_dir"].iloc[0]) / "report.html"
    path = write_report(results, output, run["run_id"].iloc[0])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
