"""Patient-level train/val/test assignment. Pure pandas.

A patient's split is a function of (seed, patient_id) only, so it never changes when
new patients are added to a nightly run, and every image of a patient lands in one split.
"""
from __future__ import annotations

import hashlib

import pandas as pd

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


class SplitLeakError(ValueError):
    """Some patient has images in more than one split."""


def patient_uniform(patient_ids: pd.Series, seed: int | str) -> pd.Series:
    """A stable pseudo-random number in [0, 1) per patient id."""
    unique = patient_ids.drop_duplicates()
    values = {
        pid: int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big") / 2**64
        for pid in unique
    }
    return patient_ids.map(values)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.7,0.1,0.2' -> (0.7, 0.1, 0.2); they must be non-negative and sum to 1."""
    parts = tuple(float(x) for x in text.split(","))
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {text!r}")
    return parts


def assign_splits(
    patient_ids: pd.Series,
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    official: pd.Series | None = None,
) -> pd.Series:
    """Split name per row.

    Without `official`, patients go to train/val/test by `fractions`. With `official`
    (values "train_val" or "test" per row, as NIH's lists and the pneumonia folders give),
    "test" rows stay test and "train_val" patients are divided into train/val in the ratio
    fractions[0]:fractions[1].
    """
    u = patient_uniform(patient_ids, seed)
    train, val, _ = fractions
    if official is None:
        split = pd.Series("test", index=patient_ids.index)
        split[u < train + val] = "val"
        split[u < train] = "train"
        return split
    unknown = set(official.unique()) - {"train_val", "test"}
    if unknown:
        raise ValueError(f"official split values must be 'train_val' or 'test', got {sorted(unknown)}")
    split = pd.Series("test", index=patient_ids.index)
    is_train_val = official == "train_val"
    split[is_train_val] = "val"
    split[is_train_val & (u < train / (train + val))] = "train"
    return split


def check_patient_disjoint(patient_ids: pd.Series, splits: pd.Series) -> None:
    """Raise SplitLeakError naming up to five patients that appear in more than one split."""
    per_patient = pd.DataFrame({"patient_id": patient_ids, "split": splits}).groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise SplitLeakError(
            f"{len(leaked)} patients have images in more than one split, e.g. {list(leaked.index[:5])}; "
            "the official lists disagree with each other or the data is mislabelled"
        )


def assign_folds(patient_ids: pd.Series, seed: int, folds: int) -> pd.Series:
    """Fold 0..folds-1 per row, by patient: a stable hash of its own (not the split's), so
    adding patients moves nobody and every image of a patient is in one fold."""
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    u = patient_uniform(patient_ids, f"folds:{seed}")
    return (u * folds).astype(int).clip(upper=folds - 1)


def fold_split(splits: pd.Series, folds: pd.Series, fold: int) -> pd.Series:
    """The train/val division of fold `fold`: train_val rows (train or val in `splits`) whose
    fold is `fold` are val, the others train; test rows stay test."""
    in_train_val = splits.isin(["train", "val"])
    return splits.where(~in_train_val, (folds == fold).map({True: "val", False: "train"}))
