"""Does the estimated prevalence fix the calibration where the model runs? Probabilities of a one-label model on
a labelled image folder, four ways, against the truth its folder names give:

    python -m benchmarks.prevalence --checkpoint outputs/kermany/runs/RUN/best_finetune.pth \\
        --images ../shared/data/kermany/test

(i) the network's own probabilities, before calibration; (ii) calibrated (fitted on val, so they hold val's
prevalence: what `predict` writes); (iii) moved to the prevalence EM estimates from these images' probabilities
alone, labels unseen (`predict --prevalence auto`; training/evaluation/prevalence.py); (iv) moved to the folder's
true prevalence (the best a known prevalence could do). Per row: ECE (15 equal-width bins,
training/evaluation/calibration.py); the ECE's noise floor, the ECE the same probabilities would get on this many
images were they exactly right (median and 95 % range over --resamples draws of truth ~ Bernoulli(p): an ECE
within that range is as good as N images can show); the Brier score with a 95 % percentile bootstrap interval
over images (--resamples; row (iii) re-estimates the prevalence in every resample, so its interval includes the
estimate's own noise); the mean probability. Then the estimated prevalence with its interval (predict's
bootstrap) beside the true one and val's. Truth: an image under a folder named as --positive is positive, under
--negative negative; others are left out. The images are decoded and scored as `predict` does
(training/serving/scorer.py).

--val-dataset D (the run's ETL dataset): the same model's real val scores, resampled by class to prevalences
--shifts (a pure prior shift: each class's images as they are, only their proportions changed; val is where the
calibration was fitted, 2 parameters): per prevalence, over --repeats resamples of val's size, the mean
estimate, its mean error, how often its 95 % interval holds the truth, and the ECE before and after moving the
probabilities to the estimate. What the estimator does when its assumption holds, beside what it does on the
folder, where it may not."""
from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

import pyarrow.parquet as pq

from cxr_pipeline.etl import versions
from cxr_pipeline.schema import read_dataset_spec, split_dir
from cxr_pipeline.training.evaluation import calibration, prevalence
from cxr_pipeline.training.serving.scorer import dataset_batches, image_paths, load, read_batches

ECE_BINS = 15


def score_folder(checkpoint: str, folder: str, positive: str, negative: str, batch_size: int):
    """(scorer, truth (N,), raw (N,), calibrated (N,)) for the images of `folder` under a positive or negative
    folder name."""
    scorer = load(checkpoint)
    if scorer.spec.num_labels != 1:
        raise SystemExit(f"{checkpoint} has {scorer.spec.num_labels} labels; this benchmark takes one-label models")
    if scorer.val_prevalence is None:
        raise SystemExit(f"{checkpoint} holds no val_prevalence: retrain it with this version of train.py")
    classes = {positive.lower(): 1.0, negative.lower(): 0.0}
    paths = [(i, p) for i, p in image_paths([folder]) if p.parent.name.lower() in classes]
    if not paths:
        raise SystemExit(f"{folder}: no images under folders named {positive} or {negative}")
    raw = []
    for _, _, stored, errors in read_batches(paths, scorer.spec, batch_size):
        if errors:
            raise SystemExit(f"unreadable images: {errors}")
        raw.append(scorer.probabilities(stored, calibrated=False)[:, 0])
    raw = np.concatenate(raw)
    truth = np.array([classes[p.parent.name.lower()] for _, p in paths])
    return scorer, truth, raw, calibration.apply(scorer.calibration, raw[:, None])[:, 0]


def ece(truth: np.ndarray, probabilities: np.ndarray) -> float:
    return calibration.expected_calibration_error(truth, probabilities, ECE_BINS)


def noise_floor(probabilities: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(median, 2.5 %, 97.5 %) of the ECE of `probabilities` against truth drawn from them: what exact
    probabilities score on this many images."""
    found = [ece((rng.random(len(probabilities)) < probabilities).astype(float), probabilities) for _ in range(draws)]
    return np.percentile(found, [50, 2.5, 97.5])


def measure(truth: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, prior: float, resamples: int,
            seed: int = 0) -> dict:
    """The four rows' figures with bootstrap intervals, and the prevalence estimate."""
    (estimated,) = prevalence.estimate(calibrated[:, None], [prior], ["label"], n_resamples=resamples, seed=seed)
    truth_prevalence = float(truth.mean())

    def moved(scores, target):
        return prevalence.adjust(scores[:, None], [prior], [target])[:, 0]

    rows = {"(i) before calibration": lambda idx: raw[idx],
            "(ii) calibrated on val (val's prevalence)": lambda idx: calibrated[idx],
            "(iii) moved to the estimated prevalence": lambda idx: moved(calibrated[idx], prevalence.estimate(
                calibrated[idx, None], [prior], ["label"], n_resamples=0)[0].estimate),
            "(iv) moved to the true prevalence": lambda idx: moved(calibrated[idx], float(truth[idx].mean()))}
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, len(truth), len(truth)) for _ in range(resamples)]
    everything = np.arange(len(truth))
    table = {}
    for name, scores_of in rows.items():
        scores = scores_of(everything)
        brier = [calibration.brier(truth[idx], scores_of(idx)) for idx in samples]
        table[name] = {"ece": ece(truth, scores), "ece_floor": noise_floor(scores, resamples, rng),
                       "brier": calibration.brier(truth, scores), "brier_ci": np.percentile(brier, [2.5, 97.5]),
                       "mean": float(scores.mean())}
    return {"table": table, "estimate": estimated, "truth": truth_prevalence, "prior": prior,
            "auroc": float(roc_auc_score(truth, calibrated)), "images": len(truth),
            "positives": int(truth.sum())}


