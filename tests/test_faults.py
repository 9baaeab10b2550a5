"""Faults: tampered checkpoints, non-finite loss, a Horovod rank killed mid-run, a killed or
repeated ETL, concurrent writers of the Delta table."""
import hashlib
import importlib.util
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import BIN, NIH, ROOT, current, require, run_cli, spark_etl
from test_training import train_args
from cxr_pipeline.etl import versions
from cxr_pipeline.etl.hold_points import VARIABLE
from cxr_pipeline.training.evaluation.results import write_results, read_results
from cxr_pipeline.training.loop import checkpoints


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def kt_run(nih_dataset, tmp_path):
    run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--stages", "kt"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def resume_fails(nih_dataset, tmp_path, checkpoint, match):
    with pytest.raises(pytest.fail.Exception, match=match):
        run_cli(BIN / "python", *train_args(nih_dataset, tmp_path, "--stages", "kt", "--epochs-kt", 2,
                                            "--resume", checkpoint))


def test_checkpoint_changed_after_writing_is_refused(nih_dataset, tmp_path, kt_run):
    checkpoint = kt_run / "checkpoint.pth"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    resume_fails(nih_dataset, tmp_path, checkpoint, "changed after it was written")


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cxr-pwned",))


def test_checkpoint_with_pickled_code_is_refused_even_with_a_matching_hash(nih_dataset, tmp_path, kt_run):
    checkpoint = kt_run / "checkpoint.pth"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "extra": Payload()}, checkpoint)
    (kt_run / "checkpoint.pth.sha256").write_text(sha256(checkpoint))  # an attacker who rewrote both
    resume_fails(nih_dataset, tmp_path, checkpoint, "objects other than tensors")
    assert not os.path.exists("/tmp/cxr-pwned")


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(nih_dataset, tmp_path, kt_run):
    good = kt_run / "checkpoint.pth"
    diverged = checkpoints.load(good)
    diverged["model"] = {k: v.float() * float("nan") if v.is_floating_point() else v
                         for k, v in diverged["model"].items()}
    checkpoints.save(diverged, kt_run / "diverged.pth")
    before = sha256(good)
    resume_fails(nih_dataset, tmp_path, kt_run / "diverged.pth", "the loss is not finite")
    assert sha256(good) == before


def hold_pipe(tmp_path):
    """The named pipe a job signals through when it reaches its hold point (etl/hold_points.py)."""
    pipe = tmp_path / "hold"
    os.mkfifo(pipe)
    return pipe


