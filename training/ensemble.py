"""Average the probabilities of several models and score the average like one model.

    # the 3 best epochs of one run (train.py --keep-epochs 3), on the test split
    python -m training.ensemble --dataset /data/nih_224 --split test RUN/epoch_finetune_*.pth
    # different models or resolutions: each member's own predictions of the same images
    python -m training.ensemble --dataset /data/nih_224 --split test \\
        RUN_R50/predictions_finetune_test.csv RUN_D121_512/predictions_finetune_test.csv \\
        --results-table outputs/results_delta

A member is a checkpoint written by train.py (best_<stage>.pth, epoch_<stage>_<n>.pth), scored
here on DATASET's split, or a predictions CSV (image_id, one probability column per label), as
train.py writes for each split: that is how models trained at other resolutions join, since
each was scored on its own dataset of the same images. Rows go to the Delta table as model
`ensemble`, with the members in `model_config`.
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_pipeline.etl import versions
from cxr_pipeline.schema import DatasetSpec, read_dataset_spec
from cxr_pipeline.training.data.reader import METADATA_COLUMNS, SplitReader
from cxr_pipeline.training.evaluate import print_report, score
from cxr_pipeline.training.evaluation.metrics import mean_auroc, per_label_auroc
from cxr_pipeline.training.evaluation.plots import roc_curves
from cxr_pipeline.training.evaluation.results import add_engine_argument, write_results
from cxr_pipeline.training.loop.run_ids import new_run_id
from cxr_pipeline.training.models.fusion import metadata_features
from cxr_pipeline.training.models.registry import uses_metadata
from cxr_pipeline.training.serving.predictions import ModelIdentity, prediction_frame, write_predictions_csv
from cxr_pipeline.training.serving.scorer import check_pixels, load


@torch.no_grad()
def score_checkpoint(path: Path, dataset: Path, split: str, spec: DatasetSpec, batch_size: int) -> pd.DataFrame:
    """Probabilities of a train.py checkpoint on a split (calibrated where the checkpoint carries a
    calibration), one row per image_id."""
    scorer = load(str(path))
    trained_on = scorer.spec
    if trained_on.label_names != spec.label_names or trained_on.label_policies != spec.label_policies:
        raise SystemExit(f"{path} was trained on labels {list(trained_on.label_names)}, not those of {dataset}")
    check_pixels(trained_on, spec, dataset, instead=f"pass {path.name}'s predictions CSV of a dataset of that size "
                                                    "(train.py writes one per split)")
    fused = uses_metadata(scorer.model_name)
    frames = []
    for batch in SplitReader(dataset, split, spec, batch_size, with_metadata=fused):
        extra = (metadata_features(*(batch.metadata[c] for c in METADATA_COLUMNS)),) if fused else ()
        probabilities = scorer.probabilities(batch.images, extra)
        frames.append(pd.DataFrame(probabilities, columns=list(spec.label_names), index=batch.image_ids))
    return pd.concat(frames).rename_axis("image_id")


def member_predictions(member: str, dataset: Path, split: str, spec: DatasetSpec, batch_size: int) -> pd.DataFrame:
    path = Path(member)
    if not path.exists():
        raise SystemExit(f"ensemble member {member}: no such file")
    if path.suffix == ".pth":
        return score_checkpoint(path, dataset, split, spec, batch_size)
    table = pd.read_csv(path)
    missing = [c for c in ("image_id", *spec.label_names) if c not in table.columns]
    if missing:
        raise SystemExit(f"{member} lacks columns {missing}: expected image_id and one column per label")
    return table.set_index("image_id")[list(spec.label_names)]


def average(members: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """Mean probability per image over members that all scored the same images."""
    reference = members[0].index
    for frame, name in zip(members[1:], names[1:]):
        if set(frame.index) != set(reference):
            raise SystemExit(f"{name} scored {len(frame)} images, {names[0]} {len(reference)}, and not the same "
                             "ones: members must score the same split of the same images")
    return sum(frame.loc[reference] for frame in members) / len(members)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="+", help="checkpoints (.pth) and/or predictions CSVs, two or more")
    parser.add_argument("--dataset", required=True, help="folder written by etl/preprocess.py, for the labels")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--output-dir", help="where the averaged predictions and ROC PNG go "
                                             "(default outputs/ensembles/RUN_ID)")
    parser.add_argument("--results-table", help="also append the rows to this Delta table")
    add_engine_argument(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="for scoring checkpoints")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-level resamples for 95%% CIs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.members) < 2:
        raise SystemExit("an ensemble needs at least two members")

    dataset = versions.resolve(args.dataset).path
    spec = read_dataset_spec(dataset)
    frames = [member_predictions(m, dataset, args.split, spec, args.batch_size) for m in args.members]
    averaged = average(frames, args.members)
    report, aligned = score(averaged.reset_index(), dataset, args.split, args.bootstrap, args.seed)
    print_report(f"ensemble of {len(frames)} on {dataset} {args.split}", report, aligned)
    for name, frame in zip(args.members, frames):
        member_mean = mean_auroc(per_label_auroc(aligned.truth, frame.loc[aligned.image_ids].to_numpy(),
                                                 spec.label_names))
        print(f"  member {name}: mean AUROC {'n/a' if member_mean is None else f'{member_mean:.4f}'}")

    run_id = new_run_id("ensemble")
    output = Path(args.output_dir or Path("outputs/ensembles") / run_id)
    output.mkdir(parents=True, exist_ok=True)
    no_decisions = np.full(averaged.shape, np.nan)  # an ensemble has no operating point of its own
    rows = prediction_frame(spec.label_names, averaged.index, [f"{args.split}/{i}" for i in averaged.index],
                            averaged.to_numpy(), no_decisions, [""] * len(averaged), ModelIdentity(run_id=run_id))
    write_predictions_csv(rows, output / f"predictions_ensemble_{args.split}.csv")
    roc_curves(aligned.truth, aligned.scores, report, output / f"roc_ensemble_{args.split}.png",
               f"ensemble of {len(frames)}, {args.split}: {len(aligned.image_ids)} images")
    if args.results_table:
        created = datetime.now(timezone.utc)
        write_results(args.results_table, [{
            "run_id": run_id, "created_at": created, "dataset": spec.dataset, "image_size": spec.image_size,
            "model": "ensemble", "stage": "ensemble", "split": args.split, **row, "world_size": 1,
            "backend": "single", "run_dir": str(output.resolve()),
            "model_config": json.dumps({"members": [str(Path(m).resolve()) for m in args.members]}),
        } for row in report], args.results_engine)
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
