"""Show the nightly scoring's shift monitor (jobs/score.py --monitor-table): the last runs per label, flagged ones
marked, and a figure of the estimated prevalence and PSI over the runs.

    python -m training.monitor --table outputs/monitor_delta                         # the last 14 runs
    python -m training.monitor --table main.cxr.score_monitor --last 30 --plot shift.png   # through Spark
    python -m training.monitor --table outputs/monitor_delta --model-uri models:/cxr-nih/3 --label Pneumonia

Per label, one line per run: when it scored, how many images (unreadable among them), the mean score, the
estimated prevalence with its 95 % interval beside val's, the PSI against val's scores, and `!!` on a flagged
run, whose reasons follow the table (training/serving/monitor.py states the rules).
"""
from __future__ import annotations

import argparse

import pandas as pd

from cxr_pipeline.training.evaluation.results import add_engine_argument
from cxr_pipeline.training.serving import monitor


def runs_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One label's rows as printed: one line per run."""
    return pd.DataFrame({
        "scored_at (UTC)": pd.to_datetime(rows["scored_at"]).dt.strftime("%Y-%m-%d %H:%M"),
        "images": rows["n_images"].astype(int),
        "unreadable": rows["unreadable_share"].map("{:.1%}".format),
        "mean_score": rows["mean_score"],
        "prevalence": rows["prevalence_estimate"],
        "95% CI": [f"[{low:.3f}, {high:.3f}]" for low, high in zip(rows["prevalence_low"], rows["prevalence_high"])],
        "val": rows["val_prevalence"],
        "psi": rows["psi"],
        "flagged": rows["flagged"].map({True: "!!", False: ""}),
    })


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="the monitor's Delta table (jobs/score.py --monitor-table): "
                                                       "a folder or catalog.schema.table")
    add_engine_argument(parser, "--engine")
    parser.add_argument("--last", type=int, default=14, help="how many of the latest runs to show (14)")
    parser.add_argument("--model-uri", help="only this model's runs (default: every model's)")
    parser.add_argument("--label", action="append", help="only this label (repeat for more; default: all)")
    parser.add_argument("--plot", help="also draw the runs to this PNG file")
    args = parser.parse_args(argv)

    rows = monitor.read_rows(args.table, args.engine, args.model_uri)
    if args.label:
        unknown = sorted(set(args.label) - set(rows["label"]))
        if unknown:
            raise SystemExit(f"no rows of label(s) {unknown} in {args.table}; its labels: "
                             f"{sorted(set(rows['label']))}")
        rows = rows[rows["label"].isin(args.label)]
    rows = monitor.last_runs(rows, args.last)
    if rows.empty:
        raise SystemExit(f"no monitor rows in {args.table}" + (f" for {args.model_uri}" if args.model_uri else "")
                         + ": jobs/score.py --monitor-table writes them")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 250,
                           "display.max_colwidth", 200):
        for (model_uri, label), runs in rows.groupby(["model_uri", "label"], sort=False):
            flagged = int(runs["flagged"].sum())
            print(f"\n{label} ({model_uri}): {len(runs)} run(s), {flagged} flagged")
            table = runs_table(runs)
            print(table.to_string(index=False, na_rep="-"))
            for when, flags in zip(table.loc[runs["flagged"].to_numpy(bool), "scored_at (UTC)"],
                                   runs.loc[runs["flagged"], "flags"]):
                print(f"  !! {when}: {flags}")
    notes = rows.loc[rows["notes"].fillna("") != "", ["label", "notes"]].drop_duplicates()
    for note in notes.itertuples():
        print(f"note, {note.label}: {note.notes}")
    if args.plot:
        print(f"plot: {monitor.plot_history(rows, args.plot)}")
    return rows


if __name__ == "__main__":
    main()
