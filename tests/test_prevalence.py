"""Prevalence where the model runs (training/evaluation/prevalence.py): the EM estimate recovers a shifted
prevalence from unlabelled calibrated probabilities, adjust() moves probabilities to a prevalence, train.py
stores val's prevalence and score deciles in the best checkpoint, and `predict --prevalence` uses them."""
import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta

from conftest import BIN, NIH, require, run_cli
from cxr_pipeline.training.evaluation import prevalence
from cxr_pipeline.training.evaluation.gathered import Predictions
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.evaluation.calibration import calibration_metrics
from cxr_pipeline.training.loop.outputs import val_population, with_prevalence
from cxr_pipeline.training.predict import main as predict
from cxr_pipeline.training.serving import scorer as scoring
from cxr_pipeline.training.serving.predictions import PREVALENCE_COLUMN, columns, decision_column

VAL_PRIOR = 0.75  # the simulated model is calibrated on a val split of this prevalence (the pneumonia recipe's)
POSITIVE, NEGATIVE = (5, 2), (2, 5)  # class-conditional densities of the model's score: Beta(a, b)


def site(prevalence_at_site: float, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(truth, calibrated probability) of n images of a site: the classes look as on val (prior shift only), the
    probabilities are exact at VAL_PRIOR (Bayes' rule on the known densities)."""
    truth = (rng.random(n) < prevalence_at_site).astype(float)
    score = np.where(truth == 1, rng.beta(*POSITIVE, n), rng.beta(*NEGATIVE, n))
    positive, negative = beta.pdf(score, *POSITIVE), beta.pdf(score, *NEGATIVE)
    return truth, VAL_PRIOR * positive / (VAL_PRIOR * positive + (1 - VAL_PRIOR) * negative)


@pytest.mark.parametrize("shifted", [0.10, 0.50, 0.90])
def test_em_recovers_a_shifted_prevalence_within_its_interval(shifted):
    truth, probabilities = site(shifted, 3000, np.random.default_rng(int(shifted * 100)))
    (found,) = prevalence.estimate(probabilities[:, None], [VAL_PRIOR], ["Pneumonia"])
    assert found.label == "Pneumonia" and 0 < found.iterations < prevalence.MAX_ITERATIONS
    assert found.low <= found.estimate <= found.high and found.high - found.low < 0.08
    assert abs(found.estimate - truth.mean()) < 0.05 and found.low <= truth.mean() <= found.high
    # the unadjusted probabilities say val's prevalence, wrongly; adjusted to the estimate they are right on average
    adjusted = prevalence.adjust(probabilities[:, None], [VAL_PRIOR], [found.estimate])[:, 0]
    assert abs(adjusted.mean() - truth.mean()) < 0.02 < abs(probabilities.mean() - truth.mean())


def test_estimate_ignores_unscored_rows_and_labels_without_a_prior():
    _, first = site(0.3, 500, np.random.default_rng(1))
    _, second = site(0.6, 500, np.random.default_rng(2))
    scored = np.stack([first, second], axis=1)
    with_gaps = np.vstack([scored, np.full((7, 2), np.nan)])
    assert prevalence.estimate(with_gaps, [VAL_PRIOR, VAL_PRIOR], ["a", "b"]) == \
        prevalence.estimate(scored, [VAL_PRIOR, VAL_PRIOR], ["a", "b"])
    none, zero = prevalence.estimate(scored, [None, 0.0], ["a", "b"])
    assert np.isnan(none.estimate) and np.isnan(zero.estimate) and none.iterations == 0
    with pytest.raises(ValueError, match="one of each per label"):
        prevalence.estimate(scored, [VAL_PRIOR], ["a", "b"])


def test_adjust_moves_probabilities_toward_the_target_and_is_the_identity_at_the_prior():
    _, probabilities = site(0.5, 2000, np.random.default_rng(3))
    scores = np.stack([probabilities, probabilities, probabilities], axis=1)
    scores[:5, 0] = np.nan
    same = prevalence.adjust(scores, [VAL_PRIOR] * 3, [VAL_PRIOR, None, np.nan])
    np.testing.assert_array_equal(same, scores)  # exactly: target == prior, none asked, none estimable
    lower, higher = prevalence.adjust(scores, [VAL_PRIOR] * 3, [0.2, 0.9, VAL_PRIOR]).T[:2]
    assert np.isnan(lower[:5]).all() and not np.isnan(lower[5:]).any()  # unscored stays unscored
    assert np.nanmean(lower) < np.nanmean(scores[:, 0]) < np.mean(higher)
    assert np.all(np.diff(lower[5:][np.argsort(scores[5:, 0])]) >= 0)  # monotone: rankings unchanged
    back = prevalence.adjust(prevalence.adjust(scores, [VAL_PRIOR] * 3, [0.2] * 3), [0.2] * 3, [VAL_PRIOR] * 3)
    inner = (scores > 1e-3) & (scores < 1 - 1e-3)  # where clipping to (EPSILON, 1 - EPSILON) never bites
    np.testing.assert_allclose(back[inner], scores[inner], atol=1e-9)
    with pytest.raises(ValueError, match="prior 0.0 is not a prevalence"):
        prevalence.adjust(scores, [0.0] * 3, [0.5] * 3)
    # an unknown prior (None, as checkpoints store it) is left alone where no target asks to move its label
    unknown = prevalence.adjust(scores, [None, VAL_PRIOR, np.nan], [None, 0.2, None])
    np.testing.assert_array_equal(unknown[:, [0, 2]], scores[:, [0, 2]])
    np.testing.assert_array_equal(unknown[:, 1], prevalence.adjust(scores[:, [1]], [VAL_PRIOR], [0.2])[:, 0])
    with pytest.raises(ValueError, match="prior None is not a prevalence"):
        prevalence.adjust(scores, [None] * 3, [0.5] * 3)


def test_prevalence_settings_are_parsed_or_refused_with_the_reason():
    labels = ["Pneumonia", "No Finding"]
    assert scoring.prevalence_targets("", labels) == {}
    assert scoring.prevalence_targets("auto", labels) == {"Pneumonia": "auto", "No Finding": "auto"}
    assert scoring.prevalence_targets("pneumonia=0.3, no finding=auto", labels) == {"Pneumonia": 0.3,
                                                                                   "No Finding": "auto"}
    assert scoring.prevalence_targets("0.62", ["Pneumonia"]) == {"Pneumonia": 0.62}
    with pytest.raises(scoring.PrevalenceError, match="the model has 2 labels; name them"):
        scoring.prevalence_targets("0.3", labels)
    with pytest.raises(scoring.PrevalenceError, match="not a number in"):
        scoring.prevalence_targets("Pneumonia=1.5", labels)
    with pytest.raises(scoring.PrevalenceError, match="'Effusion' is not one of the model's labels"):
        scoring.prevalence_targets("Effusion=0.1", labels)


def test_the_checkpoint_keeps_val_prevalence_among_known_labels_and_calibrated_deciles():
    scores = np.linspace(0.01, 0.99, 100)[:, None].repeat(2, axis=1)
    labels = np.stack([np.r_[np.ones(30), np.zeros(70)], np.r_[np.ones(10), np.zeros(40), np.full(50, np.nan)]], 1)
    kept = val_population(Predictions([str(i) for i in range(100)], [], scores, labels), None)
    assert kept["val_prevalence"] == [0.3, 0.2]
    np.testing.assert_allclose(kept["val_score_deciles"][0], np.quantile(scores[:, 0], np.linspace(0.1, 0.9, 9)))
    platt = [{"method": "platt", "a": 1.0, "b": 1.0}, {"method": "none"}]
    shifted = val_population(Predictions([], [], scores, labels), platt)["val_score_deciles"]
    assert all(a > b for a, b in zip(shifted[0], kept["val_score_deciles"][0]))  # of the calibrated scores
    assert shifted[1] == kept["val_score_deciles"][1]


def test_each_split_of_the_report_says_its_estimated_prevalence_and_the_calibration_at_it():
    truth, probabilities = site(0.3, 1500, np.random.default_rng(4))
    split = Predictions([str(i) for i in range(len(truth))], [], probabilities[:, None], truth[:, None])
    (row,) = with_prevalence(calibration_metrics(truth[:, None], probabilities[:, None], probabilities[:, None], ["x"]),
                             split, [VAL_PRIOR], ["x"], seed=0)
    assert row["prevalence"] == truth.mean() and abs(row["prevalence_estimated"] - truth.mean()) < 0.05
    assert row["prevalence_estimated_ci_low"] <= row["prevalence_estimated"] <= row["prevalence_estimated_ci_high"]
    assert row["ece_adjusted"] < row["ece"] / 2 and row["brier_adjusted"] < row["brier"]
    assert with_prevalence([{"label": "x"}], split, None, ["x"], seed=0) == [{"label": "x"}]  # no val, no prior


@pytest.fixture(scope="module")
def trained(nih_dataset, tmp_path_factory):
    """A short real train.py run on the 100 real NIH images: (run_dir, its best checkpoint)."""
    runs = tmp_path_factory.mktemp("prevalence_runs")
    run_cli(BIN / "python", "training/train.py", "--dataset", nih_dataset, "--output-dir", runs, "--model",
            "small_cnn", "--weights", "none", "--stages", "finetune", "--epochs-finetune", 1,
            "--max-steps-per-epoch", 2, "--batch-size", 8, "--bootstrap", 20, "--backend", "single", "--no-mlflow",
            "--results-table", "none")
    (run_dir,) = runs.iterdir()
    return run_dir, run_dir / "best_finetune.pth"


def test_predict_prevalence_auto_adjusts_to_the_estimate_and_keeps_the_decisions(trained, nih_dataset, tmp_path):
    run_dir, checkpoint = trained
    assert "prevalence_estimated" in pd.read_csv(run_dir / "calibration_finetune.csv").columns
    stored = checkpoints.load(checkpoint)
    scorer = scoring.load(str(checkpoint))
    names = list(scorer.spec.label_names)
    assert scorer.val_prevalence == stored["val_prevalence"] and len(scorer.val_prevalence) == len(names)
    assert all(len(d) == 9 and d == sorted(d) for d in scorer.val_score_deciles)
    usable = [name for name, p in zip(names, scorer.val_prevalence) if 0 < p < 1]
    assert usable, scorer.val_prevalence  # val of the 100 images has some label with positives and negatives

    plain = predict(["--checkpoint", str(checkpoint), str(nih_dataset), "--output", str(tmp_path / "plain.csv")])
    auto = predict(["--checkpoint", str(checkpoint), str(nih_dataset), "--prevalence", "auto",
                    "--output", str(tmp_path / "auto.csv")])
    written = pd.read_csv(tmp_path / "auto.csv", keep_default_na=False)
    assert list(written.columns) == columns(names) and PREVALENCE_COLUMN in written.columns
    assert (pd.read_csv(tmp_path / "plain.csv", keep_default_na=False)[PREVALENCE_COLUMN] == "").all()
    (used,) = set(written[PREVALENCE_COLUMN])
    used = json.loads(used)
    assert sorted(used) == sorted(usable)
    estimates = {e.label: e for e in prevalence.estimate(
        plain[usable].to_numpy(), [scorer.val_prevalence[names.index(n)] for n in usable], usable)}
    assert all(round(estimates[name].estimate, 4) == used[name] for name in usable)
    expected = prevalence.adjust(plain[names].to_numpy(), scorer.val_prevalence,
                                 [estimates[n].estimate if n in usable else None for n in names])
    np.testing.assert_allclose(auto[names].to_numpy(), expected, atol=1e-12)
    assert not np.allclose(auto[usable].to_numpy(), plain[usable].to_numpy())
    others = [name for name in names if name not in usable]
    pd.testing.assert_frame_equal(auto[others], plain[others])
    decisions = list(map(decision_column, names))
    pd.testing.assert_frame_equal(auto[decisions], plain[decisions])  # the run's thresholds, unchanged

    label = usable[0]
    given = predict(["--checkpoint", str(checkpoint), str(nih_dataset), "--split", "test", "--prevalence",
                     f"{label}=0.5", "--output", str(tmp_path / "given.csv")])
    assert set(given[PREVALENCE_COLUMN]) == {json.dumps({label: 0.5})}
    assert len(given) < prevalence.MIN_IMAGES  # too few to estimate from: refused before anything is scored
    with pytest.raises(SystemExit, match=rf"--prevalence: .* {len(given)} here, at least {prevalence.MIN_IMAGES}"):
        predict(["--checkpoint", str(checkpoint), str(nih_dataset), "--split", "test", "--prevalence", "auto",
                 "--output", str(tmp_path / "refused.csv")])
    assert not (tmp_path / "refused.csv").exists()


def test_mlflow_model_takes_the_prevalence_param(trained):
    from cxr_pipeline.training.serving.mlflow_model import ChestXrayModel, signature

    _, checkpoint = trained
    model = ChestXrayModel()
    model.scorer = scoring.load(str(checkpoint))
    assert "prevalence" in [param.name for param in signature(model.scorer.spec).params.params]
    files = sorted(require(NIH / "images").glob("*.png"))
    assert len(files) >= prevalence.MIN_IMAGES
    images = pd.DataFrame({"content": [path.read_bytes() for path in files]})
    plain = model.predict(None, images, {"prevalence": ""})
    auto = model.predict(None, images, {"prevalence": "auto"})
    assert (plain[PREVALENCE_COLUMN] == "").all() and len(set(auto[PREVALENCE_COLUMN])) == 1
    assert json.loads(auto[PREVALENCE_COLUMN].iloc[0])
    # one HTTP request of a few images is not a site's batch: EM on them would move each probability to 0 or 1
    with pytest.raises(scoring.PrevalenceError, match=r"6 here, at least 100 needed .* or give the prevalence"):
        model.predict(None, images[:6], {"prevalence": "auto"})
    label = next(name for name, p in zip(model.scorer.spec.label_names, model.scorer.val_prevalence) if 0 < p < 1)
    given = model.predict(None, images[:6], {"prevalence": f"{label}=0.3"})  # a number needs no batch
    assert set(given[PREVALENCE_COLUMN]) == {json.dumps({label: 0.3})}


def test_a_checkpoint_without_val_prevalence_is_refused_with_what_to_do(trained, nih_dataset, tmp_path):
    _, checkpoint = trained
    old = {k: v for k, v in checkpoints.load(checkpoint).items() if k not in ("val_prevalence", "val_score_deciles")}
    checkpoints.save(old, tmp_path / "old.pth")
    assert scoring.load(str(tmp_path / "old.pth")).val_prevalence is None
    with pytest.raises(SystemExit, match="holds no val prevalence .* retrain the model, or score without --prevalence"):
        predict(["--checkpoint", str(tmp_path / "old.pth"), str(nih_dataset), "--prevalence", "auto"])
    scored = predict(["--checkpoint", str(tmp_path / "old.pth"), str(nih_dataset), "--split", "test",
                      "--output", str(tmp_path / "p.csv")])  # without the flag it scores as before
    assert (scored[PREVALENCE_COLUMN] == "").all()
