"""train.py's MLflow run (training/serving/tracking.py): parameters, per-epoch metrics per stage, per-label AUROC, the
report and plots, Grad-CAM examples, the environment, and the model, which reloads from the registry and
scores real images as training.predict does; the Delta rows carry the MLflow run id."""
import argparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from conftest import BIN, KERMANY, NIH, require, run_cli
from cxr_pipeline.etl import versions
from cxr_pipeline.training.evaluation.results import RESULT_SCHEMA, write_results, read_results
from cxr_pipeline.training.explain import overlays
from cxr_pipeline.training.loop.distributed import Single
from cxr_pipeline.training.serving import tracking
from cxr_pipeline.training.serving.predictions import IDENTITY_COLUMNS, PREVALENCE_COLUMN, SCORED_AT

NO_SERVER = {"MLFLOW_TRACKING_URI": "", "MLFLOW_EXPERIMENT_NAME": ""}  # the local store in the run's folder


def train(dataset, tmp_path, *extra):
    return run_cli(BIN / "python", "training/train.py", "--dataset", dataset, "--output-dir", tmp_path / "runs",
                   "--results-table", tmp_path / "results", "--model", "small_cnn", "--weights", "none",
                   "--batch-size", 4, "--max-steps-per-epoch", 3, "--bootstrap", 50, *extra, env=NO_SERVER)


def artifact_paths(client, run_id, folder=""):
    found = []
    for entry in client.list_artifacts(run_id, folder):
        found += artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


def test_a_training_run_is_an_mlflow_run_whose_model_scores_like_predict(nih_dataset, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from cxr_pipeline.training.predict import main as predict

    train(nih_dataset, tmp_path, "--epochs-kt", 1, "--epochs-finetune", 2, "--register-model", "cxr-nih-test")
    (run_dir,) = (tmp_path / "runs").iterdir()  # the store lives in the run's folder: runs/ holds runs only
    store = f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(store, store)
    experiment = client.get_experiment_by_name("cxr-nih")
    (run,) = client.search_runs([experiment.experiment_id])
    results = read_results(str(tmp_path / "results"))
    assert run.info.status == "FINISHED" and run.info.run_name == run.data.tags["cxr_run_id"] == run_dir.name
    assert run.data.tags["cxr_run_dir"] == str(run_dir.resolve()) and run.data.tags["env_torch"]
    assert (results["mlflow_run_id"] == run.info.run_id).all()  # the Delta rows say which MLflow run
    version = versions.resolve(nih_dataset).version  # and the run, its rows and its model which dataset version
    assert run.data.tags["cxr_dataset_version"] == version and (results["dataset_version"] == version).all()
    params = run.data.params
    assert (params["model"], params["epochs_finetune"], params["lr_kt"], params["register_model"]) == (
        "small_cnn", "2", "0.001", "cxr-nih-test")  # the resolved configuration
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("kt/train_loss", "finetune/train_loss", "finetune/val_loss")}
    assert [step for step, _ in history["kt/train_loss"]] == [1]
    assert [s for s, _ in history["finetune/train_loss"]] == [1, 2] == [s for s, _ in history["finetune/val_loss"]]
    summary = pd.read_csv(run_dir / "summary.csv")
    assert [v for _, v in history["finetune/train_loss"]] == pytest.approx(
        summary.loc[summary["stage"] == "finetune", "train_loss"].tolist())
    for _, row in results[results["auroc"].notna()].iterrows():  # every AUROC of the table, as a metric
        assert run.data.metrics[f"{row.stage}/{row.split}/auroc/{row.label}"] == pytest.approx(row.auroc)
    artifacts = artifact_paths(client, run.info.run_id)
    for name in ("report.html", "auroc_table.csv", "config.yaml", "summary.csv", "training_curves.png",
                 "environment/requirements.txt", "environment/environment.json", "kt/roc_kt_test.png",
                 "finetune/reliability_finetune_val.png", "finetune/operating_points_finetune.csv",
                 "finetune/auroc_rows.csv"):
        assert name in artifacts, name
    assert len([name for name in artifacts if name.startswith("gradcam/")]) == overlays.EXAMPLES
    auroc_table = pd.read_csv(client.download_artifacts(run.info.run_id, "auroc_table.csv", str(tmp_path)),
                              index_col=0)
    assert list(auroc_table.columns) == ["kt/val", "kt/test", "finetune/val", "finetune/test"]
    listed = run_cli(BIN / "mlflow", "runs", "list", "--experiment-id", experiment.experiment_id,
                     env={"MLFLOW_TRACKING_URI": store}).stdout
    assert run.info.run_id in listed

    # the registered model: the last stage's best checkpoint, scoring real files exactly as predict does
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("CXR_MODEL_PATH_ROOT", str(NIH.parent))  # the model reads paths below it only
    model = mlflow.pyfunc.load_model("models:/cxr-nih-test/1")
    assert model.metadata.metadata["dataset_version"] == version
    images = [*sorted(require(NIH / "images").glob("*.png"))[:2], sorted(require(KERMANY).rglob("*.jpeg"))[0]]
    scored = model.predict(pd.DataFrame({"path": [str(path) for path in images]}))
    expected = predict(["--checkpoint", str(run_dir / "best_finetune.pth"), *map(str, images)])
    assert list(scored.columns) == list(expected.columns)  # training/serving/predictions.py's, both
    assert (scored["run_id"] == run_dir.name).all() and (scored["dataset_version"] == version).all()
    labels = [name for name in scored.columns
              if name not in {"image_id", "path", PREVALENCE_COLUMN, *IDENTITY_COLUMNS, SCORED_AT}]
    assert len(labels) == 2 * 14 + 1 and (scored["error"] == "").all()
    decisions = [name for name in labels if name.endswith("_positive")]
    scores = [name for name in labels if name not in decisions and name != "error"]
    assert np.abs(scored[scores].to_numpy(float) - expected[scores].to_numpy(float)).max() < 1e-6
    assert (scored[decisions].astype(float).fillna(-1).to_numpy() == expected[decisions].astype(float).fillna(-1)
            .to_numpy()).all()


