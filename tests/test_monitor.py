"""The shift monitor of the nightly scoring (training/serving/monitor.py, jobs/score.py --monitor-table, python -m
training.monitor): synthetic calibrated scores at val's prevalence pass and at another are flagged; a model
trained on real pediatric pneumonia JPEGs, calibrated on held-out patients at the download's prevalence (74 %),
scores with the Spark job a batch of other patients resampled to 20 % pneumonia, and the monitor table flags it
and the job exits non-zero (or only warns); its prevalence estimate holds batches of those patients resampled to
10, 50 and 90 % in its interval; the command prints the runs and draws them."""
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch
from deltalake import DeltaTable

from conftest import BIN, KERMANY, require, run_cli
from cxr_pipeline.etl.images import decode_resize
from cxr_pipeline.etl.sources.pneumonia import patient_id_from_name
from cxr_pipeline.schema import DatasetSpec
from cxr_pipeline.training.data.inputs import InputTransform
from cxr_pipeline.training.evaluation import calibration, prevalence
from cxr_pipeline.training.evaluation.gathered import Predictions
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.loop.outputs import val_population
from cxr_pipeline.training.models.registry import build_model
from cxr_pipeline.training.serving import monitor

MODEL_NAME = "cxr-monitor-test"
SIZE = 64
NOW = datetime(2026, 12, 5, 4, 30, tzinfo=timezone.utc)


