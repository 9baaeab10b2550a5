"""The MLflow model (training/serving/mlflow_model.py) and batch scoring on Spark (jobs/score.py): a checkpoint
logged and registered, reloaded, and scoring real NIH PNGs, a pediatric pneumonia JPEG and a DICOM file, by path and by
bytes, as training.predict does; the Spark job on local[2] writing one Delta row per image and model version,
unreadable files included with their reason, and adding nothing when run again."""
import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from deltalake import DeltaTable

from conftest import BIN, DICOM, KERMANY, NIH, require, run_cli
from cxr_pipeline.etl.images import decode_resize
from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.models.registry import build_model
from cxr_pipeline.training.predict import main as predict
from cxr_pipeline.training.serving.predictions import SCORED_AT, columns, table_column

MODEL_NAME = "cxr-score-test"


@pytest.fixture(scope="module")
def logged(nih_dataset, tmp_path_factory):
    """A small_cnn checkpoint shaped like train.py's (calibrated, thresholds at an operating point), logged as
    the pyfunc model in a run of a local MLflow store and registered as version 1."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    spec = read_dataset_spec(nih_dataset)
    torch.manual_seed(0)
    model = build_model("small_cnn", spec.num_labels, "none", spec.image_size)
    checkpoint = folder / "best_finetune.pth"
    states = [{"method": "platt", "a": 1.5, "b": -0.3}] * spec.num_labels
    checkpoints.save({"model": model.state_dict(), "stage": "finetune", "epoch": 1, "val_mean_auroc": 0.5,
                      "model_name": "small_cnn", "dataset_spec": spec.to_json(), "calibration": states,
                      "thresholds": [0.55] * (spec.num_labels - 1) + [None], "operating_point": "sens>=0.95"},
                     checkpoint)
    store = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        from cxr_pipeline.training.serving import mlflow_model

        experiment = mlflow.MlflowClient().create_experiment("score-test", (folder / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow_model.log_model(checkpoint, registered_model_name=MODEL_NAME)
        yield {"store": store, "checkpoint": checkpoint, "spec": spec, "info": info}


def images(tmp_path, copy=False):
    """Real images of three kinds and two broken files, in one folder (links to the shared data, or `copy`: copies,
    for the model, which reads no path leading out of the folder it is allowed)."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    chosen = [*sorted(require(NIH / "images").glob("*.png"))[:4], *sorted(require(KERMANY).rglob("*.jpeg"))[:2],
              sorted(require(DICOM).glob("*.dcm"))[0]]
    for path in chosen:
        if copy:
            shutil.copy(path, folder / path.name)
        else:
            (folder / path.name).symlink_to(path)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpeg").write_bytes(b"")
    return folder


def test_the_registered_model_scores_paths_and_bytes_as_predict_does(logged, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["store"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    spec = logged["spec"]
    assert [column.name for column in model.metadata.get_input_schema().inputs] == ["path", "content", "pixels_u8"]
    assert model.metadata.saved_input_example_info is not None  # a synthetic PNG, no patient's pixels
    from cxr_pipeline.training.serving.mlflow_model import cached_model

    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path / "model"))
    assert cached_model(local) is cached_model(local)  # what each Spark worker does: one load per process
    folder = images(tmp_path, copy=True)
    paths = sorted(str(path) for path in folder.iterdir()) + [str(tmp_path / "gone.png")]
    expected = predict(["--checkpoint", str(logged["checkpoint"]), *paths])
    monkeypatch.setenv("CXR_MODEL_PATH_ROOT", str(tmp_path))  # the model reads paths below it only
    by_path = model.predict(pd.DataFrame({"path": paths}))
    labels = list(spec.label_names)
    assert list(by_path.columns) == list(expected.columns) and by_path["image_id"].tolist() == paths
    assert (by_path["checkpoint_sha256"] == expected["checkpoint_sha256"]).all() and by_path["model_uri"].isna().all()
    assert np.array_equal(by_path[labels].to_numpy(float), expected[labels].to_numpy(float), equal_nan=True)
    decisions = [f"{label}_positive" for label in labels]
    assert by_path[decisions].astype(str).equals(expected[decisions].astype(str))
    # the same reason (Pillow's messages name the address of its buffer, which differs between calls)
    assert (by_path["error"].str.split(":").str[0] == expected["error"].str.split(":").str[0]).all()
    errors = dict(zip((p.rsplit("/", 1)[-1] for p in paths), by_path["error"]))
    assert errors["broken.png"].startswith("not_an_image") and errors["empty.jpeg"].startswith("empty_file")
    assert errors["gone.png"].startswith("image_missing") and sum(e == "" for e in errors.values()) == 7
    assert by_path[f"{labels[-1]}_positive"].isna().all()  # no threshold for that label: no decision

    contents = [open(path, "rb").read() for path in paths[:-1]] + [None]
    by_bytes = model.predict(pd.DataFrame({"content": contents}))
    readable = by_path["error"] == ""
    assert np.array_equal(by_bytes.loc[readable, labels].to_numpy(float), by_path.loc[readable, labels].to_numpy(float))
    assert by_bytes["error"].iloc[-1].startswith("no_input")
    stored = [decode_resize(c, spec.image_size, spec.decoder).tobytes() for c, ok in zip(contents, readable) if ok]
    by_pixels = model.predict(pd.DataFrame({"pixels_u8": stored + [b"\x00" * 7]}))
    assert np.allclose(by_pixels[labels].to_numpy(float)[:-1], by_path.loc[readable, labels].to_numpy(float),
                       atol=1e-9)
    assert by_pixels["error"].iloc[-1].startswith("wrong_size")


