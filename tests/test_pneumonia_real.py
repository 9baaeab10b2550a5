"""A short real run: pediatric pneumonia JPEGs -> Spark ETL -> train.py; AUROC well above chance."""
import json
import os

import pandas as pd

from conftest import BIN, KERMANY, require, run_cli, spark_etl
from training.results import read_results


def test_short_real_pneumonia_run_learns(tmp_path):
    source = require(KERMANY)
    root = tmp_path / "chest_xray"
    for folder, count in (("NORMAL", 400), ("PNEUMONIA", 400)):
        (root / "train" / folder).mkdir(parents=True)
        for name in sorted(os.listdir(source / folder))[:count]:
            (root / "train" / folder / name).symlink_to(source / folder / name)
    dataset = tmp_path / "pneumonia_64"
    spark_etl("--source", "pneumonia", "--data-root", root, "--output", dataset, "--size", 64,
              "--split-fractions", "0.7,0.3,0.0", "--rows-per-file", 32)
    summary = json.loads((dataset / "_etl_summary.json").read_text())
    assert summary["rows_read"] == 800 and summary["rows_quarantined"] == 0
    assert summary["rows_written"]["test"] == 0 and summary["rows_written"]["val"] > 150

    run_cli(BIN / "python", "training/train.py", "--dataset", dataset, "--output-dir", tmp_path / "runs",
            "--results-table", tmp_path / "results", "--model", "small_cnn", "--weights", "none",
            "--stages", "finetune", "--epochs-finetune", 6, "--lr-finetune", 1e-3, "--batch-size", 16)
    results = read_results(str(tmp_path / "results"))
    val = results[(results["split"] == "val") & (results["label"] == "Pneumonia")].iloc[0]
    assert val["n_pos"] > 50 and val["n_neg"] > 50
    assert val["auroc"] > 0.85, val["auroc"]
    predictions = pd.read_csv(next((tmp_path / "runs").iterdir()) / "predictions_finetune_val.csv")
    assert len(predictions) == summary["rows_written"]["val"]
