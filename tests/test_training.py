"""train.py end to end on the real NIH partitions: one process, torchrun and horovodrun, Delta rows."""
import importlib.util

import pandas as pd
import pytest
import torch
from deltalake import DeltaTable

from conftest import BIN, NIH, run_cli
from cxr_pipeline.etl.sources.nih import LABEL_NAMES
from cxr_pipeline.training.evaluation.results import read_results

ROWS_PER_STAGE = 2 * (len(LABEL_NAMES) + 1)  # val and test, each label plus the mean


def train_args(dataset, tmp_path, *extra):
    return ["training/train.py", "--dataset", dataset, "--output-dir", tmp_path / "runs",
            "--results-table", tmp_path / "results", "--model", "small_cnn", "--weights", "none",
            "--epochs-kt", 1, "--epochs-finetune", 1, "--batch-size", 4, "--max-steps-per-epoch", 3, *extra]


def check_run(tmp_path, world_size, backend, results=None):
    results = read_results(str(tmp_path / "results")) if results is None else results
    assert len(results) == 2 * ROWS_PER_STAGE
    assert set(results["stage"]) == {"kt", "finetune"} and set(results["split"]) == {"val", "test"}
    assert (results["world_size"] == world_size).all() and (results["backend"] == backend).all()
    assert results["run_id"].nunique() == 1
    mean_rows = results[results["label"] == "mean"]
    assert len(mean_rows) == 4 and mean_rows["auroc"].between(0, 1).all()
    (run_dir,) = (tmp_path / "runs").iterdir()
    for name in ("config.yaml", "summary.csv", "best_kt.pth", "best_finetune.pth", "checkpoint.pth",
                 "predictions_finetune_test.csv", "roc_finetune_test.png", "training_curves.png"):
        assert (run_dir / name).exists(), name
    checkpoint = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert checkpoint["stage"] == "finetune" and {"model", "optimizer", "scheduler"} <= set(checkpoint)
    return results, run_dir


def test_single_process_two_stages_and_appends_to_delta(nih_dataset, tmp_path):
    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path))
    check_run(tmp_path, 1, "single")
    # A second run with the other training options: metadata fusion, augmentation, SGD, step drops.
    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path / "second", "--results-table", tmp_path / "results",
                                        "--model", "small_cnn+meta", "--augment", "default", "--optimizer", "sgd",
                                        "--lr-finetune", 0.01, "--schedule", "step", "--lr-step-epochs", 1,
                                        "--loss", "batch-weighted", "--epochs-finetune", 2, "--warmup-steps", 0))
    results = read_results(str(tmp_path / "results"))
    assert results["run_id"].nunique() == 2 and len(results) == 4 * ROWS_PER_STAGE  # appended, not overwritten
    assert len(DeltaTable(str(tmp_path / "results")).history()) == 4  # one version per stage of each run
    assert set(results["model"]) == {"small_cnn", "small_cnn+meta"}

    labelled = results[(results["label"] != "mean") & results["threshold"].notna()]
    assert len(labelled) > 0  # operating points chosen on val, applied to val and test
    confusion = labelled[["tp", "fp", "fn", "tn"]].sum(axis=1)
    assert (confusion == labelled["n_pos"] + labelled["n_neg"]).all()
    with_positives = labelled[labelled["n_pos"] > 0]
    assert (with_positives["recall"] - with_positives["tp"] / with_positives["n_pos"]).abs().max() < 1e-12
    assert labelled.loc[labelled["n_pos"] == 0, "recall"].isna().all()

    (second,) = (tmp_path / "second" / "runs").iterdir()
    page = (second / "report.html").read_text()
    assert all(run_id in page for run_id in results["run_id"].unique())  # compares the runs of the table
    # ROC curves and reliability diagrams of 2 stages x 2 splits, training curves
    assert page.count("<img src=\"data:image/png;base64,") == 9
    assert page.count("operating points</h2>") == 2 and page.count("calibration</h2>") == 2
    summary = pd.read_csv(second / "summary.csv")
    assert summary["val_loss"].gt(0).all() and summary["val_loss"].lt(float("inf")).all()  # val loss per epoch
    assert summary.loc[summary["stage"] == "finetune", "lr"].tolist() == pytest.approx([0.01, 0.001])