def test_a_resumed_run_continues_its_mlflow_run_and_no_mlflow_logs_nothing(nih_dataset, tmp_path):
    from mlflow import MlflowClient

    train(nih_dataset, tmp_path, "--stages", "finetune", "--epochs-finetune", 1, "--run-id", "resumable")
    run_dir = tmp_path / "runs" / "resumable"
    train(nih_dataset, tmp_path, "--stages", "finetune", "--epochs-finetune", 2, "--resume", run_dir / "checkpoint.pth")
    store = f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("cxr-nih").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["cxr_resumed_from"].endswith("checkpoint.pth")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "finetune/train_loss")] == [1, 2]

    train(nih_dataset, tmp_path / "off", "--stages", "finetune", "--epochs-finetune", 1, "--no-mlflow")
    (off,) = (tmp_path / "off" / "runs").iterdir()
    assert not (off / "mlflow").exists()
    assert read_results(str(tmp_path / "off" / "results"))["mlflow_run_id"].isna().all()


STARTER = """
import argparse, sys
from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.loop.distributed import Single
from cxr_pipeline.training.serving import tracking
args = argparse.Namespace(run_id=sys.argv[2], resume=None, dataset="d", dataset_version=None, no_mlflow=False,
                          register_model=None, mlflow_experiment=None)
print(tracking.start(args, __import__("pathlib").Path(sys.argv[1]) / sys.argv[2], DatasetSpec("nih", ("A",), 8),
                     Single()).run_id)
"""


def test_runs_started_together_create_one_store_between_them(tmp_path):
    """training.sweep starts its cells at once; with MLFLOW_TRACKING_URI naming one new SQLite store, the first
    creates it (MLflow's migrations), the other waits instead of migrating the same tables at the same time."""
    import os
    import subprocess

    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": ""}
    starts = [subprocess.Popen([BIN / "python", "-c", STARTER, tmp_path, f"cell{i}"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [start.communicate(timeout=300) for start in starts]
    assert [start.returncode for start in starts] == [0, 0], [err[-2000:] for _, err in outputs]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cxr-nih")
    runs = client.search_runs([experiment.experiment_id])
    assert experiment.artifact_location == (tmp_path / "shared" / "mlartifacts").as_uri()  # beside the database
    assert sorted(run.info.run_name for run in runs) == ["cell0", "cell1"]
    assert {run.info.status for run in runs} == {"FAILED"}  # they never finished


def test_only_rank_0_tracks_and_register_needs_mlflow():
    args = argparse.Namespace(no_mlflow=False, register_model=None)
    worker = Single()
    worker.rank = 1  # a second rank: never touches MLflow
    assert isinstance(tracking.start(args, None, None, worker), tracking.NoTracking)
    with pytest.raises(SystemExit, match="--register-model needs MLflow"):
        tracking.start(argparse.Namespace(no_mlflow=True, register_model="m"), None, None, Single())
    assert tracking.metric_name("kt", "val", "auroc", "No Finding") == "kt/val/auroc/No Finding"
    assert tracking.metric_name("kt", "test", "auroc", "a(b)=c") == "kt/test/auroc/a_b__c"


def test_the_mlflow_run_id_column_joins_tables_written_before_it(tmp_path):
    """A results table from before the column gets it on the next append; its old rows read as null."""
    old_schema = pa.schema([field for field in RESULT_SCHEMA if field.name != "mlflow_run_id"])
    write_deltalake(str(tmp_path / "results"), pa.Table.from_pylist([{"run_id": "old", "label": "mean"}],
                                                                     schema=old_schema))
    write_results(str(tmp_path / "results"), [{"run_id": "new", "label": "mean", "mlflow_run_id": "abc"}])
    rows = read_results(str(tmp_path / "results")).set_index("run_id")
    assert rows.loc["new", "mlflow_run_id"] == "abc" and pd.isna(rows.loc["old", "mlflow_run_id"])
