"""The exploration report on the full NIH label table (no pixels needed), and its tables."""
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import CHEXPERT_TRAIN_CSV, NIH, require
from cxr_pipeline.etl.explore import cooccurrence, counts_by_split, main, prevalence_by

PLOTS = ("positives_by_split", "cooccurrence", "age", "label_mix_by_sex", "label_mix_by_view")


def test_report_on_the_full_nih_table_renders_plots_and_counts(tmp_path):
    csv = pd.read_csv(require(NIH / "Data_Entry_2017_v2020.csv.gz"), usecols=["Finding Labels"])
    paths = main(["--source", "nih", "--data-root", str(NIH), "--labels-csv",
                  str(NIH / "Data_Entry_2017_v2020.csv.gz"), "--output", str(tmp_path)])
    for name in PLOTS:
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and image.width >= 900 and image.height >= 400
            assert len(np.unique(np.asarray(image.convert("L")))) > 20  # drawn, not blank
    page = paths["index"].read_text()
    assert all(f"src='{name}.png'" in page for name in PLOTS)
    assert "100 of 112,120" in page  # the images present, reported, not a failure
    effusion = re.search(r"<th>Effusion</th>\s*<td>(\d+)</td>\s*<td>(\d+)</td>\s*<td>(\d+)</td>\s*<td>(\d+)</td>", page)
    train, val, test, total = map(int, effusion.groups())
    assert total == train + val + test == csv["Finding Labels"].str.contains("Effusion").sum() == 13_317


def test_report_on_chexpert_adds_the_uncertain_counts(tmp_path):
    paths = main(["--source", "chexpert", "--data-root", str(tmp_path), "--labels-csv",
                  str(require(CHEXPERT_TRAIN_CSV)), "--output", str(tmp_path / "report")])
    page = paths["index"].read_text()
    assert "Uncertain (-1) entries per label and split" in page and "LATERAL (n=32,387)" in page


def test_tables_count_per_split_cooccurrence_and_pooled_groups():
    membership = pd.DataFrame({"A": [1, 1, 0, 1, 0], "B": [1, 0, 0, 1, 1]}).astype(bool)
    splits = pd.Series(["train", "train", "val", "test", "test"])
    counts = counts_by_split(membership, splits)
    assert counts.loc["A", ["train", "val", "test", "total"]].tolist() == [2, 0, 1, 3]
    assert counts.loc["B", "prevalence_%"] == pytest.approx(60.0)
    pairs = cooccurrence(membership)
    assert pairs.loc["A", "B"] == pairs.loc["B", "A"] == 2 and pairs.loc["A", "A"] == 3
    views = pd.Series(["PA", "PA", "AP", "AP", None])
    by_view = prevalence_by(membership, views, min_share=0.3)
    assert list(by_view.columns) == ["PA (n=2)", "AP (n=2)", "other (n=1)"]
    assert by_view.loc["A", "AP (n=2)"] == pytest.approx(50.0)