# ---- synthetic: calibrated scores of a binormal classifier -------------------------------------------------------
def calibrated_scores(n: int, prevalence: float, prior: float = 0.75, separation: float = 1.0, seed: int = 0):
    """Calibrated probabilities of n images, a `prevalence` share positive: the classifier's score x is N(+-s, 1)
    for positives and negatives, and its probability calibrated to `prior` is Bayes' rule,
    sigmoid(2 s x + logit(prior)); what a well-calibrated model gives where only the prevalence moved."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < prevalence
    x = rng.normal(np.where(positive, separation, -separation), 1.0)
    return 1 / (1 + np.exp(-(2 * separation * x + np.log(prior / (1 - prior)))))


@pytest.fixture(scope="module")
def reference():
    val = calibrated_scores(2000, 0.75, seed=1)
    return monitor.Reference((0.75,), (tuple(np.quantile(val, np.linspace(0.1, 0.9, 9))),))


def test_a_batch_at_vals_prevalence_is_not_flagged(reference):
    rows = monitor.monitor_rows(calibrated_scores(300, 0.75, seed=2)[:, None], ["Pneumonia"], reference, "m", NOW)
    row = rows.iloc[0]
    assert list(rows.columns) == monitor.MONITOR_SCHEMA.names and len(rows) == 1
    assert not row.flagged and row["flags"] == "" and row["notes"] == ""
    assert row.prevalence_low <= 0.75 <= row.prevalence_high and row.psi < 0.1
    assert row.n_images == 300 and row.n_unreadable == 0 and row.val_prevalence == 0.75


def test_a_batch_at_20_percent_when_vals_is_75_is_flagged_on_prevalence_and_psi(reference):
    rows = monitor.monitor_rows(calibrated_scores(300, 0.20, seed=2)[:, None], ["Pneumonia"], reference, "m", NOW)
    row = rows.iloc[0]
    assert row.flagged and row.prevalence_low < 0.2 < row.prevalence_high and row.prevalence_high < 0.35
    assert row.psi > 0.2 and row.mean_score < 0.6
    assert "prevalence 0.2" in row["flags"] and "vs val's 0.750" in row["flags"] and "PSI" in row["flags"]
    (line,) = monitor.describe(rows)
    assert line.startswith("Pneumonia: prevalence 0.2") and "FLAGGED: prevalence" in line


def test_unreadable_images_small_batches_and_models_without_val_statistics(reference):
    scores = calibrated_scores(200, 0.75, seed=3)[:, None]
    scores[:20] = np.nan  # 10 % could not be scored
    row = monitor.monitor_rows(scores, ["Pneumonia"], reference, "m", NOW).iloc[0]
    assert row.flagged and row["flags"].startswith("unreadable 10.0% > 5%") and "PSI" not in row["flags"]
    assert row.n_unreadable == 20 and row.unreadable_share == pytest.approx(0.1)
    # 40 images at 20 %: reported, not judged (PSI of 40 images is mostly noise)
    small = monitor.monitor_rows(calibrated_scores(40, 0.2, seed=4)[:, None], ["Pneumonia"], reference, "m", NOW)
    assert not small.flagged.iloc[0] and "40 scored images < 100" in small.notes.iloc[0]
    assert np.isfinite(small.psi.iloc[0]) and np.isfinite(small.prevalence_estimate.iloc[0])
    # a model logged from a checkpoint from before val's statistics: counts and mean only
    unknown = monitor.Reference.from_metadata({"dataset_spec": "{}"}, ["Pneumonia"])
    assert not unknown.knows_anything()
    row = monitor.monitor_rows(calibrated_scores(200, 0.2)[:, None], ["Pneumonia"], unknown, "m", NOW).iloc[0]
    assert not row.flagged and np.isnan(row.psi) and np.isnan(row.prevalence_estimate) and "no val" in row["notes"]
    # metadata as log_model writes it: lists in label order, None for a label val could not say
    known = monitor.Reference.from_metadata({"val_prevalence": [0.3, None], "val_score_deciles": [[0.1] * 9, None]},
                                            ["A", "B"])
    assert known.prevalence == (0.3, None) and known.deciles[1] is None


def test_psi_bins_on_vals_deciles_and_merges_tied_ones():
    deciles = np.quantile(np.random.default_rng(0).random(10_000), np.linspace(0.1, 0.9, 9))
    same = np.random.default_rng(1).random(5000)
    assert monitor.psi(same, deciles) < 0.01
    assert monitor.psi(same ** 3, deciles) > 0.5  # scores pushed down
    # an isotonic calibration's flat step: 30 % of val at exactly 0.1, where the 30 % and 40 % deciles fall (the
    # 50 % one lies between 0.1 and the next score); the batch, drawn alike, has its point mass there too
    steps = np.concatenate([np.linspace(0.0, 0.09, 200), np.full(300, 0.1), np.linspace(0.11, 1, 500)])
    tied = np.quantile(steps, np.linspace(0.1, 0.9, 9))
    assert list(tied[2:4]) == [0.1, 0.1] and 0.1 < tied[4] < 0.11
    batch = np.random.default_rng(2).choice(steps, 1000)
    assert monitor.psi(batch, tied) < 0.05 and monitor.psi(batch ** 3, tied) > 0.5
    assert np.isnan(monitor.psi(np.array([np.nan]), deciles))


# ---- real: a model trained on the pneumonia JPEGs, a nightly batch at 20 % ---------------------------------------
def patients(folder: str) -> dict[str, list]:
    groups = {}
    for path in sorted(require(KERMANY / folder).glob("*.jpeg")):
        groups.setdefault(patient_id_from_name(path.name), []).append(path)
    return groups


def images_of(groups: dict, ids, count: int) -> list:
    return [path for patient in ids for path in groups[patient]][:count]


def stored(paths) -> torch.Tensor:
    """As the ETL stores them (and the model's decode makes them): grey uint8 (N, 1, SIZE, SIZE)."""
    return torch.from_numpy(np.stack([decode_resize(path.read_bytes(), SIZE, "pillow") for path in paths])[:, None])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """small_cnn trained for two epochs on 64 px real JPEGs of 400 children (balanced), Platt-calibrated on 380
    images of 300 other children at the download's prevalence (74 % pneumonia), its val prevalence and score
    deciles stored as train.py stores them (training/loop/outputs.py's val_population); logged as the pyfunc
    model and registered. Images of children in neither are kept for the nightly batches."""
    import mlflow

    normal, pneumonia = patients("NORMAL"), patients("PNEUMONIA")
    rng = np.random.default_rng(0)
    normal_ids, pneumonia_ids = rng.permutation(sorted(normal)), rng.permutation(sorted(pneumonia))
    train = images_of(normal, normal_ids[:200], 300) + images_of(pneumonia, pneumonia_ids[:200], 300)
    val = images_of(normal, normal_ids[200:300], 100) + images_of(pneumonia, pneumonia_ids[200:400], 280)
    truth = np.array([[path.parent.name == "PNEUMONIA"] for path in train], dtype=np.float32)
    val_truth = np.array([[path.parent.name == "PNEUMONIA"] for path in val], dtype=np.float64)

    spec = DatasetSpec("pneumonia", ("Pneumonia",), SIZE)
    inputs = InputTransform(spec)
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, "none", SIZE)
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    pixels, targets = stored(train), torch.from_numpy(truth)
    for _ in range(2):
        model.train()
        order = torch.randperm(len(pixels))
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            optimiser.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(inputs(pixels[batch])), targets[batch])
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        raw = torch.sigmoid(model(inputs(stored(val), evaluation=True))).numpy().astype(np.float64)
    states = calibration.fit(val_truth, raw, "platt")
    calibrated = calibration.apply(states, raw)
    threshold = float(np.quantile(calibrated[val_truth[:, 0] == 1, 0], 0.05))  # sensitivity >= 0.95 on val
    population = val_population(Predictions([p.name for p in val], [], raw, val_truth), states)
    assert population["val_prevalence"] == [pytest.approx(280 / 380)]

    folder = tmp_path_factory.mktemp("monitor-model")
    checkpoint = folder / "best_finetune.pth"
    checkpoints.save({"model": model.state_dict(), "stage": "finetune", "epoch": 2, "model_name": "small_cnn",
                      "dataset_spec": spec.to_json(), "inputs": inputs.state(), "calibration": states,
                      "thresholds": [threshold], "operating_point": "sens>=0.95", **population}, checkpoint)
    store = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        from cxr_pipeline.training.serving import mlflow_model

        experiment = mlflow.MlflowClient().create_experiment("monitor-test", (folder / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            mlflow_model.log_model(checkpoint, registered_model_name=MODEL_NAME)
    held_out = {"NORMAL": images_of(normal, normal_ids[300:], 400),
                "PNEUMONIA": images_of(pneumonia, pneumonia_ids[400:], 400)}
    return {"store": store, "checkpoint": checkpoint, "population": population, "held_out": held_out}


def batch_folder(root, held_out: dict, normal: int, pneumonia: int):
    folder = root / "incoming"
    folder.mkdir()
    for path in held_out["NORMAL"][:normal] + held_out["PNEUMONIA"][:pneumonia]:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def nightly(trained, tmp_path_factory):
    """One nightly scoring run over 150 held-out images, 30 of them pneumonia (20 %), with the monitor on."""
    root = tmp_path_factory.mktemp("nightly")
    folder = batch_folder(root, trained["held_out"], normal=120, pneumonia=30)
    command = [BIN / "python", "jobs/score.py", "--master", "local[2]", "--model-uri", f"models:/{MODEL_NAME}@champion",
               "--images", folder, "--table", root / "scores", "--monitor-table", root / "monitor"]
    from mlflow import MlflowClient

    env = {"MLFLOW_TRACKING_URI": trained["store"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained["store"])
        MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", 1)
    result = run_cli(*command, env=env, check=False)
    return {"root": root, "command": command, "env": env, "result": result}


def test_the_real_model_at_vals_prevalence_is_not_flagged(trained):
    """The control: held-out children at the val split's prevalence (110 of 150 with pneumonia), scored by the
    logged checkpoint as the job's model scores them."""
    from cxr_pipeline.training.serving import scorer as scoring

    model = scoring.load(str(trained["checkpoint"]))
    images = trained["held_out"]["NORMAL"][-40:] + trained["held_out"]["PNEUMONIA"][-110:]
    probabilities = model.probabilities(stored(images))
    reference = monitor.Reference.from_metadata(trained["population"], ["Pneumonia"])
    row = monitor.monitor_rows(probabilities, ["Pneumonia"], reference, "m", NOW).iloc[0]
    assert not row.flagged, row["flags"]
    assert abs(row.prevalence_estimate - 110 / 150) < 0.1 and row.psi < 0.2


@pytest.fixture(scope="module")
def held_out_probabilities(trained):
    """The logged checkpoint's calibrated probabilities of the 400 + 400 held-out children's images."""
    from cxr_pipeline.training.serving import scorer as scoring

    model = scoring.load(str(trained["checkpoint"]))
    with torch.no_grad():
        return {kind: model.probabilities(stored(paths))[:, 0] for kind, paths in trained["held_out"].items()}


@pytest.mark.parametrize("share", [0.10, 0.50, 0.90])
def test_the_real_model_finds_a_batch_resampled_to_another_prevalence_within_its_interval(
        trained, held_out_probabilities, share):
    """Prior shift on real images: 300 held-out children's images (in neither training nor calibration, so drawn
    as val was) resampled to 10, 50 and 90 % pneumonia. EM on the checkpoint's calibrated probabilities, against
    its stored val prevalence (74 %), puts the batch's true prevalence inside its interval."""
    rng = np.random.default_rng(int(share * 100))
    positives = round(300 * share)
    batch = np.concatenate([rng.choice(held_out_probabilities["PNEUMONIA"], positives, replace=False),
                            rng.choice(held_out_probabilities["NORMAL"], 300 - positives, replace=False)])
    (found,) = prevalence.estimate(batch[:, None], trained["population"]["val_prevalence"], ["Pneumonia"])
    assert found.low <= share <= found.high, found
    assert abs(found.estimate - share) < 0.1 and abs(batch.mean() - share) > abs(found.estimate - share)


def test_a_nightly_run_resampled_to_20_percent_pneumonia_flags_the_shift_and_fails(trained, nightly):
    """The issue's Done-when: the monitor table flags the shift, the log says which label and why, and the job
    exits non-zero, the scores written all the same."""
    result = nightly["result"]
    assert result.returncode != 0, result.stderr[-3000:]
    assert "shift monitor: 1 label(s) flagged in this run of models:/cxr-monitor-test/1: Pneumonia (prevalence" \
           in result.stderr
    assert "--monitor-warn-only" in result.stderr
    scores = DeltaTable(str(nightly["root"] / "scores")).to_pandas()
    assert len(scores) == 150 and (scores["error"] == "").all()  # scoring as before
    (row,) = DeltaTable(str(nightly["root"] / "monitor")).to_pandas().itertuples()
    assert row.label == "Pneumonia" and row.model_uri == f"models:/{MODEL_NAME}/1" and row.flagged
    assert row.n_images == 150 and row.n_unreadable == 0 and row.val_prevalence == pytest.approx(280 / 380)
    assert row.prevalence_estimate < 0.45 and row.prevalence_high < 0.6 and row.psi > 0.2
    assert "prevalence" in row.flags and "PSI" in row.flags
    assert row.scored_at == scores["scored_at"].iloc[0]  # the run's time, as in its score rows
    assert np.isclose(row.mean_score, scores["Pneumonia"].mean())

    # the bundle retries a failed task: with nothing new to score, the retry repeats the verdict, adds nothing
    retry = run_cli(*nightly["command"], env=nightly["env"], check=False)
    assert retry.returncode != 0 and "nothing new scored" in retry.stderr
    assert "flagged in the last run (scored at" in retry.stderr
    warned = run_cli(*nightly["command"], "--monitor-warn-only", env=nightly["env"])
    assert "FLAGGED: prevalence" in warned.stderr and "--monitor-warn-only: the job succeeds" in warned.stderr
    assert len(DeltaTable(str(nightly["root"] / "monitor")).to_pandas()) == 1


def test_the_monitor_command_prints_the_runs_and_draws_them(nightly, tmp_path):
    """python -m training.monitor on the nightly table: its row, marked; then on a table of a week of runs."""
    table = nightly["root"] / "monitor"
    shown = run_cli(BIN / "python", "-m", "training.monitor", "--table", table, "--plot", tmp_path / "one.png")
    assert f"Pneumonia (models:/{MODEL_NAME}/1): 1 run(s), 1 flagged" in shown.stdout
    assert "  !! " in shown.stdout and ": prevalence 0." in shown.stdout
    assert (tmp_path / "one.png").stat().st_size > 10_000

    from cxr_pipeline.training.monitor import main as show

    week = str(tmp_path / "week")
    reference = monitor.Reference((0.75, 0.1), tuple(tuple(np.quantile(calibrated_scores(2000, p, prior=p, seed=1),
                                                                     np.linspace(0.1, 0.9, 9))) for p in (0.75, 0.1)))
    for night, share in enumerate([0.75, 0.74, 0.76, 0.6, 0.4, 0.2, 0.75]):
        scores = np.column_stack([calibrated_scores(300, share, seed=night),
                                  calibrated_scores(300, 0.1, prior=0.1, seed=100 + night)])
        rows = monitor.monitor_rows(scores, ["Pneumonia", "Effusion"], reference, "models:/x/2",
                                    NOW + timedelta(days=night))
        monitor.write_rows(week, rows, "deltalake")
    shown = show(["--table", week, "--last", "5", "--plot", str(tmp_path / "week.png")])
    assert len(shown) == 10 and shown["scored_at"].nunique() == 5  # the last 5 nights, both labels
    flagged = shown[shown["flagged"]]
    assert set(flagged["label"]) == {"Pneumonia"} and len(flagged) >= 2
    assert (tmp_path / "week.png").stat().st_size > 10_000
    only = show(["--table", week, "--label", "Effusion", "--last", "3"])
    assert set(only["label"]) == {"Effusion"} and not only["flagged"].any()
    with pytest.raises(SystemExit, match="no rows of label"):
        show(["--table", week, "--label", "Atelectasis"])


def test_the_nightly_scoring_job_of_the_bundle_monitors_into_its_schema():
    """jobs/cxr_jobs.yml: the nightly scoring task writes monitor rows beside its scores (a catalog table of the
    bundle's schema) and fails on a flagged label (tests/test_bundle.py checks the bundle as deployed)."""
    import yaml

    from conftest import ROOT
    from cxr_pipeline.jobs.score import build_parser

    jobs = yaml.safe_load((ROOT / "jobs" / "cxr_jobs.yml").read_text())["resources"]["jobs"]
    (task,) = jobs["cxr_score_nightly"]["tasks"]
    args = build_parser().parse_args(task["spark_python_task"]["parameters"])
    schema = args.table.rsplit(".", 1)[0]
    assert args.monitor_table == f"{schema}.score_monitor" and not args.monitor_warn_only
