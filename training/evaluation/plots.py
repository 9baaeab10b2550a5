"""PNG figures of a run: ROC curves per label and training curves per epoch."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from cxr_pipeline.training.evaluation.metrics import known  # noqa: E402


def roc_curves(labels: np.ndarray, scores: np.ndarray, report: list[dict], path: Path, title: str) -> None:
    """One curve per label that has positives and negatives; the legend gives AUROC [95% CI]."""
    figure, axes = plt.subplots(figsize=(7, 6.5))
    axes.set_prop_cycle(color=plt.cm.tab20.colors)  # 14-15 labels: tab10 would repeat colours
    for index, row in enumerate(report[: labels.shape[1]]):
        if row["auroc"] is None:
            continue
        rows_known = known(labels[:, index])
        false_positive, true_positive, _ = roc_curve(labels[rows_known, index], scores[rows_known, index])
        interval = (f" [{row['auroc_ci_low']:.2f}, {row['auroc_ci_high']:.2f}]"
                    if row.get("auroc_ci_low") is not None else "")
        axes.plot(false_positive, true_positive, linewidth=1.2,
                  label=f"{row['label']} {row['auroc']:.3f}{interval} (n+={row['n_pos']})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.legend(fontsize=7, loc="lower right", title="AUROC [95% CI]", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def training_curves(summary_csv: Path, path: Path) -> None:
    """Train and validation loss, and validation mean AUROC, per epoch, stages one after another
    (a val loss that turns up while the train loss falls is over-fitting)."""
    with summary_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    steps = np.arange(1, len(rows) + 1)
    figure, (loss_axes, auroc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(steps, [float(r["train_loss"]) for r in rows], marker="o", label="train")
    loss_axes.plot(steps, [float(r["val_loss"]) if r.get("val_loss") else np.nan for r in rows], marker="o",
                   label="val")
    loss_axes.legend(fontsize=8)
    auroc_axes.plot(steps, [float(r["val_mean_auroc"]) if r["val_mean_auroc"] else np.nan for r in rows], marker="o")
    for axes, name in ((loss_axes, "loss"), (auroc_axes, "validation mean AUROC")):
        axes.set(xlabel="epoch", ylabel=name, title=name)
        axes.set_xticks(steps, [f"{r['stage']} {r['epoch']}" for r in rows], rotation=45, fontsize=7)
        for boundary in np.flatnonzero([a["stage"] != b["stage"] for a, b in zip(rows, rows[1:])]):
            axes.axvline(boundary + 1.5, color="grey", linestyle=":")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bins_text(counts: np.ndarray) -> str:
    """'10 bins of ~100 images', '1 bin of 21 images': what a reliability diagram's points stand for."""
    approximately = "" if counts.min() == counts.max() else "~"
    return (f"{len(counts)} bin{'s' if len(counts) > 1 else ''} of {approximately}{int(np.median(counts))} "
            f"image{'s' if np.median(counts) != 1 else ''}")


def reliability_diagram(labels: np.ndarray, series: dict[str, np.ndarray], label_names, path: Path, title: str) -> None:
    """Observed positive rate against mean predicted probability, one panel per series (e.g. before and
    after calibration), one line per label; the diagonal is perfect. Bins hold equal counts of images
    (calibration.reliability: up to 10, at least 20 images each), so no point stands for a handful of
    images; the legend gives each label's bins and images per bin, and its ECE (15 equal-width bins)."""
    from cxr_pipeline.training.evaluation.calibration import expected_calibration_error, reliability

    figure, panels = plt.subplots(1, len(series), figsize=(5.5 * len(series), 5), squeeze=False)
    for axes, (name, scores) in zip(panels[0], series.items()):
        axes.set_prop_cycle(color=plt.cm.tab20.colors)
        for index, label in enumerate(label_names):
            rows_known = known(labels[:, index])
            if not rows_known.any():
                continue
            truth, probabilities = labels[rows_known, index], scores[rows_known, index]
            mean, observed, counts = reliability(truth, probabilities)
            axes.plot(mean, observed, marker="o", markersize=3, linewidth=1.2,
                      label=f"{label} (ECE {expected_calibration_error(truth, probabilities):.3f}; "
                            f"{bins_text(counts)})")
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel="mean predicted probability (equal-count bins)", ylabel="observed positive rate",
                 xlim=(0, 1), ylim=(0, 1), title=name)
        axes.legend(fontsize=7, loc="upper left")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
