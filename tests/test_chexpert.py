"""The CheXpert source on the real 223,414-row label table (images generated at its paths only
where a test needs pixels), one small Spark ETL with uncertainty policies and folds, and the
U-SelfTrained relabel command on its output."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import CHEXPERT_TRAIN_CSV, current, require, run_cli, spark_etl
from conftest import chexpert_table as real_table, write_chexpert_images as write_images
from cxr_pipeline.etl.sources import chexpert
from cxr_pipeline.etl.uncertainty import apply_policy, parse_policies, spec_label_fields
from cxr_pipeline.schema import DatasetSpec, read_dataset_spec

POLICY = "U-Zeros,Atelectasis=U-Ones,Cardiomegaly=U-MultiClass,Consolidation=U-SelfTrained"


@pytest.fixture(scope="module")
def full_manifest():
    return chexpert.build_manifest("/nonexistent", labels_csv=require(CHEXPERT_TRAIN_CSV), check_images=False)


def test_full_table_rows_patients_sex_view_and_raw_values_match_the_csv(full_manifest):
    csv = real_table()
    rows = full_manifest.rows
    assert len(rows) == 223_414 and full_manifest.rejects.empty
    assert rows["patient_id"].tolist() == csv["Path"].str.split("/").str[2].tolist()
    assert rows["patient_id"].nunique() == 64_540
    assert rows["sex"].value_counts().to_dict() == {"M": 132_636, "F": 90_777} and rows["sex"].isna().sum() == 1
    assert rows["view_position"].value_counts().to_dict() == {"AP": 161_590, "LATERAL": 32_387, "PA": 29_420,
                                                              "LL": 16, "RL": 1}
    raw = np.asarray(rows["raw_labels"].tolist())
    for column, name in enumerate(chexpert.LABEL_NAMES):
        expected = csv[name].replace({"": "nan"}).astype(float)
        assert np.array_equal(raw[:, column], expected.to_numpy(), equal_nan=True), name
    assert rows["official_split"].isna().all()  # no valid.csv: the seeded split makes all three


def test_default_policy_is_blank_and_uncertain_negative(full_manifest):
    labels = np.asarray(full_manifest.rows["labels"].tolist())
    raw = np.asarray(full_manifest.rows["raw_labels"].tolist())
    assert np.array_equal(labels, (raw == 1).astype(float))
    assert "label_mask" not in full_manifest.rows
    assert spec_label_fields(full_manifest) == {
        "label_policies": dict.fromkeys(chexpert.LABEL_NAMES, "U-Zeros"), "has_mask": False}


def test_frontal_only_with_a_few_images_reports_every_missing_one(tmp_path):
    frontal = real_table().query("`Frontal/Lateral` == 'Frontal'")
    write_images(tmp_path, frontal["Path"].iloc[:5])
    manifest = chexpert.build_manifest(tmp_path, labels_csv=CHEXPERT_TRAIN_CSV, frontal_only=True)
    assert manifest.rows_read == len(frontal) == 191_027
    assert manifest.rows["image_id"].tolist() == frontal["Path"].iloc[:5].tolist()
    assert manifest.rejects["reason"].value_counts().to_dict() == {"image_missing": 191_022}
    first_missing = frontal.index[5] + 1  # source rows count the file's rows, laterals included
    assert manifest.rejects["source_row"].iloc[0] == first_missing == 8
    assert manifest.rejects["detail"].iloc[0].endswith(f"(chexpert_train.csv.gz row {first_missing})")


def test_valid_csv_is_the_test_split_and_bad_rows_are_rejected(tmp_path):
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    table = real_table().iloc[:6].copy()
    table.loc[1, "Edema"] = "2.0"
    table.loc[2, "Path"] = "CheXpert-v1.0-small/train/../../../etc/passwd.jpg"
    table.loc[3, "Path"] = "CheXpert-v1.0-small/train/someone/study1/view1_frontal.jpg"
    table.loc[4, "Path"] = table.loc[0, "Path"]
    table.to_csv(folder / "train.csv", index=False)
    valid = real_table().iloc[:2].assign(Path=lambda t: t["Path"].str.replace("train/patient0000", "valid/patient6454"))
    valid.to_csv(folder / "valid.csv", index=False)
    manifest = chexpert.build_manifest(tmp_path, check_images=False)
    assert manifest.rejects.set_index("source_row")["reason"].to_dict() == {
        2: "unknown_label", 3: "path_escapes_root", 4: "missing_patient_id", 5: "duplicate_image_id"}
    assert "Edema=2.0" in manifest.rejects["detail"].iloc[0]
    assert manifest.rows.set_index("patient_id")["official_split"].to_dict() == {
        "patient00001": "train_val", "patient00004": "train_val", "patient64541": "test", "patient64542": "test"}


def test_policies_on_the_full_table_give_labels_mask_and_spec_fields():
    manifest = chexpert.build_manifest("/nonexistent", labels_csv=require(CHEXPERT_TRAIN_CSV), check_images=False,
                                       uncertainty_policy=POLICY, blank_policy="U-Zeros")
    rows = manifest.rows
    raw = np.asarray(rows["raw_labels"].tolist())
    labels, mask = np.asarray(rows["labels"].tolist()), np.asarray(rows["label_mask"].tolist())
    expected_labels, expected_mask = apply_policy(raw, parse_policies(POLICY, chexpert.LABEL_NAMES))
    assert np.array_equal(labels, expected_labels) and np.array_equal(mask, expected_mask)
    consolidation = chexpert.LABEL_NAMES.index("Consolidation")
    assert (mask[:, consolidation] == 0).sum() == 27_742 and (mask == 0).sum() == 27_742
    spec = DatasetSpec(manifest.dataset, manifest.label_names, 64, **spec_label_fields(manifest))
    assert spec.has_mask and spec.multiclass_labels == ("Cardiomegaly",)
    assert spec.label_policies["Atelectasis"] == "U-Ones" and spec.label_policies["Consolidation"] == "U-SelfTrained"


def test_data_root_set_to_the_chexpert_folder_itself_says_which_to_pass(tmp_path):
    table = real_table().iloc[:3]
    write_images(tmp_path, table["Path"])
    table.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(FileNotFoundError, match=f"pass --data-root {tmp_path} "):
        chexpert.build_manifest(tmp_path / "CheXpert-v1.0-small", labels_csv=tmp_path / "train.csv")


@pytest.fixture(scope="module")
def chexpert_dataset(tmp_path_factory):
    """The first 60 real rows (22 patients) with generated images through the Spark ETL."""
    root = tmp_path_factory.mktemp("chexpert")
    table = real_table().iloc[:60]
    (root / "CheXpert-v1.0-small").mkdir()
    table.to_csv(root / "CheXpert-v1.0-small" / "train.csv", index=False)
    write_images(root, table["Path"])
    output = root.parent / "chexpert_32"
    spark_etl("--source", "chexpert", "--data-root", root, "--output", output, "--size", 32, "--rows-per-file", 16,
              "--uncertainty-policy", POLICY, "--folds", 3)
    return output, table


def read_rows(dataset) -> pd.DataFrame:
    dataset = current(dataset)
    return pd.concat([pq.read_table(dataset / f"split={s}").to_pandas().assign(split=s)
                      for s in ("train", "val", "test")], ignore_index=True)


def test_etl_writes_policy_labels_mask_folds_and_spec(chexpert_dataset):
    output, table = chexpert_dataset
    spec = read_dataset_spec(current(output))
    assert spec.dataset == "chexpert" and spec.label_names == chexpert.LABEL_NAMES
    assert spec.has_mask and spec.folds == 3 and spec.multiclass_labels == ("Cardiomegaly",)
    rows = read_rows(output).set_index("image_id").loc[table["Path"]]
    raw = table[list(chexpert.LABEL_NAMES)].replace("", "nan").to_numpy(dtype=float)
    expected_labels, expected_mask = apply_policy(raw, parse_policies(POLICY, chexpert.LABEL_NAMES))
    assert np.array_equal(np.stack(rows["labels"]), expected_labels)
    assert np.array_equal(np.stack(rows["label_mask"]), expected_mask)
    assert rows.loc[rows["split"] == "test", "fold"].isna().all()
    assert (rows.loc[rows["split"] == "val", "fold"] == 0).all()
    assert set(rows.loc[rows["split"] == "train", "fold"]) == {1, 2}
    assert rows.groupby("patient_id")["fold"].nunique(dropna=False).max() == 1


def test_relabel_command_fills_uncertain_self_trained_entries_from_predictions(chexpert_dataset, tmp_path):
    output, _ = chexpert_dataset
    before = read_rows(output).set_index("image_id")
    train = before[before["split"] == "train"]
    predictions = pd.DataFrame(0.25, index=train.index, columns=list(chexpert.LABEL_NAMES)).rename_axis("image_id")
    predictions.to_csv(tmp_path / "predictions_kt_train.csv")
    relabelled = tmp_path / "relabelled"
    run_cli(sys.executable, "-m", "etl.uncertainty", "--dataset", output, "--predictions",
            tmp_path / "predictions_kt_train.csv", "--output", relabelled)
    after = read_rows(relabelled).set_index("image_id").loc[before.index]
    consolidation = chexpert.LABEL_NAMES.index("Consolidation")
    mask_before, mask_after = np.stack(before["label_mask"]), np.stack(after["label_mask"])
    labels_before, labels_after = np.stack(before["labels"]), np.stack(after["labels"])
    changed = (mask_before[:, consolidation] == 0) & (before["split"] == "train").to_numpy()
    assert changed.sum() >= 1
    assert (labels_after[changed, consolidation] == 0.25).all() and (mask_after[changed] == 1).all()
    untouched = ~changed
    assert np.array_equal(labels_after[untouched], labels_before[untouched])
    assert np.array_equal(mask_after[untouched], mask_before[untouched])
    assert (after["pixels_u8"] == before["pixels_u8"]).all()
    assert read_dataset_spec(current(relabelled)) == read_dataset_spec(current(output))
    summary = json.loads((current(relabelled) / "_relabel.json").read_text())
    assert summary["entries_relabelled"] == {"Consolidation": int(changed.sum())}


def train(dataset, root, *extra) -> Path:
    """small_cnn, one fine-tune epoch on one rank; returns the run folder."""
    run_cli(sys.executable, "training/train.py", "--dataset", dataset, "--output-dir", root / "runs",
            "--results-table", root / "results", "--model", "small_cnn", "--weights", "none", "--stages", "finetune",
            "--epochs-finetune", 1, "--batch-size", 8, "--bootstrap", 50, "--backend", "single", *extra)
    (run_dir,) = (root / "runs").iterdir()
    return run_dir


def test_training_honours_mask_and_three_way_head_then_self_trains_in_two_passes(chexpert_dataset, tmp_path):
    """U-SelfTrained as a job runs it: train with the masked labels (pass 1, also scoring the train
    split), relabel its uncertain entries with those scores, train again on the result (pass 2)."""
    from deltalake import DeltaTable

    from cxr_pipeline.training.loop import checkpoints

    output, _ = chexpert_dataset
    first = train(output, tmp_path / "pass1", "--predict-train")
    best = checkpoints.load(first / "best_finetune.pth")
    assert best["model"]["classifier.weight"].shape[0] == 13 + 3  # Cardiomegaly: negative/uncertain/positive
    rows = read_rows(output)
    train_ids = set(rows.loc[rows["split"] == "train", "image_id"])
    scored = pd.read_csv(first / "predictions_finetune_train.csv")
    assert set(scored["image_id"]) == train_ids and scored[list(chexpert.LABEL_NAMES)].stack().between(0, 1).all()

    val = rows[rows["split"] == "val"]
    cardiomegaly = np.stack(val["labels"])[:, chexpert.LABEL_NAMES.index("Cardiomegaly")]
    results = DeltaTable(str(tmp_path / "pass1" / "results")).to_pandas()
    counted = results.query("split == 'val' and label == 'Cardiomegaly'").iloc[0]
    assert (counted["n_pos"], counted["n_neg"]) == ((cardiomegaly == 2).sum(), (cardiomegaly == 0).sum())

    relabelled = tmp_path / "relabelled"
    run_cli(sys.executable, "-m", "etl.uncertainty", "--dataset", output, "--predictions",
            first / "predictions_finetune_train.csv", "--output", relabelled)
    assert json.loads((current(relabelled) / "_relabel.json").read_text())["entries_relabelled"]["Consolidation"] >= 1
    second = train(relabelled, tmp_path / "pass2")
    assert (second / "best_finetune.pth").exists()


def test_another_fold_becomes_val_without_decoding_again(chexpert_dataset, tmp_path):
    output, _ = chexpert_dataset
    run_cli(sys.executable, "-m", "etl.folds", "--dataset", output, "--fold", 1, "--output", tmp_path / "fold1")
    before, after = read_rows(output), read_rows(tmp_path / "fold1")
    assert len(after) == len(before) and set(after["image_id"]) == set(before["image_id"])
    assert (after.loc[after["split"] == "val", "fold"] == 1).all()
    assert set(after.loc[after["split"] == "train", "fold"]) == {0, 2}
    assert after.groupby("patient_id")["split"].nunique().max() == 1
    test_ids = set(before.loc[before["split"] == "test", "image_id"])
    assert set(after.loc[after["split"] == "test", "image_id"]) == test_ids
    assert read_dataset_spec(current(tmp_path / "fold1")) == read_dataset_spec(current(output))
    merged = before.set_index("image_id").loc[after["image_id"], "pixels_u8"]
    assert (merged.to_numpy() == after["pixels_u8"].to_numpy()).all()
    with pytest.raises(SystemExit, match="0..2"):
        from cxr_pipeline.etl.folds import main as folds
        folds(["--dataset", str(output), "--fold", "3", "--output", str(tmp_path / "fold3")])
