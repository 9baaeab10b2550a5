"""training/sweep.py (the command), training/loop/grid.py (the cells and their train.py runs) and
training/evaluation/comparison.py (the table): a real tiny grid over the NIH ETL output, one size of it failing,
compared in one table."""
import html
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import BIN, run_cli
from cxr_pipeline.etl.sources.nih import LABEL_NAMES
from cxr_pipeline.training import sweep
from cxr_pipeline.training.evaluate import main as evaluate
from cxr_pipeline.training.evaluation.results import read_results
from cxr_pipeline.training.loop import grid

MODELS = ["small_cnn", "resnet18"]
STAGES = ["kt", "finetune"]


def write_config(tmp_path: Path, good: Path, missing: Path) -> Path:
    """A 'sweep:' section (grid, outputs) and a 'train:' section that the sweep hands to every train.py."""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "sweep": {"dataset": {64: str(good), 32: str(missing)}, "model": MODELS, "parallel": 1,
                  "output-dir": str(tmp_path / "sweeps"), "results-table": str(tmp_path / "results")},
        "train": {"weights": "none", "epochs-kt": 1, "epochs-finetune": 1, "batch-size": 4, "bootstrap": 50},
    }))
    return config


def test_a_grid_is_trained_compared_in_one_table_and_a_failed_cell_is_reported(nih_dataset, tmp_path):
    """2 models x 2 sizes x 2 stages. Only one small ETL output exists (64 px); the 32 px cells point at a folder
    that does not, so they fail, are named with their logs, and the others still complete."""
    missing = tmp_path / "no_etl_output_here"
    config = write_config(tmp_path, nih_dataset, missing)
    result = run_cli(BIN / "python", "-m", "training.sweep", "--config", config, "--sweep-id", "tiny", "--",
                     "--max-steps-per-epoch", 1, check=False)
    assert result.returncode == 1, result.stderr[-4000:]
    sweep_dir = tmp_path / "sweeps" / "tiny"
    table = pd.read_csv(sweep_dir / "comparison.csv")
    assert list(zip(table["model"], table["image_size"], table["stage"])) == [
        (model, size, stage) for model in MODELS for size in (32, 64) for stage in STAGES]

    failed = table[table["image_size"] == 32]
    assert failed["status"].eq("failed (exit 1)").all() and failed["test_mean_auroc"].isna().all()
    assert failed["error"].str.contains(f"no Parquet files under {missing}").all()
    for log in failed["log"].unique():
        assert "no Parquet files under" in Path(log).read_text() and f"log {log}" in result.stderr
        assert Path(log).parent == sweep_dir / "logs"

    done = table[table["image_size"] == 64]
    assert done["status"].eq("ok").all() and (table["run_wall_s"] > 0).all()
    for row in done.itertuples():
        # each figure against the run's own outputs, read here without the sweep's code
        run_dir = Path(row.run_dir)
        assert run_dir == sweep_dir / "runs" / f"tiny-{row.model}-64"
        rows = pd.read_parquet(run_dir / "auroc_rows.parquet").query("stage == @row.stage")  # the run's own rows
        assert not (run_dir / "results_delta").exists()  # the cells write no table: the sweep publishes
        mean = rows[rows["label"] == "mean"].set_index("split")
        assert (row.test_mean_auroc, row.test_mean_auroc_ci_low, row.test_mean_auroc_ci_high) == pytest.approx(
            tuple(mean.loc["test", ["auroc", "auroc_ci_low", "auroc_ci_high"]]))
        assert row.val_mean_auroc == pytest.approx(mean.loc["val", "auroc"])
        labels = rows[(rows["split"] == "test") & (rows["label"] != "mean")].set_index("label")["auroc"]
        assert list(labels.index) == list(LABEL_NAMES)
        np.testing.assert_allclose([getattr(row, f"test_auroc_{label}") for label in LABEL_NAMES], labels,
                                   equal_nan=True)
        epochs = pd.read_csv(run_dir / "summary.csv").query("stage == @row.stage")
        assert row.epochs == len(epochs) == 1
        assert row.train_images_per_s == pytest.approx(epochs["images_per_second"].mean())
        scored = evaluate(["--dataset", str(nih_dataset), "--split", "test", "--bootstrap", "10",
                           "--predictions", str(run_dir / f"predictions_{row.stage}_test.csv")])
        assert next(r["auroc"] for r in scored if r["label"] == "mean") == pytest.approx(row.test_mean_auroc, abs=1e-6)
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the config and the flags after -- arrived
        assert (resolved["weights"], resolved["bootstrap"], resolved["max_steps_per_epoch"]) == ("none", 50, 1)
        assert (resolved["backend"], resolved["run_id"], resolved["model"]) == ("single", run_dir.name, row.model)

    shared = read_results(str(tmp_path / "results"))  # the Delta rows of the sweep: its id prefixes the run ids
    assert set(shared["run_id"]) == {"tiny-small_cnn-64", "tiny-resnet18-64"}
    assert len(shared) == len(MODELS) * len(STAGES) * 2 * (len(LABEL_NAMES) + 1)  # val and test, labels + mean

    page = (sweep_dir / "comparison.html").read_text()
    assert "test mean AUROC [95% CI]" in page and "val mean AUROC (val)" in page
    assert "runs/tiny-resnet18-64/report.html" in page and html.escape(failed["log"].iloc[0]) in page

    # the Databricks job's compare task: the same table from the run folders alone
    again = run_cli(BIN / "python", "-m", "training.sweep", "--config", config, "--sweep-id", "tiny",
                    "--compare-only", check=False)
    assert again.returncode == 1 and "tiny-resnet18-32 no results" in again.stderr
    rebuilt = pd.read_csv(sweep_dir / "comparison.csv")
    figures = [column for column in table if column.startswith(("test_", "val_"))]
    pd.testing.assert_frame_equal(rebuilt[figures + ["best_epoch", "epochs", "train_images_per_s"]],
                                  table[figures + ["best_epoch", "epochs", "train_images_per_s"]])
    assert rebuilt["status"].tolist() == ["no results"] * 2 + ["ok"] * 2 + ["no results"] * 2 + ["ok"] * 2


