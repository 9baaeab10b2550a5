"""The MLflow model over HTTP, as `mlflow models serve` runs it: one request of real PNG, JPEG and DICOM bytes and an
unreadable blob answers strict JSON (null, never NaN, for what could not be scored) with training.predict's
probabilities; a client's `path` makes the server open nothing; and where the host allows a folder
(CXR_MODEL_PATH_ROOT), only paths that resolve below it are read."""
import base64
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BIN, DICOM, KERMANY, NIH, require
from cxr_pipeline.etl.images import choose_decoder
from cxr_pipeline.etl.sources.nih import LABEL_NAMES
from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.models.registry import build_model
from cxr_pipeline.training.predict import main as predict

START_TIMEOUT_S = 180  # a cold start imports torch and MLflow on a shared 2-core machine
REQUEST_TIMEOUT_S = 120


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript's JSON.parse, Go, ...) do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def real_images():
    """One real image of each kind: an NIH PNG, a pediatric pneumonia JPEG, a DICOM file (JPEG 2000 inside)."""
    return [sorted(require(NIH / "images").glob("*.png"))[0], sorted(require(KERMANY).rglob("*.jpeg"))[0],
            sorted(require(DICOM).glob("*.dcm"))[0]]


@pytest.fixture(scope="module")
def model_folder(real_images, tmp_path_factory):
    """A small_cnn checkpoint shaped like train.py's (64 px NIH labels, calibrated, thresholds at an operating point,
    one label without), logged as the pyfunc model in a local MLflow store and downloaded to a folder."""
    import mlflow

    from cxr_pipeline.training.serving import mlflow_model

    folder = tmp_path_factory.mktemp("served")
    spec = DatasetSpec("nih", tuple(LABEL_NAMES), 64, decoder=choose_decoder())
    torch.manual_seed(0)
    model = build_model("small_cnn", spec.num_labels, "none", spec.image_size)
    checkpoint = folder / "best_finetune.pth"
    checkpoints.save({"model": model.state_dict(), "stage": "finetune", "epoch": 1, "val_mean_auroc": 0.5,
                      "model_name": "small_cnn", "dataset_spec": spec.to_json(),
                      "calibration": [{"method": "platt", "a": 1.5, "b": -0.3}] * spec.num_labels,
                      "thresholds": [0.55] * (spec.num_labels - 1) + [None], "operating_point": "sens>=0.95"},
                     checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        experiment = mlflow.MlflowClient().create_experiment("serving", (folder / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow_model.log_model(checkpoint)
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder / "model"))
    return {"folder": local, "checkpoint": checkpoint, "labels": list(spec.label_names)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


STARTED = "Application startup complete"  # what uvicorn's worker prints once it serves


class ServerLog:
    """The server's output, copied to a file by a thread that reads it as it comes: `started` is set when the
    worker says it serves, `closed` when every process of the server has closed its output (all have exited)."""

    def __init__(self, process: subprocess.Popen, path):
        self.path, self.started, self.closed = path, threading.Event(), threading.Event()
        threading.Thread(target=self.copy, args=(process.stdout,), daemon=True).start()

    def copy(self, stream) -> None:
        with open(self.path, "w") as log:
            for line in stream:
                log.write(line)
                log.flush()
                if STARTED in line:
                    self.started.set()
        self.closed.set()
        self.started.set()  # wakes a waiter: the server is gone

    def text(self) -> str:
        return self.path.read_text()


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    """`mlflow models serve --env-manager local` on a free local port, as a host runs it by default (no
    CXR_MODEL_PATH_ROOT), started once; waits for the worker's startup line, then checks /ping; fails with the
    server's log if it dies or never starts."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "CXR_MODEL_PATH_ROOT"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    for attempt in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        process = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_folder["folder"],
                                    "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                                    "--workers", "1"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True)
        log, url = ServerLog(process, log_path), f"http://127.0.0.1:{port}"
        if log.started.wait(START_TIMEOUT_S) and not log.closed.is_set():
            with urllib.request.urlopen(f"{url}/ping", timeout=REQUEST_TIMEOUT_S) as answer:
                assert answer.status == 200, f"/ping answered {answer.status}; the log:\n{log.text()[-6000:]}"
            break
        stop(process, log)
        if attempt < 2 and "address already in use" in log.text().lower():
            continue
        what = "exited" if log.closed.is_set() else f"did not start within {START_TIMEOUT_S} s"
        pytest.fail(f"the scoring server {what}; its log:\n{log.text()[-6000:]}")
    yield {"url": url, "log": log_path}
    stop(process, log)


def stop(process: subprocess.Popen, log: ServerLog) -> None:
    """The server and its uvicorn worker: the process group this fixture started. uvicorn's graceful shutdown
    waits for requests in flight (one stuck in a read, were the server to open a pipe), so a group whose
    output is still open 20 s after SIGTERM is killed."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group has exited
        pass
    if not log.closed.wait(20):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def invoke(server, payload: dict) -> list[dict]:
    """POST /invocations; the answer's rows, parsed strictly; a failure shows the answer and the server's log."""
    request = urllib.request.Request(f"{server['url']}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as exc:
        pytest.fail(f"HTTP {exc.code}: {exc.read().decode()[-3000:]}\n--- server log\n"
                    f"{server['log'].read_text()[-4000:]}")
    return strict_json(text)["predictions"]


def test_image_bytes_over_http_give_predicts_probabilities_and_strict_json(server, model_folder, real_images):
    blob = b"neither PNG nor JPEG nor DICOM"
    contents = [path.read_bytes() for path in real_images] + [blob]
    payload = {"dataframe_split": {"columns": ["content"],
                                   "data": [[base64.b64encode(data).decode("ascii")] for data in contents]}}
    rows = invoke(server, payload)
    labels = model_folder["labels"]
    assert len(rows) == 4
    scored, unreadable = rows[:3], rows[3]
    assert all(row["error"] == "" and row["path"] is None for row in scored)
    assert unreadable["error"].startswith("not_an_image")
    assert all(unreadable[label] is None and unreadable[f"{label}_positive"] is None for label in labels)
    assert {row["checkpoint_sha256"] for row in rows} == {checkpoints.recorded_sha256(model_folder["checkpoint"])}
    assert scored[0][f"{labels[-1]}_positive"] is None  # no threshold for that label: no decision, null
    assert all(row[f"{labels[0]}_positive"] in (0, 1) for row in scored)

    expected = predict(["--checkpoint", str(model_folder["checkpoint"]), *map(str, real_images)])
    served = np.array([[row[label] for label in labels] for row in scored], dtype=float)
    assert np.abs(served - expected[labels].to_numpy(float)).max() < 1e-5
    decisions = [f"{label}_positive" for label in labels[:-1]]
    assert [[row[name] for name in decisions] for row in scored] == expected[decisions].astype(int).values.tolist()


def test_a_clients_paths_are_refused_and_nothing_is_opened(server, real_images, tmp_path):
    """By default the server reads no path: /etc/passwd, a real X-ray on the host and a named pipe all get
    `path_not_allowed`. The pipe proves nothing was opened: opening it to read would have blocked the request
    (no writer), and afterwards no process holds it open for reading (a non-blocking open to write fails)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    paths = ["/etc/passwd", str(real_images[0]), str(fifo), "../../../etc/passwd"]
    rows = invoke(server, {"dataframe_split": {"columns": ["path"], "data": [[path] for path in paths]}})
    assert [row["error"].split(":")[0] for row in rows] == ["path_not_allowed"] * len(paths)
    assert "CXR_MODEL_PATH_ROOT" in rows[0]["error"] and "content" in rows[0]["error"]
    assert all(row[LABEL_NAMES[0]] is None and row[f"{LABEL_NAMES[0]}_positive"] is None for row in rows)
    with pytest.raises(OSError) as no_reader:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert no_reader.value.errno == errno.ENXIO
    # the refusal reads nothing either: the same answer for a file that exists and one that does not
    gone = invoke(server, {"dataframe_split": {"columns": ["path"], "data": [[str(tmp_path / "gone.png")]]}})
    assert gone[0]["error"].replace(str(tmp_path / "gone.png"), "P") == rows[1]["error"].replace(paths[1], "P")


def test_paths_below_the_hosts_allowed_folder_are_read_and_no_others(model_folder, real_images, tmp_path,
                                                                       monkeypatch):
    """CXR_MODEL_PATH_ROOT=ROOT on the host: a file below ROOT (absolute, or relative to ROOT, or a symlink to a
    file below ROOT) is scored as training.predict scores it; `..`, an absolute path outside, a symlink (to a file
    or a folder) leading out of ROOT are refused without being opened; a pipe below ROOT is not opened either."""
    import mlflow

    root, outside = tmp_path / "allowed", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(real_images[0], root / "sub" / "inside.png")
    shutil.copy(real_images[1], outside / "outside.jpeg")
    (root / "alias.png").symlink_to(root / "sub" / "inside.png")
    (root / "escape.jpeg").symlink_to(outside / "outside.jpeg")
    (root / "escape_dir").symlink_to(outside)
    os.mkfifo(root / "pipe.png")
    monkeypatch.setenv("CXR_MODEL_PATH_ROOT", str(root))
    model = mlflow.pyfunc.load_model(model_folder["folder"])
    cases = {str(root / "sub" / "inside.png"): "", "sub/inside.png": "", "alias.png": "",
             str(root / "missing.png"): "image_missing", str(root / "pipe.png"): "unreadable_file",
             "../elsewhere/outside.jpeg": "path_not_allowed", str(outside / "outside.jpeg"): "path_not_allowed",
             "escape.jpeg": "path_not_allowed", "escape_dir/outside.jpeg": "path_not_allowed",
             "/etc/passwd": "path_not_allowed"}
    scored = model.predict(pd.DataFrame({"path": list(cases)}))
    assert dict(zip(cases, scored["error"].str.split(":").str[0])) == cases
    assert scored["image_id"].tolist() == list(cases)  # the paths as given, as training.predict names them
    labels = model_folder["labels"]
    expected = predict(["--checkpoint", str(model_folder["checkpoint"]), str(real_images[0])])[labels].to_numpy(float)
    assert np.abs(scored[labels].to_numpy(float)[:3] - expected).max() < 1e-5
    assert scored[labels].iloc[3:].isna().all().all()
    assert scored[labels[0]].dtype == "Float64"  # numeric in process; null, not NaN, in JSON
    assert stat.S_ISFIFO(os.stat(root / "pipe.png").st_mode)  # and it was not opened: the call returned

    monkeypatch.delenv("CXR_MODEL_PATH_ROOT")  # the default: no path at all
    refused = model.predict(pd.DataFrame({"path": [str(root / "sub" / "inside.png")]}))
    assert refused["error"].iloc[0].startswith("path_not_allowed") and refused[labels].isna().all().all()
