"""train.py end to end on the real NIH partitions: one process, torchrun and horovodrun, Delta rows."""
import importlib.util

import pandas as pd
import pytest
import torch
from deltalake import DeltaTable

from conftest import BIN, run_cli
from etl.sources.nih import LABEL_NAMES
from training.results import read_results

ROWS_PER_STAGE = 2 * (len(LABEL_NAMES) + 1)  # val and test, each label plus the mean


def train_args(dataset, tmp_path, *extra):
    return ["training/train.py", "--dataset", dataset, "--output-dir", tmp_path / "runs",
            "--results-table", tmp_path / "results", "--model", "small_cnn", "--weights", "none",
            "--epochs-kt", 1, "--epochs-finetune", 1, "--batch-size", 4, "--max-steps-per-epoch", 3, *extra]


def check_run(tmp_path, world_size, backend):
    results = read_results(str(tmp_path / "results"))
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
    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path / "second", "--results-table", tmp_path / "results"))
    results = read_results(str(tmp_path / "results"))
    assert results["run_id"].nunique() == 2 and len(results) == 4 * ROWS_PER_STAGE  # appended, not overwritten
    assert len(DeltaTable(str(tmp_path / "results")).history()) == 4  # one version per stage of each run


def test_evaluate_command_reproduces_the_delta_rows_from_the_predictions_file(nih_dataset, tmp_path):
    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--stages", "kt"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    from training.evaluate import main as evaluate

    report = evaluate(["--dataset", str(nih_dataset), "--split", "test",
                       "--predictions", str(run_dir / "predictions_kt_test.csv"), "--roc-png", str(tmp_path / "r.png")])
    stored = read_results(str(tmp_path / "results")).query("split == 'test'").set_index("label")
    for row in report:
        for column in ("auroc", "auroc_ci_low", "auroc_ci_high"):
            expected = stored.loc[row["label"], column]
            assert (row[column] is None and pd.isna(expected)) or abs(row[column] - expected) < 1e-6
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_evaluate_refuses_predictions_for_images_outside_the_split(nih_dataset, tmp_path):
    from training.evaluate import main as evaluate

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


def test_torchrun_two_ranks_gloo(nih_dataset, tmp_path):
    run_cli(BIN / "torchrun", "--nproc_per_node", 2, "--master_port", 29531, *train_args(nih_dataset, tmp_path))
    check_run(tmp_path, 2, "torch")


@pytest.mark.skipif(importlib.util.find_spec("horovod") is None,
                    reason="horovod is not installed: run `make install` (builds it, see install/horovod)")
def test_horovodrun_two_ranks_gloo(nih_dataset, tmp_path):
    out = run_cli(BIN / "horovodrun", "-np", 2, "-H", "localhost:2", BIN / "python", *train_args(nih_dataset, tmp_path))
    results, _ = check_run(tmp_path, 2, "horovod")
    assert "2 horovod rank(s)" in out.stdout + out.stderr


def test_torch_distributor_local_mode_runs_the_same_training(nih_dataset, tmp_path):
    """jobs/train_distributor.py: the Databricks entry point, 2 processes on the driver."""
    run_cli(BIN / "python", "jobs/train_distributor.py", "--num-processes", 2, "--local-mode", "--",
            *train_args(nih_dataset, tmp_path)[1:])
    check_run(tmp_path, 2, "torch")
