"""The manifest every source produces: one row per image to decode, one per row rejected."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

MANIFEST_COLUMNS = [
    "image_id", "patient_id", "source_path", "source_row", "labels", "age", "sex", "view_position", "official_split",
]
REJECT_COLUMNS = ["image_id", "source_path", "source_row", "reason", "detail"]
WARNING_COLUMNS = ["image_id", "source_row", "field", "value"]


@dataclass
class Manifest:
    """`rows` are ready to decode (source_path relative to the data root); `rejects` never
    reach the decoder, each with a reason code and a human-readable detail (source_row is
    null for an image file that no label row lists). `warnings` name values of kept rows
    that were unreadable and stored as null (a malformed age, say)."""

    dataset: str
    label_names: tuple[str, ...]
    rows: pd.DataFrame
    rejects: pd.DataFrame
    warnings: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=WARNING_COLUMNS))

    @property
    def rows_read(self) -> int:
        """Label rows plus image files without one: every input the job must account for."""
        return len(self.rows) + len(self.rejects)


def reject_reasons(index: pd.Index, checks: list) -> tuple[pd.Series, pd.Series]:
    """(reason, detail) per row, None where a row passes: `checks` are (bad rows mask or None to skip,
    reason code, detail as a string or a per-row Series). Later checks win, so list them from the most
    specific to the most basic: the most basic reason is the one reported."""
    reasons = pd.Series(None, index=index, dtype=object)
    details = pd.Series(None, index=index, dtype=object)
    for bad, reason, detail in checks:
        if bad is not None:
            reasons[bad] = reason
            details[bad] = detail if isinstance(detail, str) else detail[bad]
    return reasons, details


def rejects_frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=REJECT_COLUMNS).astype({"source_row": "Int64"})


def index_images(data_root: Path, suffixes: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Map file name -> path relative to `data_root` for every image below it.

    Returns the index and the names found more than once (ambiguous, so not used).
    Real downloads nest images differently (NIH: `images/` or `images_001/images/`).
    """
    index: dict[str, str] = {}
    duplicates: set[str] = set()
    for folder, _, files in os.walk(data_root):
        for name in files:
            if name.lower().endswith(suffixes):
                if name in index:
                    duplicates.add(name)
                index[name] = os.path.relpath(os.path.join(folder, name), data_root)
    for name in duplicates:
        del index[name]
    return index, sorted(duplicates)


def resolve_inside(data_root: Path, relative: str) -> Path:
    """Absolute path of `relative` under `data_root`; ValueError if it escapes the root.

    The check is lexical (`..`, absolute paths): symlinks placed inside the root by whoever
    laid out the data (images on another disk) are followed, as users expect.
    """
    root = os.path.abspath(data_root)
    path = os.path.normpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"path {relative!r} escapes the data root {root}")
    return Path(path)
