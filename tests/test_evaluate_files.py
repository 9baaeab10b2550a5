"""training.evaluate from files: any tool's predictions against a labels CSV, no ETL."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import NIH, require
from cxr_pipeline.etl.sources.nih import LABEL_NAMES, parse_labels
from cxr_pipeline.training.evaluate import main as evaluate
from cxr_pipeline.training.evaluation.calibration import reliability


def noisy_scores(truth: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.35 * truth + rng.random(truth.shape) * 0.8, 0, 1).round(6)


def test_22k_predictions_against_the_real_nih_table_match_sklearn(tmp_path):
    table = pd.read_csv(require(NIH / "Data_Entry_2017_v2020.csv.gz"))
    sample = table.sample(22_000, random_state=0)
    truth = np.asarray(parse_labels(sample["Finding Labels"])[0].tolist())
    scores = noisy_scores(truth, 1)
    predictions = pd.DataFrame(scores, columns=[name.replace("_", " ").lower() for name in LABEL_NAMES])
    predictions.insert(0, "Image Index", sample["Image Index"].to_numpy())
    predictions.to_csv(tmp_path / "predictions.csv", index=False)

    report = evaluate(["--predictions", str(tmp_path / "predictions.csv"), "--labels-csv",
                       str(NIH / "Data_Entry_2017_v2020.csv.gz"), "--bootstrap", "200", "--output-dir",
                       str(tmp_path / "eval")])
    assert [row["label"] for row in report] == [*LABEL_NAMES, "mean"]
    for index, row in enumerate(report[:-1]):
        assert round(row["auroc"], 4) == round(roc_auc_score(truth[:, index], scores[:, index]), 4)
        assert row["auroc_ci_low"] < row["auroc"] < row["auroc_ci_high"]
        assert row["n_pos"] + row["n_neg"] == 22_000
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "90120 images of the labels file have no prediction" in page  # counted, not silently dropped
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 10_000
    assert (tmp_path / "eval" / "reliability.png").exists()


def test_labels_csv_gives_the_same_intervals_as_the_parquet_path(nih_dataset, tmp_path):
    split = pd.read_parquet(nih_dataset / "split=test", columns=["image_id"])
    ids = sorted(split["image_id"])
    scores = np.random.default_rng(2).random((len(ids), len(LABEL_NAMES))).round(6)
    predictions = pd.DataFrame(scores, columns=list(LABEL_NAMES))
    predictions.insert(0, "image_id", ids)
    predictions.to_csv(tmp_path / "p.csv", index=False)
    common = ["--predictions", str(tmp_path / "p.csv"), "--bootstrap", "300"]
    from_parquet = evaluate([*common, "--dataset", str(nih_dataset), "--split", "test"])
    from_labels = evaluate([*common, "--labels-csv", str(NIH / "Data_Entry_sample.csv")])
    for a, b in zip(from_parquet, from_labels):
        assert a["label"] == b["label"] and (a["n_pos"], a["n_neg"]) == (b["n_pos"], b["n_neg"])
        for column in ("auroc", "auroc_ci_low", "auroc_ci_high"):
            assert (a[column] is None and b[column] is None) or a[column] == pytest.approx(b[column], abs=1e-12)


def chexpert_like(tmp_path):
    """A CheXpert-style wide file with uncertain (-1) and blank values."""
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"Path": [f"CheXpert-v1.0/valid/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.jpg"
                                   for i in range(200)],
                          "Sex": "Female", "Age": 60,
                          "Pleural Effusion": rng.choice(["1.0", "0.0", "-1.0", ""], 200, p=[.3, .5, .1, .1]),
                          "Cardiomegaly": rng.choice(["1.0", "0.0"], 200)})
    frame.to_csv(tmp_path / "valid.csv", index=False)
    return frame


def test_chexpert_spellings_uncertain_values_and_extra_columns_are_counted(tmp_path, capsys):
    labels = chexpert_like(tmp_path)
    rng = np.random.default_rng(5)
    predictions = pd.DataFrame({"Path": labels["Path"], "pleural_effusion": rng.random(200),
                                "CARDIOMEGALY": rng.random(200), "Fracture": rng.random(200)})
    predictions.to_csv(tmp_path / "p.csv", index=False)
    report = evaluate(["--predictions", str(tmp_path / "p.csv"), "--labels-csv", str(tmp_path / "valid.csv"),
                       "--bootstrap", "100"])
    out = capsys.readouterr().out
    truth = pd.to_numeric(labels["Pleural Effusion"], errors="coerce")
    known = truth.isin([0, 1])
    assert report[0]["label"] == "Pleural Effusion" and report[0]["n_pos"] + report[0]["n_neg"] == known.sum()
    assert report[0]["auroc"] == pytest.approx(roc_auc_score(truth[known], predictions["pleural_effusion"][known]))
    assert f"{(truth == -1).sum()} uncertain (-1) and {labels['Pleural Effusion'].eq('').sum()} blank" in out
    assert "1 prediction columns match no label and are ignored: ['Fracture']" in out
    assert "100 patients" in out  # patient ids taken from CheXpert's paths


@pytest.mark.parametrize("naming", [[], ["--score-suffix", "_prob"], ["--score-columns", "{label}_prob"]])
def test_one_file_with_truth_and_scores(tmp_path, naming):
    """Truth in `Pneumonia`, scores in `Pneumonia_prob`: found without being told, and as told."""
    rng = np.random.default_rng(6)
    truth = rng.integers(0, 2, 300)
    scores = np.clip(truth * 0.3 + rng.random(300), 0, 1)
    pd.DataFrame({"image_id": [f"i{k}" for k in range(300)], "Pneumonia": truth, "Pneumonia_prob": scores}).to_csv(
        tmp_path / "both.csv", index=False)
    (row, _) = evaluate(["--predictions", str(tmp_path / "both.csv"), "--labels-csv", str(tmp_path / "both.csv"),
                         *naming, "--bootstrap", "100"])
    assert row["auroc"] == pytest.approx(roc_auc_score(truth, scores))


def test_prefixed_score_columns_of_the_chexnet_reproductions_on_the_real_nih_table(tmp_path, capsys):
    """`prob_<label>` columns, as the public CheXNet reproductions write them, against NIH's own table: found
    without a flag, the template named in the printed notes and the page."""
    table = pd.read_csv(require(NIH / "Data_Entry_2017_v2020.csv.gz"))
    sample = table.sample(3_000, random_state=7)
    truth = np.asarray(parse_labels(sample["Finding Labels"])[0].tolist())
    scores = noisy_scores(truth, 8)
    predictions = pd.DataFrame(scores, columns=[f"prob_{name}" for name in LABEL_NAMES])
    predictions.insert(0, "Image Index", sample["Image Index"].to_numpy())
    predictions.to_csv(tmp_path / "chexnet.csv", index=False)
    report = evaluate(["--predictions", str(tmp_path / "chexnet.csv"), "--labels-csv",
                       str(NIH / "Data_Entry_2017_v2020.csv.gz"), "--bootstrap", "50", "--output-dir",
                       str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert [row["label"] for row in report] == [*LABEL_NAMES, "mean"]
    for index, row in enumerate(report[:-1]):
        assert row["auroc"] == pytest.approx(roc_auc_score(truth[:, index], scores[:, index]))
    assert "note: score columns matched as 'prob_{label}' (14 labels, e.g. 'prob_Atelectasis')" in out
    assert "match no label" not in out
    assert "score columns matched as &#x27;prob_{label}&#x27;" in (tmp_path / "eval" / "report.html").read_text()


def test_an_explicit_template_names_score_columns_no_known_template_fits(tmp_path, capsys):
    """`{label}_score` (spelled any way: `pleural thickening_SCORE`) on the real NIH sample's labels; without
    the template the file is refused with the flag to give."""
    labels = NIH / "Data_Entry_sample.csv"
    sample = pd.read_csv(require(labels))
    truth = np.asarray(parse_labels(sample["Finding Labels"])[0].tolist())
    scores = noisy_scores(truth, 9)
    predictions = pd.DataFrame(scores, columns=[f"{name.replace('_', ' ').lower()}_SCORE" for name in LABEL_NAMES])
    predictions.insert(0, "Image Index", sample["Image Index"].to_numpy())
    predictions["model_score"] = 0.5  # fits the template, names no label: counted
    predictions.to_csv(tmp_path / "scored.csv", index=False)
    common = ["--predictions", str(tmp_path / "scored.csv"), "--labels-csv", str(labels), "--bootstrap", "50"]
    report = evaluate([*common, "--score-columns", "{label}_score"])
    out = capsys.readouterr().out
    assert "note: score columns matched as '{label}_score' (14 labels" in out
    assert "1 prediction columns match no label and are ignored: ['model_score']" in out
    for index, row in enumerate(report[:-1]):
        if row["auroc"] is not None:
            assert row["auroc"] == pytest.approx(roc_auc_score(truth[:, index], scores[:, index]))
    with pytest.raises(SystemExit, match="has no column matching.*--score-columns"):
        evaluate(common)
    with pytest.raises(SystemExit, match="must hold {label} once"):
        evaluate([*common, "--score-columns", "score"])


@pytest.mark.parametrize("change, message", [
    (lambda p: p.assign(Cardiomegaly=p["Cardiomegaly"].where(p.index != 3)), "1 scores are missing or not numbers"),
    (lambda p: p.assign(Cardiomegaly=p["Cardiomegaly"].astype(object).where(p.index != 5, "high")),
     "1 scores are missing or not numbers"),
    (lambda p: pd.concat([p, p.iloc[:1].assign(Path="elsewhere/x.jpg")]), "1 predicted image ids are not in"),
    (lambda p: pd.concat([p, p.iloc[:1]]), "appears more than once"),
    (lambda p: p.rename(columns={"Cardiomegaly": "Hernia", "Pleural Effusion": "Mass"}), "has no column matching"),
])
def test_bad_prediction_files_get_a_clear_error(tmp_path, change, message):
    labels = chexpert_like(tmp_path)
    predictions = pd.DataFrame({"Path": labels["Path"], "Pleural Effusion": 0.5, "Cardiomegaly": 0.5})
    change(predictions).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(SystemExit, match=message):
        evaluate(["--predictions", str(tmp_path / "p.csv"), "--labels-csv", str(tmp_path / "valid.csv")])


def test_labels_that_are_not_numbers_get_a_clear_error(tmp_path):
    labels = chexpert_like(tmp_path).assign(Cardiomegaly="yes")
    labels.to_csv(tmp_path / "valid.csv", index=False)
    pd.DataFrame({"Path": labels["Path"], "Cardiomegaly": 0.5}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(SystemExit, match="200 label values are not numbers, e.g. Cardiomegaly='yes'"):
        evaluate(["--predictions", str(tmp_path / "p.csv"), "--labels-csv", str(tmp_path / "valid.csv")])


def test_reliability_bins_hold_equal_counts_so_no_point_stands_for_a_handful_of_images():
    """Scores crowded near 0 with a thin tail: equal-width bins would give the tail's few images a point
    each; quantile bins give every point about a tenth of the images, fewer bins when images are few, and
    keep equal scores together."""
    rng = np.random.default_rng(10)
    scores = np.concatenate([rng.beta(1, 12, 995), [0.55, 0.7, 0.8, 0.9, 0.97]])
    truth = (rng.random(1000) < scores).astype(float)
    mean, observed, counts = reliability(truth, scores)
    assert len(counts) == 10 and counts.sum() == 1000 and counts.min() == counts.max() == 100
    assert np.all(np.diff(mean) > 0) and ((observed >= 0) & (observed <= 1)).all()
    assert len(reliability(truth[:50], scores[:50])[2]) == 2 and len(reliability(truth[:15], scores[:15])[2]) == 1
    tied = np.repeat([0.1, 0.2, 0.9], [300, 500, 200])
    _, _, counts = reliability(np.zeros(1000), tied)
    assert sorted(counts) == [200, 300, 500]
