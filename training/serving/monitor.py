"""The shift monitor of the nightly scoring (jobs/score.py --monitor-table): how one scoring run's images compare
with the validation split the model was calibrated on, one row per label per run, in a Delta table.

What the model knows of val travels with it: train.py stores `val_prevalence` (per label) and
`val_score_deciles` (per label, the 9 inner deciles of val's calibrated probabilities) in the best checkpoint,
and training/serving/mlflow_model.py puts them in the logged model's metadata (lists in label order). From a
run's calibrated probabilities (N, L), NaN rows for the images that could not be scored, each row holds:

- `n_images`, `n_unreadable`, `unreadable_share`: the images of this run, those that could not be scored;
- `mean_score`: the mean calibrated probability of the scored images;
- `prevalence_estimate`, `prevalence_low`, `prevalence_high`: the batch's prevalence estimated from its
  unlabelled scores, with its 95 % bootstrap interval (training/evaluation/prevalence.py: EM under prior shift),
  beside `val_prevalence`;
- `psi`: the population stability index of the batch's scores against val's: the 10 bins val's deciles make
  hold 10 % of val each; PSI = sum over bins of (batch share - val share) * ln(batch share / val share), shares
  floored at PSI_FLOOR (an empty bin would be log 0). A decile on a point mass of the scores (an isotonic
  calibration's flat steps give many images exactly one value: deciles tied with each other, or equal to a
  value batch scores take) does not say what share of val lies below it, so it is dropped and its two bins
  merged, the merged bin expecting 10 % per bin merged.
- `flags` (why, in words; empty when none), `flagged`, and `notes` (what was not judged, and why).

The rules (thresholds as constants here, flags of jobs/score.py):
- **prevalence**: flagged when the estimate is more than PREVALENCE_SHIFT (0.10, absolute) from val's AND
  val's prevalence lies outside the estimate's 95 % interval: a shift large enough to matter that sampling
  noise does not explain (a small batch's wide interval does not flag; a large batch's 0.02 move does not either);
- **psi**: flagged above PSI_LIMIT (0.2, the usual "significant shift"; 0.1-0.2 is "moderate");
- **unreadable**: flagged when more than UNREADABLE_LIMIT (5 %) of the run's images could not be scored (the
  same share on every label's row: it is the run's);
- below MIN_IMAGES (100) scored images the prevalence and PSI are reported but not judged (with 10 bins,
  PSI of a 50-image sample of val's own distribution exceeds 0.2 about two times in five, of a 100-image one
  about one in fifty), and for a model logged without val's statistics (a checkpoint from before them) only
  the unreadable share is judged.

The prevalence estimate assumes the images of each class look as they did on val (prior shift only); when they
do not (another scanner, other patients), the estimate is off with them, and the PSI is what shows it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from cxr_pipeline.training.evaluation import prevalence
from cxr_pipeline.training.evaluation.results import (quoted, read_with_spark, refuse_catalog_name, resolve_engine,
                                                      save_delta, spark_frame, spark_session, table_exists)

PREVALENCE_SHIFT = 0.10  # absolute: 0.74 -> 0.62 is a shift, 0.74 -> 0.66 is not
PSI_LIMIT = 0.2
UNREADABLE_LIMIT = 0.05
MIN_IMAGES = 100
PSI_FLOOR = 1e-4
DECILES = 9
INTERVAL_LEVEL = 0.95
RESAMPLES = 200

MONITOR_SCHEMA = pa.schema([
    ("scored_at", pa.timestamp("us", tz="UTC")),  # the run's time, as in its rows of the scores table
    ("model_uri", pa.string()),
    ("label", pa.string()),
    ("n_images", pa.int64()),
    ("n_unreadable", pa.int64()),
    ("unreadable_share", pa.float64()),
    ("mean_score", pa.float64()),
    ("prevalence_estimate", pa.float64()),
    ("prevalence_low", pa.float64()),
    ("prevalence_high", pa.float64()),
    ("val_prevalence", pa.float64()),
    ("psi", pa.float64()),
    ("flags", pa.string()),
    ("flagged", pa.bool_()),
    ("notes", pa.string()),
])


@dataclass(frozen=True)
class Thresholds:
    prevalence_shift: float = PREVALENCE_SHIFT
    psi: float = PSI_LIMIT
    unreadable_share: float = UNREADABLE_LIMIT
    min_images: int = MIN_IMAGES


@dataclass(frozen=True)
class Reference:
    """What the model knows of val, per label in label order: None where it does not know."""

    prevalence: tuple[float | None, ...]
    deciles: tuple[tuple[float, ...] | None, ...]

    @classmethod
    def from_metadata(cls, metadata: dict | None, label_names) -> "Reference":
        """From the logged model's metadata (training/serving/mlflow_model.py's log_model); a model logged before
        the statistics existed knows none."""
        metadata = metadata or {}
        prevalences = per_label(metadata.get("val_prevalence"), label_names)
        deciles = per_label(metadata.get("val_score_deciles"), label_names)
        return cls(tuple(None if p is None else float(p) for p in prevalences),
                   tuple(None if d is None else tuple(float(x) for x in d) for d in deciles))

    def knows_anything(self) -> bool:
        return any(p is not None for p in self.prevalence) or any(d is not None for d in self.deciles)


def per_label(values, label_names) -> list:
    """A per-label statistic as a checkpoint or a model's metadata holds it (a mapping label -> value, or a
    sequence in label order; None: not known) -> a list in label order, None where unknown."""
    names = list(label_names)
    if values is None:
        return [None] * len(names)
    if isinstance(values, dict):
        return [values.get(name) for name in names]
    values = list(values)
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for {len(names)} labels {names}")
    return values


# ---- the figures of one run -------------------------------------------------------------------------------
def psi(scores: np.ndarray, deciles: Sequence[float], floor: float = PSI_FLOOR) -> float:
    """Population stability index of `scores` (NaN left out) against the distribution whose inner deciles are
    `deciles`: bins (-inf, d1], (d1, d2], ..., (d9, inf), each expecting 10 %; deciles on a point mass (tied
    with another, or a value some score takes exactly) are dropped, merging their bins."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not len(scores) or deciles is None:
        return float("nan")
    deciles = np.asarray(deciles, dtype=np.float64)
    values, counts = np.unique(deciles, return_counts=True)
    on_mass = np.isin(deciles, values[counts > 1]) | np.isin(deciles, scores)
    edges = deciles[~on_mass]
    below = np.flatnonzero(~on_mass) + 1  # edge k has k tenths of val at or below it
    expected = np.diff(np.concatenate([[0], below, [len(deciles) + 1]])) / (len(deciles) + 1)
    actual = np.bincount(np.searchsorted(edges, scores, side="left"), minlength=len(edges) + 1) / len(scores)
    expected, actual = np.maximum(expected, floor), np.maximum(actual, floor)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def monitor_rows(probabilities: np.ndarray, label_names, reference: Reference, model_uri: str, scored_at: datetime,
                 thresholds: Thresholds = Thresholds(), seed: int = 0) -> pd.DataFrame:
    """The monitor's rows of one scoring run (MONITOR_SCHEMA's columns): (N, L) calibrated probabilities of
    its images, a row of NaN for each image that could not be scored."""
    names = list(label_names)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(probabilities), len(names))
    unreadable = np.isnan(probabilities).all(axis=1)
    n_images, n_unreadable = len(probabilities), int(unreadable.sum())
    scored = probabilities[~unreadable]
    share = n_unreadable / n_images if n_images else float("nan")
    estimates = prevalence.estimate(scored, list(reference.prevalence), names, n_resamples=RESAMPLES, seed=seed,
                                    level=INTERVAL_LEVEL)
    judged = len(scored) >= thresholds.min_images
    rows = []
    for index, (name, found) in enumerate(zip(names, estimates)):
        val, deciles = reference.prevalence[index], reference.deciles[index]
        column = scored[:, index]
        stability = psi(column, deciles)
        flags, notes = [], []
        if share > thresholds.unreadable_share:
            flags.append(f"unreadable {share:.1%} > {thresholds.unreadable_share:.0%} of {n_images} images")
        unknown = [what for what, known in (("prevalence", val), ("score deciles (PSI)", deciles)) if known is None]
        if unknown:
            notes.append(f"the model carries no val {' or '.join(unknown)} (logged from a checkpoint from before "
                         "them): not judged")
        if not judged:
            notes.append(f"{len(scored)} scored images < {thresholds.min_images}: prevalence and PSI reported, "
                         "not judged")
        else:
            moved = abs(found.estimate - val) if val is not None else float("nan")
            if moved > thresholds.prevalence_shift and not found.low <= val <= found.high:
                flags.append(f"prevalence {found.estimate:.3f} [{INTERVAL_LEVEL:.0%} CI {found.low:.3f}, "
                             f"{found.high:.3f}] vs val's {val:.3f}: moved {moved:.3f} > "
                             f"{thresholds.prevalence_shift:.2f}, val's outside the interval")
            if stability > thresholds.psi:
                flags.append(f"PSI {stability:.3f} > {thresholds.psi:.2f} against val's score deciles")
        rows.append({"scored_at": pd.Timestamp(scored_at), "model_uri": model_uri, "label": name,
                     "n_images": n_images, "n_unreadable": n_unreadable, "unreadable_share": share,
                     "mean_score": float(np.mean(column)) if len(column) else float("nan"),
                     "prevalence_estimate": found.estimate, "prevalence_low": found.low,
                     "prevalence_high": found.high, "val_prevalence": np.nan if val is None else val,
                     "psi": stability, "flags": "; ".join(flags), "flagged": bool(flags),
                     "notes": "; ".join(notes)})
    return pd.DataFrame(rows, columns=MONITOR_SCHEMA.names)


