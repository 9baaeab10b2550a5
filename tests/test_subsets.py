"""Balanced subsets, K folds and the NIH label options (15 classes, bounding boxes), on the full
112,120-row NIH label table (manifest only: the images are mostly absent)."""
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import NIH, require
from cxr_pipeline.etl.sources import label_manifest, nih, side_tables
from cxr_pipeline.etl.splits import assign_folds, assign_splits, check_patient_disjoint, fold_split
from cxr_pipeline.etl.subsets import balanced_subset, class_membership, main, parse_targets, subset_counts

TARGETS = "2000,No Finding=10000"


@pytest.fixture(scope="module")
def table():
    manifest = label_manifest("nih", require(NIH), labels_csv=NIH / "Data_Entry_2017_v2020.csv.gz")
    return manifest.rows, class_membership(manifest.rows, manifest.label_names)


def test_balanced_subset_of_the_full_table_meets_every_target(table):
    rows, membership = table
    targets = parse_targets(TARGETS, list(membership.columns))
    selected = balanced_subset(membership, targets, rows["image_id"], seed=0)
    counts = subset_counts(membership, selected, assign_splits(rows["patient_id"], 0), targets)
    print(counts.to_string())
    assert len(rows) == 112_120
    assert counts.loc["No Finding", "selected"] == 10_000  # disjoint from the findings: exactly its target
    rare = counts["available"] < counts["target"]
    assert sorted(counts.index[rare]) == ["Fibrosis", "Hernia", "Pneumonia"]
    assert (counts.loc[rare, "selected"] == counts.loc[rare, "available"]).all()  # all of them taken
    assert (counts.loc[~rare, "selected"] >= counts.loc[~rare, "target"]).all()
    assert counts.loc["Cardiomegaly", "selected"] == 2000  # sampled to its target
    assert (counts[["train", "val", "test"]].sum(axis=1) == counts["selected"]).all()


def test_subset_is_deterministic_by_seed_and_independent_of_row_order(table):
    rows, membership = table
    targets = parse_targets(TARGETS, list(membership.columns))
    chosen = set(rows.loc[balanced_subset(membership, targets, rows["image_id"], seed=0), "image_id"])
    shuffled = rows.sample(frac=1.0, random_state=1).index
    again = balanced_subset(membership.loc[shuffled], targets, rows.loc[shuffled, "image_id"], seed=0)
    assert set(rows.loc[shuffled][again.to_numpy()]["image_id"]) == chosen
    other_seed = set(rows.loc[balanced_subset(membership, targets, rows["image_id"], seed=1), "image_id"])
    assert other_seed != chosen and len(chosen & other_seed) > 0.3 * len(chosen)


def test_subset_command_prints_counts_per_split(capsys):
    counts = main(["--source", "nih", "--data-root", str(require(NIH)),
                   "--labels-csv", str(NIH / "Data_Entry_2017_v2020.csv.gz"), "--targets", TARGETS])
    printed = capsys.readouterr().out
    assert "nih: 112120 labelled images; subset of" in printed and "Hernia" in printed
    assert counts.loc["Hernia", "selected"] == 227


@pytest.mark.parametrize("text, message", [
    ("lots", "must be a whole number"), ("2000,Pneumonitis=5", "unknown classes \\['Pneumonitis'\\]"),
    ("-1", "must not be negative"),
])
def test_bad_targets_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_targets(text, ["Hernia", "No Finding"])


def test_three_folds_of_the_full_table_are_patient_disjoint_and_cover_train_val(table):
    rows, _ = table
    splits = assign_splits(rows["patient_id"], 0)
    train_val = splits != "test"
    folds = assign_folds(rows.loc[train_val, "patient_id"], 0, 3)
    assert rows.loc[train_val].assign(fold=folds).groupby("patient_id")["fold"].nunique().max() == 1
    sizes = folds.value_counts(normalize=True)
    assert sorted(sizes.index) == [0, 1, 2] and sizes.between(0.30, 0.37).all()
    all_folds = folds.reindex(rows.index)
    validation = []
    for fold in range(3):
        split = fold_split(splits, all_folds, fold)
        check_patient_disjoint(rows["patient_id"], split)
        assert (split[~train_val] == "test").all()
        validation.append(set(rows.index[split == "val"]))
    assert set.union(*validation) == set(rows.index[train_val]) and sum(map(len, validation)) == train_val.sum()


def test_fifteen_classes_make_no_finding_a_class_of_its_own():
    manifest = nih.build_manifest(require(NIH), NIH / "Data_Entry_2017_v2020.csv.gz", no_finding_class=True,
                                  check_images=False)
    csv = pd.read_csv(NIH / "Data_Entry_2017_v2020.csv.gz", usecols=["Finding Labels"])
    labels = pd.DataFrame(manifest.rows["labels"].tolist(), columns=manifest.label_names)
    assert manifest.label_names[-1] == "No Finding" and len(manifest.label_names) == 15
    assert labels["No Finding"].sum() == (csv["Finding Labels"] == "No Finding").sum() == 60_361
    assert ((labels["No Finding"] == 1) == (labels.iloc[:, :14].sum(axis=1) == 0)).all()


def test_bounding_boxes_side_table_uses_the_label_names():
    boxes = side_tables("nih", require(NIH))["bounding_boxes"]
    assert len(boxes) == 984 and list(boxes.columns) == ["image_id", "label", "x", "y", "width", "height"]
    assert set(boxes["label"]) <= set(nih.LABEL_NAMES) and (boxes["label"] == "Infiltration").sum() == 123
    assert boxes[["x", "y"]].min().min() >= 0 and (boxes["x"] + boxes["width"]).max() <= 1024


def test_etl_output_keeps_the_bounding_boxes(nih_dataset):
    boxes = pq.read_table(nih_dataset / "_side" / "bounding_boxes.parquet").to_pandas()
    assert len(boxes) == 984 and boxes["image_id"].str.endswith(".png").all()