def test_training_predict_the_mlflow_model_and_the_scores_table_write_one_schema(logged, nih_dataset, tmp_path,
                                                                                 monkeypatch):
    """One model, four writers: train.py's predictions CSV, predict --output, the MLflow model's output and the
    rows jobs/score.py writes (the Spark jobs below check the table holds those columns) have the same columns,
    and the two files of one checkpoint the same scores, decisions and identity."""
    import mlflow

    from cxr_pipeline.jobs.score_executors import table_rows
    from cxr_pipeline.training.evaluation.gathered import Predictions
    from cxr_pipeline.training.loop.distributed import Single
    from cxr_pipeline.training.loop.outputs import RunOutputs

    run_dir = tmp_path / "run-7"  # a run folder as train.py leaves it: the best checkpoint names its run
    run_dir.mkdir()
    checkpoints.save({**checkpoints.load(logged["checkpoint"]), "run_id": "run-7", "dataset_version": "v1"},
                     run_dir / "best_finetune.pth")
    spec, labels = logged["spec"], list(logged["spec"].label_names)
    predicted = predict(["--checkpoint", str(run_dir / "best_finetune.pth"), str(nih_dataset), "--split", "test",
                         "--output", str(tmp_path / "predict.csv")])
    checkpoint = checkpoints.load(run_dir / "best_finetune.pth")
    outputs = RunOutputs(argparse.Namespace(run_id="run-7", dataset_version="v1"), Single(), spec, run_dir, [], None)
    outputs.save_predictions("finetune", "test", Predictions(predicted["image_id"].tolist(), [],
                                                             predicted[labels].to_numpy(), np.empty(0)),
                             checkpoint["thresholds"])
    trained = pd.read_csv(run_dir / "predictions_finetune_test.csv")
    from_predict = pd.read_csv(tmp_path / "predict.csv")
    assert list(trained.columns) == list(from_predict.columns) == columns(labels)
    same = [name for name in columns(labels) if name != SCORED_AT]
    pd.testing.assert_frame_equal(trained[same], from_predict[same])
    assert set(trained["run_id"]) == {"run-7"} and set(trained["dataset_version"]) == {"v1"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["store"])
    monkeypatch.setenv("CXR_MODEL_PATH_ROOT", str(NIH / "images"))
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    images = pd.DataFrame({"image_id": ["a.png", "b.png"],
                           "path": [str(path) for path in sorted(require(NIH / "images").glob("*.png"))[:2]]})
    served = model.predict(images[["path"]])
    assert list(served.columns) == columns(labels)
    table = table_rows(served, images, f"models:/{MODEL_NAME}/1", labels)  # NIH's label names suit Delta as they are
    assert [*table.columns, SCORED_AT] == columns(labels, table=True) == columns(labels)
    assert table["image_id"].tolist() == ["a.png", "b.png"] and set(table["model_uri"]) == {f"models:/{MODEL_NAME}/1"}