def test_flags_the_grid_sets_or_train_py_refuses_stop_the_sweep_before_it_trains(tmp_path):
    grid_flags = ["--dataset", f"64={tmp_path}", "--output-dir", str(tmp_path / "sweeps"), "--model", "small_cnn"]
    with pytest.raises(SystemExit, match="--model is set by the sweep's --model.*--run-id is set by the sweep's"):
        sweep.main([*grid_flags, "--", "--model", "resnet18", "--run-id", "mine"])
    for mistake in ([*grid_flags, "--", "--epochs-kt", "one"], [*grid_flags, "no_such_model"]):  # as train.py would say
        with pytest.raises(SystemExit) as refused:
            sweep.main(mistake)
        assert refused.value.code == 2
    assert not (tmp_path / "sweeps").exists()


def test_the_command_line_replaces_the_config_lists_and_sizes_come_ascending(tmp_path):
    config = write_config(tmp_path, tmp_path / "a", tmp_path / "b")
    from_file = sweep.resolve(["--config", str(config), "--sweep-id", "s"])
    assert from_file.model == MODELS
    assert [(cell.model, cell.size) for cell in grid.make_grid(from_file)] == [
        ("small_cnn", 32), ("small_cnn", 64), ("resnet18", 32), ("resnet18", 64)]
    flags = sweep.resolve(["--config", str(config), "--model", "resnet50", "--model", "densenet121",
                           "--dataset", "512=/data/nih_512", "256=/data/nih_256"])
    assert flags.model == ["resnet50", "densenet121"] and flags.dataset == ["512=/data/nih_512", "256=/data/nih_256"]
    assert [cell.run_id.removeprefix(flags.sweep_id) for cell in grid.make_grid(flags)] == [
        "-resnet50-256", "-resnet50-512", "-densenet121-256", "-densenet121-512"]
    with pytest.raises(SystemExit, match="size 256 given twice"):
        sweep.resolve(["--dataset", "256=/a", "256=/b", "--model", "resnet50"])


def test_each_run_gets_a_gpu_of_its_own_or_a_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert grid.default_parallel([], 2) == 1 and grid.default_parallel([], 16) == 8
    assert grid.default_parallel(["2", "5"], 16) == 2
    assert [grid.run_environment(slot, 4, ["2", "5"], 16) for slot in range(4)] == [
        {"CUDA_VISIBLE_DEVICES": gpu} for gpu in ("2", "5", "2", "5")]
    assert grid.run_environment(0, 1, [], 2) == {"OMP_NUM_THREADS": "2"}
    assert grid.run_environment(3, 4, [], 16) == {"OMP_NUM_THREADS": "4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert grid.run_environment(0, 4, [], 16) == {}  # the user's setting stands


def test_a_run_past_its_timeout_is_stopped_and_counted_as_failed(tmp_path):
    code = sweep.main(["--dataset", f"64={tmp_path / 'none'}", "--model", "small_cnn", "--sweep-id", "slow",
                       "--output-dir", str(tmp_path), "--results-table", str(tmp_path / "results"), "--parallel", "1",
                       "--run-timeout", "0.5"])
    table = pd.read_csv(tmp_path / "slow" / "comparison.csv")
    assert code == 1 and table["status"].eq("timed out").all() and table["run_wall_s"].lt(10).all()
    assert not (tmp_path / "results").exists()  # nothing to publish