def test_predict_prints_probabilities_and_writes_overlays_for_a_fusion_model(nih_dataset, tmp_path):
    from cxr_pipeline.training.predict import main as predict

    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--model", "small_cnn+meta", "--stages", "finetune"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    images = sorted((NIH / "images").glob("*.png"))[:2]
    args = ["--checkpoint", str(run_dir / "best_finetune.pth"), "--overlay-dir", str(tmp_path / "overlays"),
            "--label", "Effusion", *map(str, images)]
    unknown = predict(args)
    known = predict([*args, "--age", "70", "--sex", "F", "--view-position", "PA"])
    assert known["path"].tolist() == list(map(str, images))
    labels = list(LABEL_NAMES)
    assert known[labels].ge(0).all().all() and known[labels].le(1).all().all()
    assert (known[labels] != unknown[labels]).any().any()  # the patient data reaches the model
    overlays = [tmp_path / "overlays" / f"{image.stem}_Effusion.png" for image in images]
    assert all(path.stat().st_size > 1000 for path in overlays)


def test_evaluate_command_reproduces_the_delta_rows_from_the_predictions_file(nih_dataset, tmp_path):
    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--stages", "kt"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    from cxr_pipeline.training.evaluate import main as evaluate

    report = evaluate(["--dataset", str(nih_dataset), "--split", "test",
                       "--predictions", str(run_dir / "predictions_kt_test.csv"), "--roc-png", str(tmp_path / "r.png")])
    stored = read_results(str(tmp_path / "results")).query("split == 'test'").set_index("label")
    for row in report:
        for column in ("auroc", "auroc_ci_low", "auroc_ci_high"):
            expected = stored.loc[row["label"], column]
            assert (row[column] is None and pd.isna(expected)) or abs(row[column] - expected) < 1e-6
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_evaluate_refuses_predictions_for_images_outside_the_split(nih_dataset, tmp_path):
    from cxr_pipeline.training.evaluate import main as evaluate

    pd.DataFrame({"image_id": ["not-an-image.png"], **{name: [0.5] for name in LABEL_NAMES}}).to_csv(
        tmp_path / "p.csv", index=False)
    with pytest.raises(SystemExit, match="not in this split"):
        evaluate(["--dataset", str(nih_dataset), "--split", "val", "--predictions", str(tmp_path / "p.csv")])


def test_resume_continues_from_the_checkpoint(nih_dataset, tmp_path):
    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--stages", "kt"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    out = run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--stages", "kt", "--epochs-kt", 2,
                                                "--resume", run_dir / "checkpoint.pth"))
    assert "kt epoch 2/2" in out.stderr and "kt epoch 1/2" not in out.stderr
    assert torch.load(run_dir / "checkpoint.pth", weights_only=True)["epoch"] == 2


def test_torchrun_two_ranks_gloo_with_bf16_and_channels_last(nih_dataset, tmp_path):
    """The default DDP path is covered by the TorchDistributor test below; this one runs the GPU switches."""
    run_cli(BIN / "torchrun", "--standalone", "--nproc_per_node", 2,  # --standalone: a free port, never a fixed one
            *train_args(nih_dataset, tmp_path, "--amp", "bf16", "--channels-last"))
    check_run(tmp_path, 2, "torch")


@pytest.mark.skipif(importlib.util.find_spec("horovod") is None,
                    reason="horovod is not installed: run `make install` (builds it, see install/horovod)")