def report(result: dict, checkpoint: str, images: str) -> str:
    e = result["estimate"]
    lines = [f"{result['images']} images of {images} ({result['positives']} positive: true prevalence "
             f"{result['truth']:.3f}), {checkpoint}; AUROC {result['auroc']:.4f} (the same in every row: all "
             "four keep the ranking)",
             "",
             "| probabilities | ECE (15 bins) | ECE were they exact: median [95 % range] | Brier [95 % CI] "
             "| mean probability |",
             "|---|---|---|---|---|"]
    for name, row in result["table"].items():
        floor, brier = row["ece_floor"], row["brier_ci"]
        lines.append(f"| {name} | {row['ece']:.3f} | {floor[0]:.3f} [{floor[1]:.3f}, {floor[2]:.3f}] | "
                     f"{row['brier']:.3f} [{brier[0]:.3f}, {brier[1]:.3f}] | {row['mean']:.3f} |")
    lines += ["", f"prevalence: estimated {e.estimate:.3f} [95 % CI {e.low:.3f}, {e.high:.3f}] ({e.iterations} EM "
                  f"iterations), true {result['truth']:.3f}, val's (the prior) {result['prior']:.3f}"]
    return "\n".join(lines)


def val_scores(scorer, dataset: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, calibrated probability) of the dataset's val rows with known truth, scored from the stored pixels."""
    path = versions.resolve(dataset).path
    spec = read_dataset_spec(path)
    scores = np.concatenate([scorer.probabilities(stored)[:, 0]
                             for _, _, stored, _ in dataset_batches(path, ["val"], spec, batch_size)])
    files = sorted(split_dir(path, "val").glob("*.parquet"))
    truth = np.concatenate([np.asarray(pq.ParquetFile(f).read(columns=["labels"]).column("labels").to_pylist(),
                                       dtype=np.float64)[:, 0] for f in files])
    known = (truth == 0) | (truth == 1)
    return truth[known], scores[known]


def prior_shift(truth: np.ndarray, scores: np.ndarray, prior: float, shifts, repeats: int, seed: int = 0) -> list:
    """Per prevalence in `shifts`: val resampled by class to it (val's size), `repeats` times."""
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(truth == 1), np.flatnonzero(truth == 0)
    rows = []
    for shifted in shifts:
        found = []
        for _ in range(repeats):
            n_positive = int(round(shifted * len(truth)))
            idx = np.r_[rng.choice(positives, n_positive), rng.choice(negatives, len(truth) - n_positive)]
            (e,) = prevalence.estimate(scores[idx, None], [prior], ["label"], seed=int(rng.integers(1 << 31)))
            moved = prevalence.adjust(scores[idx, None], [prior], [e.estimate])[:, 0]
            found.append((e.estimate, e.low <= n_positive / len(idx) <= e.high, ece(truth[idx], scores[idx]),
                          ece(truth[idx], moved)))
        found = np.array(found, dtype=np.float64)
        rows.append({"prevalence": shifted, "estimate": found[:, 0].mean(),
                     "error": np.abs(found[:, 0] - shifted).mean(), "coverage": found[:, 1].mean(),
                     "ece": found[:, 2].mean(), "ece_adjusted": found[:, 3].mean()})
    return rows


def shift_report(rows: list, images: int, repeats: int) -> str:
    lines = [f"val resampled by class ({images} images, {repeats} resamples per prevalence):", "",
             "| true prevalence | mean estimate | mean abs error | 95 % interval holds the truth | ECE calibrated "
             "| ECE moved to the estimate |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['prevalence']:.2f} | {r['estimate']:.3f} | {r['error']:.3f} | {r['coverage']:.0%} | "
              f"{r['ece']:.3f} | {r['ece_adjusted']:.3f} |" for r in rows]
    return "\n".join(lines)


def class_report(splits: dict) -> str:
    """Each class's calibrated probabilities per split: a prior shift leaves them as they are; where they moved,
    no prevalence can put the calibration right."""
    lines = ["| calibrated probabilities of | mean, negatives | share of negatives > 0.5 | mean, positives | "
             "share of positives < 0.5 |", "|---|---|---|---|---|"]
    for name, (truth, scores) in splits.items():
        negative, positive = scores[truth == 0], scores[truth == 1]
        lines.append(f"| {name} | {negative.mean():.3f} | {(negative > 0.5).mean():.3f} | {positive.mean():.3f} | "
                     f"{(positive < 0.5).mean():.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/best_<stage>.pth of a one-label model")
    parser.add_argument("--images", required=True, help="a folder with --positive and --negative subfolders")
    parser.add_argument("--positive", default="PNEUMONIA")
    parser.add_argument("--negative", default="NORMAL")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-dataset", help="the run's ETL dataset: also resample its val split by class")
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    scorer, folder_truth, raw, calibrated = score_folder(args.checkpoint, args.images, args.positive, args.negative,
                                                  args.batch_size)
    result = measure(folder_truth, raw, calibrated, scorer.val_prevalence[0], args.resamples)
    print(report(result, args.checkpoint, args.images))
    if args.val_dataset:
        truth, scores = val_scores(scorer, args.val_dataset, args.batch_size)
        result["prior_shift"] = prior_shift(truth, scores, scorer.val_prevalence[0], args.shifts, args.repeats)
        print("\n" + shift_report(result["prior_shift"], len(truth), args.repeats))
        print("\n" + class_report({"val": (truth, scores), "the folder": (folder_truth, calibrated)}))
    return result


if __name__ == "__main__":
    main()