def describe(rows: pd.DataFrame) -> list[str]:
    """One line per label of a run: its figures, and FLAGGED with the reasons, or within bands."""
    lines = []
    for row in rows.itertuples():
        figures = (f"prevalence {row.prevalence_estimate:.3f} [{row.prevalence_low:.3f}, {row.prevalence_high:.3f}]"
                   f" (val's {row.val_prevalence:.3f}), mean score {row.mean_score:.3f}, PSI {row.psi:.3f}, "
                   f"unreadable {row.n_unreadable}/{row.n_images}")
        verdict = f"FLAGGED: {row.flags}" if row.flagged else "within bands"
        lines.append(f"{row.label}: {figures}: {verdict}" + (f" ({row.notes})" if row.notes else ""))
    return lines


# ---- the table ------------------------------------------------------------------------------------------------
def write_rows(table_uri: str, rows: pd.DataFrame, engine: str = "auto") -> str:
    """Append a run's rows to the monitor table (created on the first write), with the engines of the results
    table (training/evaluation/results.py). Returns the engine used."""
    table = pa.Table.from_pandas(rows[MONITOR_SCHEMA.names], schema=MONITOR_SCHEMA, preserve_index=False)
    engine = resolve_engine(engine, table_uri)
    if engine == "deltalake":
        from deltalake import write_deltalake

        refuse_catalog_name(table_uri, "--engine")
        write_deltalake(table_uri, table, mode="append", schema_mode="merge")
    else:
        spark = spark_session()
        frame = spark_frame(spark, table)
        save_delta(frame.write.format("delta").mode("append").option("mergeSchema", "true"), table_uri)
    return engine


