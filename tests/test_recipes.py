"""Each report's recipe (conf/recipes/) runs: its ETL and one short training step per stage on
real data (CheXpert: the real label rows with generated pixels, the shared data has no CheXpert
images), at a tiny size and with no downloaded weights, so recipes cannot rot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import (BIN, KERMANY, NIH, ROOT, chexpert_table, current, require, run_cli, spark_etl,
                      write_chexpert_images)
from cxr_pipeline.training.loop import checkpoints

RECIPES = sorted((ROOT / "conf" / "recipes").glob("*.yaml"))
SIZE = 64


def nih_root(tmp_path: Path) -> list:
    return ["--data-root", require(NIH / "images").parent, "--labels-csv", NIH / "Data_Entry_sample.csv"]


def chexpert_root(tmp_path: Path) -> list:
    root = tmp_path / "chexpert"
    table = chexpert_table().iloc[:40]
    (root / "CheXpert-v1.0-small").mkdir(parents=True)
    table.to_csv(root / "CheXpert-v1.0-small" / "train.csv", index=False)
    write_chexpert_images(root, table["Path"])
    return ["--data-root", root]


def pneumonia_root(tmp_path: Path) -> list:
    """A few real images of each class of train/ and test/, laid out as the download is."""
    root = tmp_path / "chest_xray"
    for split, count in (("train", 30), ("test", 4)):
        for label in ("NORMAL", "PNEUMONIA"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for image in sorted((require(KERMANY).parent / split / label).glob("*.jpeg"))[:count]:
                (folder / image.name).symlink_to(image)
    return ["--data-root", root]


DATA = {"nih": nih_root, "chexpert": chexpert_root, "pneumonia": pneumonia_root}


def test_there_is_one_recipe_per_report_and_each_says_what_it_reproduces_and_changes():
    assert [path.name[:9] for path in RECIPES] == [f"report00{n}" for n in range(5)]
    for path in RECIPES:
        text = path.read_text()
        seed = next((ROOT.parent / "shared" / "seeds").glob(f"{path.name[6:9]}_*.txt"), None)
        assert f"Report {path.name[6:9]}" in text and "Reproduces" in text and "Deviations:" in text, path.name
        assert seed is None or f"seeds/{path.name[6:9]}_" in text, path.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_runs_its_etl_and_one_step_per_stage_on_real_data(recipe, tmp_path):
    config = yaml.safe_load(recipe.read_text())
    dataset = tmp_path / "dataset"
    spark_etl("--config", recipe, *DATA[config["etl"]["source"]](tmp_path), "--output", dataset, "--size", SIZE,
              "--rows-per-file", 8)
    summary = json.loads((current(dataset) / "_etl_summary.json").read_text())
    assert summary["rows_read"] == sum(summary["rows_written"].values()) + summary["rows_quarantined"] + \
        summary["rows_left_out_by_subset"]
    train = config["train"]
    evaluation = ["--eval-crop", str(SIZE - 8)] if train.get("eval-crop") else []
    run_cli(BIN / "python", "training/train.py", "--config", recipe, "--dataset", dataset,
            "--output-dir", tmp_path / "runs", "--results-table", tmp_path / "results", "--weights", "none",
            "--epochs-kt", "1", "--epochs-finetune", "1", "--max-steps-per-epoch", "1", "--batch-size", "4",
            "--bootstrap", "10", "--run-id", "recipe", "--backend", "single", *evaluation)
    run = tmp_path / "runs" / "recipe"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("model", "optimizer", "loss", "normalisation", "augment", "oversample", "lr_finetune"):
        if key.replace("_", "-") in train:
            assert resolved[key] == train[key.replace("_", "-")], key
    for stage in train["stages"].split(","):
        assert checkpoints.load(run / f"best_{stage}.pth")["model_name"] == train["model"]


def test_report001_recipe_holds_its_table_as_a_sweep():
    from cxr_pipeline.config import parse_args
    from cxr_pipeline.training.sweep import build_parser

    recipe = ROOT / "conf" / "recipes" / "report001_nih_kt_finetune.yaml"
    args = parse_args(build_parser(), "sweep", ["--config", str(recipe)])
    assert sorted(args.dataset) == [256, 512] and sorted(args.model) == ["densenet121", "resnet50"]
    assert args.stages == "kt,finetune"
