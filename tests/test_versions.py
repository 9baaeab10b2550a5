"""Datasets as versions (etl/versions.py): an ETL run adds an immutable version and makes it current in one
step, training resolves one version at its start and records it, and pruning keeps what a run may still read."""
import json
import os
import shutil
import subprocess
from datetime import timedelta

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import BIN, NIH, ROOT, run_cli, spark_etl
from cxr_pipeline.etl import versions
from cxr_pipeline.etl.hold_points import VARIABLE
from cxr_pipeline.training.evaluation.results import read_results
from cxr_pipeline.training.loop import checkpoints
from test_faults import hold_pipe, release, sha256, wait_for
from test_training import train_args


def add_version(root, committed, rows=1):
    """A committed version whose commit time is `committed` (the ETL's own commit, with a chosen clock)."""
    version, folder = versions.new_version(root)
    (folder / "split=train").mkdir(parents=True)
    path = versions.commit(root, version, {"rows_written": {"train": rows}})
    info = json.loads((path / versions.VERSION_FILE).read_text())
    (path / versions.VERSION_FILE).write_text(json.dumps({**info, "committed": committed.isoformat()}))
    return version


def test_prune_keeps_the_current_version_recent_ones_and_those_runs_recorded(tmp_path):
    now = versions.now_utc()
    root = tmp_path / "dataset"
    old, read, recent, current = (add_version(root, now - timedelta(days=days)) for days in (40, 30, 20, 5))
    reader = versions.Resolved(root, root / versions.VERSIONS / read, read)
    versions.record_reader(reader, "run-a")  # a run started now reads `read`
    assert versions.resolve(root).version == current
    kept = {v.id: versions.keep_reason(v, 14, now) for v in versions.list_versions(root, 14, now)}
    assert kept[current] == "current" and "run-a" in kept[read] and "within 14 days" in kept[recent]
    assert kept[old] is None  # superseded 30 days ago, no run recorded it
    assert versions.prune(root, 14, dry_run=True, now=now) == [old] and (root / versions.VERSIONS / old).exists()
    assert versions.prune(root, 14, now=now) == [old]
    assert sorted(v.id for v in versions.list_versions(root)) == sorted([read, recent, current])
    later = now + timedelta(days=60)  # the run's record and the window have passed: only the current one stays
    assert sorted(versions.prune(root, 14, now=later)) == sorted([read, recent])
    assert [v.id for v in versions.list_versions(root)] == [current]
    assert not list((root / versions.READERS).glob("*.json"))


