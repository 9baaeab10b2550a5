"""A Delta row leads back to the model that made the predictions it scores: train.py's run, its checkpoint and its
dataset version travel in every predictions file (training/serving/predictions.py) and `evaluate
--results-table` writes them into its rows; a file from another tool gets a run id of its own, said aloud."""
import json

import numpy as np
import pandas as pd

from conftest import BIN, run_cli
from cxr_pipeline.etl import versions
from cxr_pipeline.etl.sources.nih import LABEL_NAMES
from cxr_pipeline.training.evaluate import main as evaluate
from cxr_pipeline.training.evaluation.results import read_results
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.predict import main as predict


def test_evaluate_rows_name_the_checkpoint_and_training_run_of_the_predictions(nih_dataset, tmp_path, capsys):
    results = tmp_path / "results"
    run_cli(BIN / "python", "training/train.py", "--dataset", nih_dataset, "--output-dir", tmp_path / "runs",
            "--results-table", results, "--model", "small_cnn", "--weights", "none", "--stages", "finetune",
            "--epochs-finetune", 1, "--max-steps-per-epoch", 2, "--batch-size", 8, "--bootstrap", 20,
            "--backend", "single", "--no-mlflow")
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = run_dir / "best_finetune.pth"
    predict(["--checkpoint", str(checkpoint), str(nih_dataset), "--split", "test", "--output", str(tmp_path / "p.csv")])
    common = ["--dataset", str(nih_dataset), "--split", "test", "--bootstrap", "20", "--results-table", str(results)]
    evaluate(["--predictions", str(tmp_path / "p.csv"), *common])
    evaluate(["--predictions", str(run_dir / "predictions_finetune_test.csv"), *common])

    rows = read_results(str(results))
    assert set(rows["run_id"]) == {run_dir.name}  # training's rows and both evaluations': one run
    assert set(rows["stage"]) == {"finetune", "external:p.csv", "external:predictions_finetune_test.csv"}
    external = rows[rows["stage"].str.startswith("external")]
    assert len(external) == 2 * (len(LABEL_NAMES) + 1)
    assert (external["dataset_version"] == versions.resolve(nih_dataset).version).all()
    lineage = [json.loads(config) for config in external["model_config"]]
    assert {entry["checkpoint_sha256"] for entry in lineage} == {checkpoints.recorded_sha256(checkpoint)}
    assert {entry["model_uri"] for entry in lineage} == {str(checkpoint.resolve())}
    mean = external[external["label"] == "mean"].set_index("stage")["auroc"]
    assert np.isclose(mean["external:p.csv"], mean["external:predictions_finetune_test.csv"], atol=1e-6)

    other_tool = pd.read_csv(tmp_path / "p.csv")[["image_id", *LABEL_NAMES]]
    other_tool.to_csv(tmp_path / "other.csv", index=False)
    capsys.readouterr()
    evaluate(["--predictions", str(tmp_path / "other.csv"), *common])
    out = capsys.readouterr().out
    (generated,) = set(read_results(str(results))["run_id"]) - {run_dir.name}
    assert generated.startswith("eval-") and f"names no model (another tool's file?): its rows go under a new run " \
                                              f"id, {generated}" in out