def wait_for(pipe, process, timeout=600):
    """Block until `process` reaches its hold point: a reader thread waits in open()/read() for
    the job's signal. The 1-s join only notices a job that died first; the timeout only guards
    against a hang."""
    signalled = []
    reader = threading.Thread(target=lambda: signalled.append(pipe.read_text()), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while reader.is_alive():
        reader.join(1.0)
        if reader.is_alive() and (process.poll() is not None or time.monotonic() > deadline):
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # end the reader's wait
            process.kill()
            pytest.fail(f"the job did not reach its hold point (exit code {process.poll()})")
    assert signalled and signalled[0].strip().isdigit(), signalled


def release(pipe):
    """Let a held job go on."""
    pipe.write_text("")


def rank_pid(run_folder: Path, rank: int) -> int | None:
    """PID of the training process of `rank` whose command line names `run_folder` (this test's own, so a
    concurrent suite's ranks are never picked)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"HOROVOD_RANK={rank}".encode() in environ and any(b"training/train.py" in part for part in cmdline) \
                and any(str(run_folder).encode() in part for part in cmdline):
            return int(pid)
    return None


@pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="horovod is not installed: run `make install`")
def test_rank_killed_mid_run_then_resumed_ends_like_an_uninterrupted_run(nih_dataset, tmp_path):
    extra = ["--epochs-finetune", 4, "--max-steps-per-epoch", 0, "--batch-size", 4, "--seed", 3]
    command = [BIN / "horovodrun", "-np", 2, "-H", "localhost:2", BIN / "python"]
    run_cli(*command, *train_args(nih_dataset, tmp_path / "a", *extra))
    baseline = read_results(str(tmp_path / "a" / "results"))

    args = [str(a) for a in command + train_args(nih_dataset, tmp_path / "b", *extra)]
    pipe = hold_pipe(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", VARIABLE: f"train:finetune:1@{pipe}"}
    launcher = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(pipe, launcher)  # rank 0 has saved epoch 1 and holds; rank 1 waits for it in a collective
    victim = rank_pid(tmp_path / "b", 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    release(pipe)  # rank 0 goes on: its next collective meets the dead rank
    output = launcher.communicate(timeout=300)[0].decode(errors="replace")
    assert launcher.returncode != 0, output[-3000:]
    (summary,) = (tmp_path / "b" / "runs").glob("*/summary.csv")
    assert checkpoints.load(summary.parent / "checkpoint.pth")["epoch"] == 1

    run_cli(*command, *train_args(nih_dataset, tmp_path / "b", *extra, "--resume", summary.parent / "checkpoint.pth"))
    resumed = read_results(str(tmp_path / "b" / "results"))
    columns = ["stage", "split", "label", "auroc", "n_pos", "n_neg", "best_epoch"]
    final = [frame[frame["stage"] == "finetune"][columns].sort_values(["split", "label"]).reset_index(drop=True)
             for frame in (baseline, resumed)]
    pd.testing.assert_frame_equal(final[0], final[1], check_exact=False, rtol=1e-9)


def dataset_content(output):
    """Every row of every split, as a hash that ignores file names and order of files."""
    output = current(output)
    table = pd.concat([pq.read_table(output / f"split={s}").to_pandas().assign(split=s)
                       for s in ("train", "val", "test")]).sort_values("image_id")
    digest = hashlib.sha256()
    for row in table.itertuples():
        digest.update(repr((row.image_id, row.split, row.patient_id, list(row.labels), row.pixels_u8)).encode())
    return digest.hexdigest(), len(table)


def test_etl_rerun_gives_identical_content(nih_dataset, tmp_path):
    again = tmp_path / "again"
    spark_etl("--source", "nih", "--data-root", NIH, "--labels-csv", NIH / "Data_Entry_sample.csv",
              "--output", again, "--size", 64, "--rows-per-file", 8)
    assert dataset_content(again) == dataset_content(nih_dataset)


def test_etl_killed_half_way_leaves_no_partial_output(tmp_path):
    require(NIH / "images")
    output = tmp_path / "out"
    args = [BIN / "spark-submit", "--master", "local[2]", "etl/preprocess.py", "--source", "nih",
            "--data-root", NIH, "--labels-csv", NIH / "Data_Entry_sample.csv", "--output", output, "--size", 512]
    pipe = hold_pipe(tmp_path)
    job = subprocess.Popen([str(a) for a in args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, env={**os.environ, VARIABLE: f"etl:before-commit@{pipe}"})
    wait_for(pipe, job)  # every file is written to the staging folder; the rename has not happened
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    (written,) = (output / "_versions").iterdir()  # the version being written, without its _version.json
    assert list(written.glob("split=*/*.parquet")) and (written / "_etl_summary.json").exists()
    assert not versions.has_data(output) and versions.list_versions(output) == []  # nothing current, no version
    assert versions.prune(output, keep_days=0) == [] and written.exists()  # it may still be writing
    assert versions.prune(output, now=versions.now_utc() + timedelta(days=30)) == [] and not written.exists()


def append_many(table, writer, count):
    for index in range(count):
        write_results(table, [{"run_id": f"{writer}-{index}", "created_at": pd.Timestamp.now(tz="UTC"),
                                "label": "mean", "auroc": 0.5, "n_pos": 1, "n_neg": 1}])


def test_two_processes_appending_to_the_results_table_lose_no_rows(tmp_path):
    table = str(tmp_path / "results")
    append_many(table, "seed", 1)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=append_many, args=(table, name, 15)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    results = read_results(table)
    assert len(results) == 31 and results["run_id"].is_unique
