"""Data exploration report of a source's label table (no pixels needed): PNG plots + index.html.

    python -m etl.explore --source nih --data-root /data/nih --output reports/nih

Positives per label and split (the patient-level split the ETL would make with the same
--seed and --split-fractions), label co-occurrence, age with and without findings, and the
label mix by sex and by view position. 'No Finding' (no label positive) is shown as a
class. CheXpert is counted on its raw values (1 = positive) whatever the uncertainty policy.
"""
from __future__ import annotations

import argparse
import html
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_pipeline.etl.sources import SOURCES, label_manifest
from cxr_pipeline.etl.sources.nih import NO_FINDING
from cxr_pipeline.etl.splits import DEFAULT_FRACTIONS, assign_splits, parse_fractions
from cxr_pipeline.etl.subsets import class_membership

SPLIT_ORDER = ("train", "val", "test")
SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}
MIN_GROUP_SHARE = 0.01  # view positions rarer than this are pooled as 'other'


# ---- tables (pure pandas) --------------------------------------------------------------------
def counts_by_split(membership: pd.DataFrame, splits: pd.Series) -> pd.DataFrame:
    """Images per class and split, the total, and the prevalence in % of all images."""
    table = pd.DataFrame({split: membership[splits == split].sum() for split in SPLIT_ORDER})
    table["total"] = membership.sum()
    table["prevalence_%"] = (100.0 * table["total"] / max(len(membership), 1)).round(2)
    return table


def cooccurrence(membership: pd.DataFrame) -> pd.DataFrame:
    """Images with both classes; the diagonal is each class's count."""
    matrix = membership.to_numpy(dtype=np.int64)
    return pd.DataFrame(matrix.T @ matrix, index=membership.columns, columns=membership.columns)


def prevalence_by(membership: pd.DataFrame, groups: pd.Series, min_share: float = MIN_GROUP_SHARE) -> pd.DataFrame:
    """% of each group's images in each class (columns: groups with their image count). Groups
    under `min_share` of the rows are pooled as 'other'; missing values are 'unknown'."""
    groups = groups.fillna("unknown").astype(str)
    share = groups.value_counts(normalize=True)
    groups = groups.where(groups.map(share) >= min_share, "other")
    sizes = groups.value_counts()
    table = pd.DataFrame({f"{name} (n={sizes[name]:,})": 100.0 * membership[groups == name].mean()
                          for name in sizes.index})
    return table


def uncertain_by_split(raw: np.ndarray, label_names, splits: pd.Series) -> pd.DataFrame:
    """CheXpert: uncertain (-1) entries per label and split."""
    uncertain = pd.DataFrame(raw == -1.0, columns=list(label_names), index=splits.index)
    return pd.DataFrame({split: uncertain[splits == split].sum() for split in SPLIT_ORDER})


# ---- plots -----------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_counts_by_split(counts: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    order = counts.sort_values("total").index
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(order) + 1.8))
    height = 0.8 / len(SPLIT_ORDER)
    positions = np.arange(len(order))
    for i, split in enumerate(SPLIT_ORDER):
        values = counts.loc[order, split]
        bars = ax.barh(positions + (i - 1) * height, values, height, label=split, color=SPLIT_COLOURS[split])
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=7, padding=2)
    ax.set_yticks(positions, order)
    ax.set_xscale("log")
    ax.set_xlabel("images with the finding (log scale)")
    ax.set_title("Positive images per label and split")
    ax.legend(loc="lower right")
    ax.margins(x=0.12)
    save(fig, path)


def plot_cooccurrence(matrix: pd.DataFrame, path: Path) -> None:
    from matplotlib.colors import LogNorm

    plt = pyplot()
    size = len(matrix)
    fig, ax = plt.subplots(figsize=(0.62 * size + 3, 0.55 * size + 2))
    values = matrix.to_numpy(dtype=float)
    image = ax.imshow(np.where(values > 0, values, np.nan), cmap="viridis",
                      norm=LogNorm(vmin=1, vmax=max(values.max(), 2)))
    threshold = np.sqrt(max(values.max(), 2))  # log-scale midpoint: dark text on bright cells
    for row in range(size):
        for column in range(size):
            value = int(values[row, column])
            ax.text(column, row, f"{value:,}", ha="center", va="center", fontsize=7,
                    color="black" if value >= threshold else "white", fontweight="bold" if row == column else None)
    ax.set_xticks(range(size), matrix.columns, rotation=60, ha="right")
    ax.set_yticks(range(size), matrix.index)
    ax.set_title("Label co-occurrence (images with both; diagonal: images with the label)")
    fig.colorbar(image, ax=ax, label="images (log scale)", shrink=0.8)
    save(fig, path)


def plot_age(ages: pd.Series, has_finding: pd.Series, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    bins = np.arange(0, 105, 5)
    for flag, name, colour in ((False, "no finding", "#4C72B0"), (True, "at least one finding", "#C44E52")):
        values = ages[(has_finding == flag) & ages.notna()].astype(float)
        if len(values):
            ax.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=colour)
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.8, color=colour,
                    label=f"{name}: n={len(values):,}, median {values.median():.0f} y")
    ax.set_xlabel("age (years, 5-year bins)")
    ax.set_ylabel("share of images per year")
    ax.set_title(f"Age distribution with and without findings ({int(ages.isna().sum()):,} images without an age)")
    ax.legend()
    save(fig, path)