def test_spark_job_scores_each_image_once_per_model_version(logged, tmp_path):
    folder = images(tmp_path)
    table = tmp_path / "scores"
    env = {"MLFLOW_TRACKING_URI": logged["store"]}
    score = [BIN / "python", "jobs/score.py", "--master", "local[2]", "--model-uri", f"models:/{MODEL_NAME}/latest",
             "--images", folder, "--table", table, "--batch-size", 3]
    run_cli(*score, env=env)
    rows = DeltaTable(str(table)).to_pandas()
    assert list(rows.columns) == columns(logged["spec"].label_names, table=True)  # training/serving/predictions.py's
    rows = rows.set_index("image_id").sort_index()
    assert len(rows) == 9 and set(rows["model_uri"]) == {f"models:/{MODEL_NAME}/1"}  # `latest` pinned
    assert set(rows["checkpoint_sha256"]) == {checkpoints.recorded_sha256(logged["checkpoint"])}
    assert rows.loc["broken.png", "error"].startswith("not_an_image")
    assert rows.loc["empty.jpeg", "error"].startswith("empty_file")
    assert (rows.drop(index=["broken.png", "empty.jpeg"])["error"] == "").all()
    expected = predict(["--checkpoint", str(logged["checkpoint"]), str(folder)]).set_index("image_id").sort_index()
    labels = list(logged["spec"].label_names)
    # float32 kernels differ by ~3e-8 between batch sizes and thread counts (batches of 3 here, of 32 in predict)
    assert np.allclose(rows[labels].to_numpy(float), expected[labels].to_numpy(float), atol=1e-6, equal_nan=True)
    decisions = [f"{label}_positive" for label in labels]
    assert (rows[decisions].fillna(-1) == expected[decisions].astype(float).fillna(-1)).all().all()
    assert rows["scored_at"].notna().all() and (rows["path"] == [str(folder / i) for i in rows.index]).all()

    shutil.copy(sorted(NIH.joinpath("images").glob("*.png"))[10], folder / "arrived_later.png")
    score = [BIN / "cxr-score", *score[2:]]  # the installed command runs the same job
    run_cli(*score, env=env)  # the same model again: only the new image is scored
    again = DeltaTable(str(table))
    after = again.to_pandas()
    assert len(after) == 10 and after["image_id"].is_unique and "arrived_later.png" in set(after["image_id"])
    assert [entry["operation"] for entry in again.history()] == ["WRITE", "WRITE"]
    assert after.set_index("image_id").loc[rows.index, "scored_at"].equals(rows["scored_at"])  # untouched
    third = run_cli(*score, env=env)  # nothing new: no Spark, no write
    assert "nothing to score" in third.stderr and DeltaTable(str(table)).version() == again.version()


def test_spark_job_scores_an_etl_dataset_like_predict(logged, nih_dataset, tmp_path):
    table = tmp_path / "scores"
    run_cli(BIN / "python", "jobs/score.py", "--master", "local[2]", "--model-uri", f"models:/{MODEL_NAME}/1",
            "--dataset", nih_dataset, "--split", "test", "--table", table, env={"MLFLOW_TRACKING_URI": logged["store"]})
    rows = DeltaTable(str(table)).to_pandas().set_index("image_id").sort_index()
    expected = predict(["--checkpoint", str(logged["checkpoint"]), str(nih_dataset), "--split", "test"])
    expected = expected.set_index("image_id").sort_index()
    labels = list(logged["spec"].label_names)
    assert list(rows.index) == list(expected.index) and (rows["path"] == expected["path"]).all()
    assert np.abs(rows[labels].to_numpy(float) - expected[labels].to_numpy(float)).max() < 1e-6


def test_a_batch_that_fails_is_scored_row_by_row_and_bad_rows_get_a_reason():
    from cxr_pipeline.jobs.score_executors import predict_or_explain

    class Fussy:
        def predict(self, frame, params=None):
            if (frame["path"] == "poison").any():
                raise RuntimeError("decoder crashed")
            return pd.DataFrame({"A": [0.5] * len(frame), "error": [""] * len(frame)}, index=frame.index)

    scored = predict_or_explain(Fussy(), pd.DataFrame({"path": ["a", "poison", "b"]}), batch_size=3)
    assert scored["A"].tolist()[::2] == [0.5, 0.5] and np.isnan(scored["A"].iloc[1])
    assert scored["error"].tolist() == ["", "scoring_failed: RuntimeError: decoder crashed", ""]
    assert table_column("No Finding") == "No_Finding" and table_column("Pleural_Thickening") == "Pleural_Thickening"


