"""A short real run on the pneumonia download as distributed (train/ + the official test/):
Spark ETL -> train.py -> calibrated, thresholded checkpoint -> predict to a file."""
import json
import os

import numpy as np
import pandas as pd

from conftest import BIN, KERMANY, current, require, run_cli, spark_etl
from cxr_pipeline.training.evaluation.operating_points import DEFAULT_POLICIES
from cxr_pipeline.training.evaluation.results import read_results
from cxr_pipeline.training.loop import checkpoints


def test_short_real_pneumonia_run_scores_the_official_test_split(tmp_path):
    source = require(KERMANY)
    root = tmp_path / "chest_xray"
    for folder, count in (("NORMAL", 400), ("PNEUMONIA", 400)):
        (root / "train" / folder).mkdir(parents=True)
        for name in sorted(os.listdir(source / folder))[:count]:
            (root / "train" / folder / name).symlink_to(source / folder / name)
    (root / "test").symlink_to(require(source.parent / "test"))
    dataset = tmp_path / "pneumonia_64"
    spark_etl("--source", "pneumonia", "--data-root", root, "--output", dataset, "--size", 64,
              "--split-fractions", "0.7,0.3,0.0", "--rows-per-file", 32)
    summary = json.loads((current(dataset) / "_etl_summary.json").read_text())
    assert summary["rows_read"] == 800 + 311 and summary["rows_quarantined"] == 0
    assert summary["rows_written"]["test"] == 311 and summary["rows_written"]["val"] > 150

    run_cli(BIN / "python", "training/train.py", "--dataset", dataset, "--output-dir", tmp_path / "runs",
            "--results-table", tmp_path / "results", "--model", "small_cnn", "--weights", "none",
            "--stages", "finetune", "--epochs-finetune", 6, "--lr-finetune", 1e-3, "--batch-size", 16,
            "--bootstrap", 200)
    results = read_results(str(tmp_path / "results")).set_index(["split", "label"])
    val, test = results.loc[("val", "Pneumonia")], results.loc[("test", "Pneumonia")]
    assert val["n_pos"] > 50 and val["n_neg"] > 50 and val["auroc"] > 0.85, val["auroc"]
    assert test["n_pos"] + test["n_neg"] == 311 and test["auroc"] > 0.75, test["auroc"]
    assert val["operating_point"] == "sens>=0.95" and 0 <= test["brier"] <= 1

    (run_dir,) = (tmp_path / "runs").iterdir()
    best = checkpoints.load(run_dir / "best_finetune.pth")
    assert best["calibration"][0]["method"] == "platt"  # fewer than 500 val images of each class
    assert set(best["operating_points"]) == set(DEFAULT_POLICIES)
    operating = pd.read_csv(run_dir / "operating_points_finetune.csv")
    assert len(operating) == 2 * len(DEFAULT_POLICIES)  # every policy, chosen on val, on val and test
    on_test = operating[(operating["split"] == "test") & (operating["policy"] == "sens>=0.95")].iloc[0]
    assert on_test["threshold"] == best["thresholds"][0]  # the val-chosen threshold, unchanged on test
    assert on_test["accuracy_ci_low"] <= on_test["accuracy"] <= on_test["accuracy_ci_high"]
    assert (run_dir / "reliability_finetune_test.png").exists()

    # predict, from the JPEG files, gives what train.py scored from the Parquet rows
    run_cli(BIN / "python", "-m", "training.predict", "--checkpoint", run_dir / "best_finetune.pth", root / "test",
            "--output", tmp_path / "test_predictions.csv")
    predicted = pd.read_csv(tmp_path / "test_predictions.csv")
    scored = pd.read_csv(run_dir / "predictions_finetune_test.csv")
    assert len(predicted) == 311 and (predicted["error"].isna() | (predicted["error"] == "")).all()
    merged = scored.assign(name=scored["image_id"].str.split("/").str[-1]).merge(
        predicted.assign(name=predicted["image_id"].str.split("/").str[-1]), on="name", suffixes=("_train", ""))
    assert len(merged) == 311
    assert np.abs(merged["Pneumonia_train"] - merged["Pneumonia"]).max() < 1e-5
    assert (merged["Pneumonia_positive"] == (merged["Pneumonia"] >= best["thresholds"][0])).all()