def plot_prevalence_by(table: pd.DataFrame, title: str, path: Path) -> None:
    plt = pyplot()
    order = table.mean(axis=1).sort_values().index
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(order) + 1.8))
    height = 0.8 / len(table.columns)
    positions = np.arange(len(order))
    colours = plt.get_cmap("tab10").colors
    for i, column in enumerate(table.columns):
        offset = (i - (len(table.columns) - 1) / 2) * height
        bars = ax.barh(positions + offset, table.loc[order, column], height, label=column,
                       color=colours[i % len(colours)])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_yticks(positions, order)
    ax.set_xlabel("% of the group's images with the label")
    ax.margins(x=0.08)
    ax.set_title(title)
    ax.legend(loc="lower right")
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


# ---- report ----------------------------------------------------------------------------------
def write_report(manifest, splits: pd.Series, output: str | Path, title: str) -> dict[str, Path]:
    """Write the PNGs and index.html into `output`; returns name -> path of what was written."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = manifest.rows
    membership = class_membership(rows, manifest.label_names)
    disease = membership.drop(columns=[NO_FINDING])
    counts = counts_by_split(membership, splits)
    paths = {name: output / f"{name}.png" for name in
             ("positives_by_split", "cooccurrence", "age", "label_mix_by_sex", "label_mix_by_view")}
    plot_counts_by_split(counts, paths["positives_by_split"])
    plot_cooccurrence(cooccurrence(disease), paths["cooccurrence"])
    plot_age(rows["age"], disease.any(axis=1), paths["age"])
    by_sex = prevalence_by(membership, rows["sex"])
    by_view = prevalence_by(membership, rows["view_position"])
    plot_prevalence_by(by_sex, "Label mix by sex", paths["label_mix_by_sex"])
    plot_prevalence_by(by_view, "Label mix by view position", paths["label_mix_by_view"])

    present = int(rows["source_path"].notna().sum())
    facts = {
        "label rows": f"{len(rows):,}",
        "patients": f"{rows['patient_id'].nunique():,}",
        "images per split": ", ".join(f"{s} {int((splits == s).sum()):,}" for s in SPLIT_ORDER),
        "patients per split": ", ".join(f"{s} {rows.loc[splits == s, 'patient_id'].nunique():,}" for s in SPLIT_ORDER),
        "image files present": f"{present:,} of {len(rows):,} (the report needs none)",
        "rows rejected": ", ".join(f"{reason} {n:,}" for reason, n in manifest.rejects["reason"].value_counts().items())
                         or "none",
    }
    tables = [("Positive images per label and split", counts)]
    if "raw_labels" in rows:
        raw = np.asarray(rows["raw_labels"].tolist(), dtype=np.float64)
        tables.append(("Uncertain (-1) entries per label and split",
                       uncertain_by_split(raw, manifest.label_names, splits)))
    tables += [("Label mix by sex (% of the group's images)", by_sex.round(2)),
               ("Label mix by view position (% of the group's images)", by_view.round(2))]
    figures = [
        ("Positives per label and split", "positives_by_split"), ("Label co-occurrence", "cooccurrence"),
        ("Age with and without findings", "age"), ("Label mix by sex", "label_mix_by_sex"),
        ("Label mix by view position", "label_mix_by_view"),
    ]
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;"
        "font-size:13px;margin-bottom:1.5em} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        " th{background:#f3f3f3} img{max-width:100%;border:1px solid #ddd;margin-bottom:1.5em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items())
        + "</table>",
    ]
    page += [f"<h2>{html.escape(caption)}</h2>{table.to_html()}" for caption, table in tables]
    page += [f"<h2>{html.escape(caption)}</h2><img src='{name}.png' alt='{html.escape(caption)}'>"
             for caption, name in figures]
    page.append("</body></html>")
    paths["index"] = output / "index.html"
    paths["index"].write_text("\n".join(page))
    return paths


def main(argv=None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--data-root", required=True, help="folder of the download (images may be absent)")
    parser.add_argument("--labels-csv", help="label table, if not found in --data-root")
    parser.add_argument("--output", required=True, help="folder for the PNGs and index.html")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split, as the ETL's (default 0)")
    parser.add_argument("--split-fractions", default=",".join(map(str, DEFAULT_FRACTIONS)),
                        help="as etl/preprocess.py: train,val,test fractions, or train:val of the official train_val")
    args = parser.parse_args(argv)
    manifest = label_manifest(args.source, args.data_root, labels_csv=args.labels_csv)
    rows = manifest.rows
    official = rows["official_split"] if rows["official_split"].notna().any() else None
    splits = assign_splits(rows["patient_id"], args.seed, parse_fractions(args.split_fractions), official)
    paths = write_report(manifest, splits, args.output, f"{manifest.dataset}: label table exploration")
    print(f"wrote {paths['index']} and {len(paths) - 1} plots")
    return paths


if __name__ == "__main__":
    main()
