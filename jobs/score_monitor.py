"""jobs/score.py's shift monitor step (--monitor-table), on the driver: its options, the val statistics the
logged model carries, this run's monitor rows appended to the table (training/serving/monitor.py: the rules),
and the verdict: logged per label, and a non-zero exit when one is flagged unless --monitor-warn-only."""
from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.serving import monitor
from cxr_pipeline.training.serving.predictions import label_columns

log = logging.getLogger("score")
THIS_RUN = "this run"  # what the shift monitor judges: this run's rows, or (nothing scored) the last run's


def add_arguments(parser) -> None:
    watch = parser.add_argument_group("shift monitor (training/serving/monitor.py: its rules in words)")
    watch.add_argument("--monitor-table",
                       help="Delta table (a folder or catalog.schema.table; --engine chooses as for --table) that "
                            "gets one row per label per run comparing this run's images with the model's val split; "
                            "default: none, no monitor. A flagged label makes the job exit non-zero")
    watch.add_argument("--monitor-warn-only", action="store_true",
                       help="flagged labels are logged as warnings and the job succeeds")
    watch.add_argument("--monitor-prevalence-shift", type=float, default=monitor.PREVALENCE_SHIFT,
                       help="flag a label whose estimated prevalence moved more than this from val's (absolute) "
                            "with val's outside the estimate's 95%% interval (%(default)s)")
    watch.add_argument("--monitor-psi", type=float, default=monitor.PSI_LIMIT,
                       help="flag a label whose scores' PSI against val's score deciles exceeds this (%(default)s)")
    watch.add_argument("--monitor-unreadable", type=float, default=monitor.UNREADABLE_LIMIT,
                       help="flag the run when more than this share of its images could not be scored "
                            "(%(default)s)")
    watch.add_argument("--monitor-min-images", type=int, default=monitor.MIN_IMAGES,
                       help="below this many scored images, prevalence and PSI are reported, not judged "
                            "(%(default)s)")


def val_reference(folder: Path, spec: DatasetSpec) -> monitor.Reference:
    """What the model's metadata says of its val split (prevalence, score deciles), for the shift monitor."""
    from mlflow.models import Model

    return monitor.Reference.from_metadata(Model.load(str(folder / "MLmodel")).metadata, spec.label_names)


def watch_run(args, reference: monitor.Reference, spec: DatasetSpec, model_uri: str, scored_at: datetime,
              scores: pd.DataFrame) -> pd.DataFrame:
    """The monitor rows of this run's rows (`scores`: the label columns as the table names them, empty where an
    image could not be scored), appended to --monitor-table."""
    if not reference.knows_anything():
        log.warning("shift monitor: %s carries no val prevalence or score deciles (logged from a checkpoint "
                    "from before them): only the share of unreadable images is judged", model_uri)
    probabilities = scores[label_columns(spec.label_names, table=True)].to_numpy(np.float64, na_value=np.nan)
    thresholds = monitor.Thresholds(args.monitor_prevalence_shift, args.monitor_psi, args.monitor_unreadable,
                                    args.monitor_min_images)
    rows = monitor.monitor_rows(probabilities, spec.label_names, reference, model_uri, scored_at, thresholds)
    monitor.write_rows(args.monitor_table, rows, args.monitor_engine)
    log.info("shift monitor: the %d images of this run against %s's val split, %d row(s) added to %s", len(scores),
             model_uri, len(rows), args.monitor_table)
    return rows


def judge(args, rows: pd.DataFrame, which: str) -> list[str]:
    """Log each label's verdict; exit non-zero when one is flagged, unless --monitor-warn-only. Returns the
    flagged labels."""
    for line, flagged in zip(monitor.describe(rows), rows["flagged"]):
        (log.warning if flagged else log.info)("shift monitor: %s", line)
    flagged = rows[rows["flagged"]]
    if flagged.empty:
        return []
    message = (f"shift monitor: {len(flagged)} label(s) flagged in {which} of {rows['model_uri'].iloc[0]}: "
               + "; ".join(f"{row.label} ({row.flags})" for row in flagged.itertuples())
               + (". The scores are written" if which == THIS_RUN else "")
               + f". The monitor's rows are in {args.monitor_table} (python -m "
               f"training.monitor --table {args.monitor_table} --plot shift.png shows the runs). If the shift is "
               "expected (another site, a season), retrain or recalibrate on such images, or run with "
               "--monitor-warn-only to be warned without failing")
    if not args.monitor_warn_only:
        raise SystemExit(message)
    log.warning("%s (--monitor-warn-only: the job succeeds)", message)
    return flagged["label"].tolist()


def judge_last_run(args, model_uri: str) -> list[str]:
    """With nothing new scored (a retry of a flagged night, or a night without images), the verdict of the last
    run the monitor holds for this model: a retry must not turn a flagged night into a success."""
    last = monitor.last_runs(monitor.read_rows(args.monitor_table, args.monitor_engine, model_uri), 1)
    if last.empty:
        return []
    when = pd.Timestamp(last["scored_at"].iloc[0])
    log.info("shift monitor: nothing new scored; the last run of %s in %s, at %s UTC:", model_uri,
             args.monitor_table, f"{when:%Y-%m-%d %H:%M:%S}")
    return judge(args, last, f"the last run (scored at {when:%Y-%m-%d %H:%M:%S} UTC, nothing scored since)")