def read_rows(table_uri: str, engine: str = "auto", model_uri: str | None = None) -> pd.DataFrame:
    """The monitor table's rows (of one model, when given), oldest run first; empty when there is no table."""
    if resolve_engine(engine, table_uri) == "deltalake":
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            rows = DeltaTable(table_uri).to_pandas()
        except TableNotFoundError:
            rows = pd.DataFrame(columns=MONITOR_SCHEMA.names)
        if model_uri is not None:
            rows = rows[rows["model_uri"] == model_uri]
    else:
        spark = spark_session()
        if not table_exists(spark, table_uri):
            return pd.DataFrame(columns=MONITOR_SCHEMA.names)
        frame = read_with_spark(spark, table_uri)
        if model_uri is not None:
            frame = frame.filter(f"model_uri = {quoted(model_uri)}")
        # Spark hands timestamps over in the session's time zone: as microseconds since the epoch they stay UTC
        rows = frame.selectExpr("*", "unix_micros(scored_at) AS scored_us").drop("scored_at").toPandas()
        rows.insert(0, "scored_at", pd.to_datetime(rows.pop("scored_us"), unit="us", utc=True))
    return rows.sort_values(["scored_at", "label"], kind="stable").reset_index(drop=True)


def last_runs(rows: pd.DataFrame, count: int) -> pd.DataFrame:
    """The rows of the last `count` runs (scoring times) in the table."""
    times = sorted(rows["scored_at"].unique())[-count:] if count else []
    return rows[rows["scored_at"].isin(times)]


# ---- the command's figure -------------------------------------------------------------------------------------
def plot_history(rows: pd.DataFrame, path: Path, psi_limit: float = PSI_LIMIT) -> Path:
    """Two panels over the runs: each label's estimated prevalence with its interval and val's prevalence as a
    line of the same colour; each label's PSI with the limit. Flagged runs are ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 2))
    colours = plt.cm.tab10.colors if rows["label"].nunique() <= 10 else plt.cm.tab20.colors
    for index, (label, runs) in enumerate(rows.groupby("label", sort=False)):
        colour = colours[index % len(colours)]
        when = pd.to_datetime(runs["scored_at"]).dt.tz_convert(None)
        estimate = runs["prevalence_estimate"].to_numpy(float)
        spread = np.vstack([estimate - runs["prevalence_low"].to_numpy(float),
                            runs["prevalence_high"].to_numpy(float) - estimate])
        top.errorbar(when, estimate, yerr=spread, color=colour, marker="o", capsize=3, label=label)
        top.plot(when, runs["val_prevalence"].to_numpy(float), color=colour, linestyle="--", linewidth=1)
        bottom.plot(when, runs["psi"].to_numpy(float), color=colour, marker="o", label=label)
        flagged = runs["flagged"].to_numpy(bool)
        for axes, values in ((top, estimate), (bottom, runs["psi"].to_numpy(float))):
            axes.scatter(when[flagged], values[flagged], s=160, facecolors="none", edgecolors="red", zorder=3)
    bottom.axhline(psi_limit, color="grey", linestyle=":", linewidth=1)
    top.set(ylabel="prevalence", ylim=(0, 1), title="estimated prevalence [95% CI] per run; dashed: val's "
                                                     "(red rings: flagged)")
    bottom.set(ylabel="PSI vs val's scores", xlabel="scoring run (UTC)", title=f"PSI (dotted: {psi_limit})")
    top.legend(fontsize=7, ncol=3)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