def test_a_plain_dataset_folder_reads_as_it_is_and_a_new_version_leaves_it_until_pruned(nih_dataset, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(nih_dataset, plain, ignore=shutil.ignore_patterns(versions.VERSION_FILE))
    assert versions.resolve(plain) == versions.Resolved(plain.resolve(), plain.resolve(), None)
    new = add_version(plain, versions.now_utc())
    assert versions.resolve(plain).version == new
    listed = versions.list_versions(plain)
    assert [v.id for v in listed] == [versions.LEGACY, new] and listed[1].current
    assert (plain / "split=train").exists()  # a run that resolved the plain folder still reads it
    assert versions.prune(plain, now=versions.now_utc() + timedelta(days=30)) == [versions.LEGACY]
    assert sorted(p.name for p in plain.iterdir()) == [versions.CURRENT, versions.VERSIONS]


def test_versions_command_lists_and_prunes(tmp_path):
    root = tmp_path / "dataset"
    old = add_version(root, versions.now_utc() - timedelta(days=40), rows=7)
    new = add_version(root, versions.now_utc() - timedelta(days=20), rows=9)  # `old` stopped being current then
    listing = run_cli(BIN / "python", "-m", "etl.versions", "list", root).stdout
    assert f"{new}" in listing and "[current]" in listing and "train 9" in listing and "prunable" in listing
    assert run_cli(BIN / "python", "-m", "etl.versions", "prune", root, "--dry-run").stdout.strip() == \
        f"would remove: {old}"
    run_cli(BIN / "python", "-m", "etl.versions", "prune", root)
    assert [v.id for v in versions.list_versions(root)] == [new]


def test_etl_overwrite_while_a_run_trains_leaves_the_run_on_the_version_it_started_with(nih_dataset, tmp_path):
    root = tmp_path / "nih_64"
    shutil.copytree(nih_dataset.parent.parent, root)  # the fixture's dataset root: one version, current
    first = versions.resolve(root)
    files = {path.relative_to(first.path): sha256(path) for path in first.path.rglob("*") if path.is_file()}
    pipe = hold_pipe(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", VARIABLE: f"train:kt:1@{pipe}"}
    run = subprocess.Popen([str(a) for a in [BIN / "python", *train_args(root, tmp_path, "--stages", "kt",
                                                                          "--epochs-kt", 2, "--no-mlflow")]],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(pipe, run)  # epoch 1 done and saved; epoch 2 and the evaluations are still to read
    spark_etl("--source", "nih", "--data-root", NIH, "--labels-csv", NIH / "Data_Entry_sample.csv",
              "--output", root, "--size", 64, "--rows-per-file", 8, "--seed", 1, "--overwrite")
    second = versions.resolve(root)
    assert second.version != first.version
    release(pipe)
    output = run.communicate(timeout=600)[0].decode(errors="replace")
    assert run.returncode == 0, output[-3000:]

    assert {path.relative_to(first.path): sha256(path) for path in first.path.rglob("*")
            if path.is_file()} == files  # the version it read is still there, unchanged
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["dataset"], config["dataset_version"]) == (str(first.path), first.version)
    assert set(read_results(str(tmp_path / "results"))["dataset_version"]) == {first.version}
    assert checkpoints.load(run_dir / "best_kt.pth")["dataset_version"] == first.version
    shown = run_cli(BIN / "python", "-m", "training.show_results", "--table", tmp_path / "results").stdout
    assert f"ETL output {first.version}" in shown and first.version in (run_dir / "report.html").read_text()
    test_ids = {path: set(pq.read_table(path / "split=test", columns=["image_id"]).column(0).to_pylist())
                for path in (first.path, second.path)}
    assert test_ids[first.path] != test_ids[second.path]  # the new version splits patients differently
    assert set(pd.read_csv(run_dir / "predictions_kt_test.csv")["image_id"]) == test_ids[first.path]
    listed = {version.id: version for version in versions.list_versions(root)}
    assert listed[second.version].current and config["run_id"] in listed[first.version].readers


def test_only_complete_versions_are_read_and_a_missing_pointer_falls_back_to_the_newest(tmp_path):
    root = tmp_path / "dataset"
    older = add_version(root, versions.now_utc() - timedelta(days=1))
    newer = add_version(root, versions.now_utc())
    _, writing = versions.new_version(root)  # an ETL still writing: no _version.json yet
    (writing / "split=train").mkdir(parents=True)
    assert versions.resolve(root).version == newer
    assert [v.id for v in versions.list_versions(root)] == [older, newer]
    (root / versions.CURRENT).unlink()  # a store whose pointer replacement is not atomic, mid-replace
    assert versions.resolve(root).version == newer
    (root / versions.CURRENT).write_text(json.dumps({"version": "gone"}))
    with pytest.raises(FileNotFoundError, match="names version gone"):
        versions.resolve(root)


def test_a_version_held_back_is_kept_for_inspection_and_never_read(tmp_path):
    root = tmp_path / "dataset"
    good = add_version(root, versions.now_utc() - timedelta(days=3))
    version, folder = versions.new_version(root)
    (folder / "split=train").mkdir(parents=True)
    versions.commit(root, version, {}, make_current=False)  # e.g. past --max-bad-fraction
    assert versions.resolve(root).version == good
    (root / versions.CURRENT).unlink()
    assert versions.resolve(root).version == good  # the fallback skips it too
    listed = {v.id: v for v in versions.list_versions(root)}
    assert listed[good].current and listed[good].superseded is None
    assert "inspection" in versions.keep_reason(listed[version], 14, versions.now_utc())
    assert versions.prune(root, now=versions.now_utc() + timedelta(days=30)) == [version]