def test_executors_read_the_files_and_give_the_model_bytes_with_predicts_reasons_for_unread_ones(tmp_path):
    """The model reads no paths (training/serving/mlflow_model.py): jobs/score.py's executors read each file and
    pass its bytes; a missing or unreadable file goes as nothing, its reason the one training.predict gives."""
    from cxr_pipeline.jobs.score_executors import model_input
    from cxr_pipeline.schema import DatasetSpec
    from cxr_pipeline.training.serving.scorer import read_batches

    image = sorted(require(NIH / "images").glob("*.png"))[0]
    (tmp_path / "a_folder.png").mkdir()
    paths = [str(image), str(tmp_path / "gone.png"), str(tmp_path / "a_folder.png")]
    batch = pd.DataFrame({"image_id": ["a", "b", "c"], "path": paths}, index=[7, 8, 9])
    frame, unread = model_input(batch, "path")
    assert list(frame.columns) == ["content"] and list(frame.index) == list(unread.index) == [7, 8, 9]
    assert frame["content"].iloc[0] == image.read_bytes() and frame["content"].iloc[1:].isna().all()
    _, _, _, errors = next(read_batches([(p, Path(p)) for p in paths], DatasetSpec("x", ("A",), 32), 8))
    assert unread.tolist() == ["", errors[1], errors[2]]
    assert errors[1].startswith("image_missing") and errors[2].startswith("unreadable_file")
    pixels = pd.DataFrame({"pixels_u8": [b"\x00"]}, index=[3])
    as_stored, no_errors = model_input(pixels, "pixels_u8")  # ETL rows go as they are
    assert as_stored.equals(pixels) and no_errors.tolist() == [""]


def test_spark_job_merges_through_delta_on_spark_into_a_catalog_table_and_adds_nothing_when_rerun(
        logged, tmp_path, spark_catalog_env):
    """The Databricks path: --table catalog.schema.table, so the default engine is delta-spark and the rows are
    MERGEd on (image_id, model_uri) from the executors. A rerun with one new image and --rescore-errors MERGEs:
    it inserts the new image's row, replaces the two error rows, and adds nothing for the images already
    scored. Each run appends its shift-monitor rows to a catalog table the same way (flagged for its unreadable
    share; --monitor-warn-only lets the job succeed). delta-rs reads both tables Spark wrote, by their locations
    in the warehouse."""
    folder = images(tmp_path)
    name = "spark_catalog.default.image_scores"  # the metastore's own schema (test_delta_engines makes one)
    env = {"MLFLOW_TRACKING_URI": logged["store"], **spark_catalog_env}
    score = [BIN / "python", "jobs/score.py", "--master", "local[2]", "--model-uri", f"models:/{MODEL_NAME}/1",
             "--images", folder, "--table", name, "--batch-size", 4,
             "--monitor-table", "spark_catalog.default.score_monitor", "--monitor-warn-only"]
    first = run_cli(*score, env=env)
    assert "rows added 9" in first.stderr
    warehouse = tmp_path / "spark-catalog" / "warehouse"
    watched = DeltaTable(str(warehouse / "score_monitor")).to_pandas()
    assert sorted(watched["label"]) == sorted(logged["spec"].label_names)
    assert (watched["n_images"] == 9).all() and (watched["n_unreadable"] == 2).all() and watched["flagged"].all()
    assert str(watched["scored_at"].dt.tz) == "UTC" and watched["scored_at"].nunique() == 1
    shutil.copy(sorted(NIH.joinpath("images").glob("*.png"))[10], folder / "arrived_later.png")
    second = run_cli(*score, "--rescore-errors", env=env)
    assert "rows added 1, earlier error rows replaced 2, rows of this model kept as they were 7" in second.stderr
    assert DeltaTable(str(warehouse / "score_monitor")).to_pandas()["scored_at"].nunique() == 2
    table = DeltaTable(str(warehouse / "image_scores"))
    rows = table.to_pandas()
    assert len(rows) == 10 and rows["image_id"].is_unique and set(rows["model_uri"]) == {f"models:/{MODEL_NAME}/1"}
    assert rows.set_index("image_id").loc["broken.png", "error"].startswith("not_an_image")
    assert [entry["operation"] for entry in table.history()][::-1] == ["CREATE TABLE AS SELECT", "MERGE"]


def test_scoring_before_any_version_carries_the_alias_says_so_and_succeeds(logged, tmp_path):
    """A new deployment: the nightly job runs before anyone promoted a version. It must not fail the schedule
    every night, and must say plainly what to do; nothing is written."""
    folder = images(tmp_path)
    result = run_cli(BIN / "python", "jobs/score.py", "--model-uri", f"models:/{MODEL_NAME}@champion",
                     "--images", folder, "--table", tmp_path / "scores",
                     env={"MLFLOW_TRACKING_URI": logged["store"]})
    assert f"no version of '{MODEL_NAME}' carries the alias 'champion' yet" in result.stderr
    assert "set_registered_model_alias" in result.stderr and not (tmp_path / "scores").exists()
    missing = run_cli(BIN / "python", "jobs/score.py", "--model-uri", "models:/never-registered@champion",
                      "--images", folder, "--table", tmp_path / "scores", env={"MLFLOW_TRACKING_URI": logged["store"]})
    assert "no version of 'never-registered'" in missing.stderr
