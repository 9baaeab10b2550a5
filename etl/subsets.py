"""Balanced subsets for limited compute: per-class image targets (e.g. 2,000 per disease and
10,000 No Finding), deterministic by seed, then divided by the (official) patient-level splits.

    python -m etl.subsets --source nih --data-root /data/nih --targets "2000,No Finding=10000"

prints the class counts per split of the subset (from the label table: no pixels needed) and,
with --output, writes the chosen image ids. The ETL takes the same --subset-targets.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cxr_pipeline.etl.sources import SOURCES, label_manifest
from cxr_pipeline.etl.sources.nih import NO_FINDING
from cxr_pipeline.etl.splits import DEFAULT_FRACTIONS, assign_splits, parse_fractions, patient_uniform


def class_membership(rows: pd.DataFrame, label_names: Sequence[str]) -> pd.DataFrame:
    """One boolean column per class: the positive labels, plus 'No Finding' (no label positive)
    when it is not a label already. CheXpert rows are judged on their raw values (1 = positive),
    whatever the uncertainty policy made of them."""
    values = rows["raw_labels"] if "raw_labels" in rows else rows["labels"]
    matrix = np.asarray(values.tolist(), dtype=np.float64).reshape(len(rows), len(label_names))
    membership = pd.DataFrame(matrix == 1.0, columns=list(label_names), index=rows.index)
    if NO_FINDING not in membership:
        membership[NO_FINDING] = ~membership.any(axis=1)
    return membership


def parse_targets(spec: str | Mapping, class_names: Sequence[str]) -> dict[str, int]:
    """'2000,No Finding=10000' -> 2,000 for every class and 10,000 for No Finding. A number
    without a name is the default for all classes; a mapping ({'default': 2000, ...}) works too."""
    if isinstance(spec, Mapping):
        items = [(str(key), value) for key, value in spec.items()]
    else:
        items = [tuple(part.split("=", 1)) if "=" in part else ("default", part)
                 for part in (piece.strip() for piece in str(spec).split(",")) if part]
    targets = {}
    for name, value in items:
        try:
            targets[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"subset target for {name.strip()!r} must be a whole number, got {value!r}") from None
    default = targets.pop("default", None)
    unknown = sorted(set(targets) - set(class_names))
    if unknown:
        raise ValueError(f"subset targets name unknown classes {unknown}; classes are {list(class_names)}")
    if min(targets.values(), default=default or 0) < 0 or (default is not None and default < 0):
        raise ValueError(f"subset targets must not be negative: {spec!r}")
    return {name: targets.get(name, default) for name in class_names if targets.get(name, default) is not None}


def balanced_subset(membership: pd.DataFrame, targets: Mapping[str, int], image_ids: pd.Series, seed: int) -> pd.Series:
    """Which rows to keep (boolean Series).

    Classes are walked from least to most frequent. Images already taken for a rarer class
    count towards a class's target (so co-occurring findings are not oversampled); when the
    class has no more untaken images than it still needs, all are taken, else that many are
    sampled. The sample is the images of lowest hash of (seed, image id): deterministic, and
    independent of the order of the table. Classes without a target are not sampled.
    """
    rank = patient_uniform(image_ids, seed)  # a per-id hash; image ids work as well as patient ids
    selected = pd.Series(False, index=membership.index)
    for name in membership.sum().sort_values(kind="stable").index:
        if name not in targets:
            continue
        need = targets[name] - int((selected & membership[name]).sum())
        candidates = membership[name] & ~selected
        if need <= 0:
            continue
        if candidates.sum() <= need:
            selected |= candidates
        else:
            selected[rank[candidates].sort_values(kind="stable").index[:need]] = True
    return selected


def subset_counts(membership: pd.DataFrame, selected: pd.Series, splits: pd.Series,
                  targets: Mapping[str, int]) -> pd.DataFrame:
    """Per class: images available, its target, images in the subset, and per split (an image
    with several findings counts for each)."""
    chosen = membership[selected]
    table = pd.DataFrame({
        "available": membership.sum(),
        "target": pd.Series(targets, dtype="Int64"),
        "selected": chosen.sum(),
    }).reindex(membership.columns)
    for split in ("train", "val", "test"):
        table[split] = chosen[splits[selected] == split].sum()
    return table


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--data-root", required=True, help="folder of the download (images may be absent)")
    parser.add_argument("--labels-csv", help="label table, if not found in --data-root")
    parser.add_argument("--targets", required=True,
                        help="images per class: 'N' for all, 'N,Class=M' to override some "
                             "(e.g. '2000,No Finding=10000')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of the split (default 0)")
    parser.add_argument("--split-fractions", default=",".join(map(str, DEFAULT_FRACTIONS)),
                        help="as etl/preprocess.py: train,val,test fractions, or train:val of the official train_val")
    parser.add_argument("--output", help="CSV to write: image_id, patient_id, split of the subset")
    args = parser.parse_args(argv)
    manifest = label_manifest(args.source, args.data_root, labels_csv=args.labels_csv)
    rows = manifest.rows
    membership = class_membership(rows, manifest.label_names)
    targets = parse_targets(args.targets, list(membership.columns))
    selected = balanced_subset(membership, targets, rows["image_id"], args.seed)
    official = rows["official_split"] if rows["official_split"].notna().any() else None
    splits = assign_splits(rows["patient_id"], args.seed, parse_fractions(args.split_fractions), official)
    counts = subset_counts(membership, selected, splits, targets)
    per_split = splits[selected].value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict()
    print(f"{manifest.dataset}: {len(rows)} labelled images; subset of {int(selected.sum())} images {per_split} "
          f"({'official test list' if official is not None else 'seeded patient split'}, seed {args.seed})")
    print(counts.to_string())
    if args.output:
        rows.loc[selected, ["image_id", "patient_id"]].assign(split=splits[selected]).to_csv(args.output, index=False)
    return counts


if __name__ == "__main__":
    main()