def test_horovodrun_two_ranks_gloo_with_the_fp16_scaler(nih_dataset, tmp_path):
    """Plain Horovod training is covered by tests/test_faults.py; this run takes the AMP path, where the
    gradient scaler must unscale gradients already averaged across ranks (synchronize, then step)."""
    out = run_cli(BIN / "horovodrun", "-np", 2, "-H", "localhost:2", BIN / "python",
                  *train_args(nih_dataset, tmp_path, "--amp", "fp16"))
    _, run_dir = check_run(tmp_path, 2, "horovod")
    assert "2 horovod rank(s)" in out.stdout + out.stderr
    scaler = torch.load(run_dir / "checkpoint.pth", weights_only=True)["grad_scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] > 0  # steps went through the scaler

    refused = run_cli(BIN / "horovodrun", "-np", 1, "-H", "localhost:1", BIN / "python",
                      *train_args(nih_dataset, tmp_path / "cl", "--channels-last"), timeout=300, check=False)
    assert refused.returncode != 0 and "horovod/horovod#3491" in refused.stdout + refused.stderr


def test_torch_distributor_trains_publishes_through_spark_and_a_retry_resumes(nih_dataset, tmp_path,
                                                                               spark_catalog_env):
    """jobs/train_distributor.py, the Databricks entry point, with 2 processes on the driver: train.py writes no
    table, the driver writes the rows to a catalog table through Delta on Spark. The same task run again (a
    job retry: the same run id) continues from the run's checkpoint and replaces the run's rows."""
    table = "spark_catalog.default.auroc_results"  # the metastore's own schema (test_delta_engines makes one)
    command = [BIN / "python", "jobs/train_distributor.py", "--num-processes", 2, "--local-mode", "--results-table",
               table, "--", *train_args(nih_dataset, tmp_path)[1:], "--run-id", "job-42"]
    first = run_cli(*command, env=spark_catalog_env)
    assert f"wrote {2 * ROWS_PER_STAGE} AUROC rows of run job-42 to {table}" in first.stderr
    assert not (tmp_path / "results").exists()  # train.py's own --results-table: the driver wrote the catalog's
    location = tmp_path / "spark-catalog" / "warehouse" / "auroc_results"
    results, run_dir = check_run(tmp_path, 2, "torch", read_results(str(location), "deltalake"))
    retry = run_cli(*command, env=spark_catalog_env)
    assert f"{run_dir / 'checkpoint.pth'} exists: an earlier attempt of run job-42 stopped" in retry.stderr
    again = read_results(str(location), "deltalake")
    assert len(again) == len(results) and again["run_id"].unique().tolist() == ["job-42"]  # replaced, not added
    assert len(DeltaTable(str(location)).history()) == 2


def test_ensemble_of_the_best_epochs_averages_members_and_scores_like_a_model(nih_dataset, tmp_path):
    from cxr_pipeline.schema import read_dataset_spec
    from cxr_pipeline.training.ensemble import main as ensemble, score_checkpoint
    from cxr_pipeline.training.loop import checkpoints

    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--stages", "finetune", "--epochs-finetune", 3,
                                        "--keep-epochs", 2))
    (run_dir,) = (tmp_path / "runs").iterdir()
    kept = sorted(run_dir.glob("epoch_finetune_*.pth"))
    summary = pd.read_csv(run_dir / "summary.csv")
    best_two = summary.nlargest(2, "val_mean_auroc")["val_mean_auroc"].tolist()
    assert len(kept) == 2
    assert sorted(checkpoints.load(p)["val_mean_auroc"] for p in kept) == pytest.approx(sorted(best_two))

    members = [str(p) for p in kept] + [str(run_dir / "predictions_finetune_test.csv")]
    report = ensemble(["--dataset", str(nih_dataset), "--split", "test", "--output-dir", str(tmp_path / "ens"),
                       "--results-table", str(tmp_path / "results"), "--bootstrap", "100", *members])
    labels = list(LABEL_NAMES)
    written = pd.read_csv(tmp_path / "ens" / "predictions_ensemble_test.csv").set_index("image_id")
    averaged = written[labels]
    best = pd.read_csv(run_dir / "predictions_finetune_test.csv").set_index("image_id").loc[averaged.index, labels]
    spec = read_dataset_spec(nih_dataset)
    epochs = [score_checkpoint(p, nih_dataset, "test", spec, 8).loc[averaged.index] for p in kept]
    assert ((averaged - (epochs[0] + epochs[1] + best) / 3).abs().to_numpy().max()) < 1e-5
    rows = read_results(str(tmp_path / "results")).query("model == 'ensemble'")
    assert len(rows) == len(LABEL_NAMES) + 1 and rows.set_index("label").loc["mean", "auroc"] == report[-1]["auroc"]
    assert set(written["run_id"]) == set(rows["run_id"])  # the averaged predictions name the ensemble's run
    from cxr_pipeline.training.report import main as write_report  # the ensemble is the table's latest run

    page = write_report(["--table", str(tmp_path / "results")]).read_text()
    assert "ensemble &mdash; test" in page and rows["run_id"].iloc[0] in page

    other = tmp_path / "other.csv"
    best.iloc[:-1].reset_index().to_csv(other, index=False)
    with pytest.raises(SystemExit, match="not the same"):
        ensemble(["--dataset", str(nih_dataset), "--split", "test", "--output-dir", str(tmp_path / "ens2"),
                  members[-1], str(other)])
