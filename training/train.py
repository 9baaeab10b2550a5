"""Train a chest X-ray classifier on the ETL's Parquet: knowledge transfer, then fine-tuning.

    python training/train.py --config conf/demo.yaml                        # one process
    horovodrun -np 4 python training/train.py --config conf/nih.yaml        # Horovod (Gloo/NCCL)
    torchrun --nproc_per_node 4 training/train.py --config conf/nih.yaml    # torch.distributed

Stages run in order (`--stages kt,finetune`): `kt` freezes the backbone and trains the head,
`finetune` trains every layer starting from the best `kt` weights. Each stage keeps the
checkpoint with the best validation mean AUROC, evaluates it on val and test, and appends
per-label AUROC rows to the Delta results table. Only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from cxr_pipeline.config import dump_config, parse_args
from cxr_pipeline.etl import versions
from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.data.augment import Augmentation
from cxr_pipeline.training.data.inputs import NORMALISATIONS, InputTransform
from cxr_pipeline.training.data.reader import label_table
from cxr_pipeline.training.data.sampling import Oversampler
from cxr_pipeline.training.data.targets import LOSSES, LabelLayout, LabelLoss, positive_weights
from cxr_pipeline.training.evaluation import calibration
from cxr_pipeline.training.evaluation.gathered import Feed, predict_for_report
from cxr_pipeline.training.evaluation.operating_points import DEFAULT_POLICIES, Policy, parse_policies
from cxr_pipeline.training.evaluation.results import add_engine_argument, NO_TABLE, read_results, read_run_rows
from cxr_pipeline.training.evaluation.run_report import write_report
from cxr_pipeline.training.loop import checkpoints, distributed
from cxr_pipeline.training.loop.epochs import STAGES, StageLoop
from cxr_pipeline.training.loop.outputs import RunOutputs
from cxr_pipeline.training.loop.precision import AMP_MODES, Precision
from cxr_pipeline.training.loop.run_ids import new_run_id
from cxr_pipeline.training.loop.schedules import OPTIMIZERS, SCHEDULES
from cxr_pipeline.training.models.registry import MODELS, uses_metadata
from cxr_pipeline.training.serving import tracking

log = logging.getLogger("train")
# The policy that held up on data from elsewhere (README, "Evaluation": measured on the official
# pneumonia test split, where thresholds at Youden's J or the F1 optimum on val did not).
DEFAULT_OPERATING_POINT = "sens>=0.95"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and outputs")
    data.add_argument("--dataset", help="folder written by etl/preprocess.py (its --output): its current version is "
                                        "resolved once at the start and recorded; name ROOT/_versions/ID to pin one")
    data.add_argument("--output-dir", default="outputs/runs",
                      help="runs go to OUTPUT_DIR/RUN_ID (default outputs/runs)")
    data.add_argument("--results-table", default="outputs/results_delta",
                      help="Delta table of AUROC rows: a folder, or catalog.schema.table (delta-spark); 'none' keeps "
                           "them only in RUN_DIR/auroc_rows.parquet, for a driver to publish "
                           "(jobs/train_distributor.py)")
    data.add_argument("--predict-train", action="store_true",
                      help="also write each stage's best-model probabilities on the train split "
                           "(predictions_<stage>_train.csv), e.g. for the U-SelfTrained relabel step")
    data.add_argument("--keep-epochs", type=int, default=0,
                      help="also keep the N best epochs of each stage as epoch_<stage>_<epoch>.pth, e.g. for "
                           "python -m training.ensemble (default 0: only best_<stage>.pth)")
    add_engine_argument(data)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODELS), default="densenet121")
    model.add_argument("--weights", default="imagenet", help="imagenet (downloads once), none, or a checkpoint path")
    model.add_argument("--normalisation", choices=NORMALISATIONS, default="dataset",
                       help="dataset: the per-channel mean and std the ETL recorded (ImageNet's, which pretrained "
                            "backbones expect; default); mean-image: the train split's average image subtracted "
                            "(report 002; the ETL's OUTPUT/_mean_image.npz)")
    model.add_argument("--eval-resize", type=int, default=0,
                       help="evaluation (val, test, predict): resize the stored image to this size first (0: no)")
    model.add_argument("--eval-crop", type=int, default=0,
                       help="evaluation: then take the centre crop of this size, CheXNet-style (0: whole image)")
    schedule = parser.add_argument_group("stages and optimisation")
    schedule.add_argument("--stages", default="kt,finetune", help="comma-separated, from: " + ", ".join(STAGES))
    schedule.add_argument("--epochs-kt", type=int, default=5, help="epochs of knowledge transfer (default 5)")
    schedule.add_argument("--epochs-finetune", type=int, default=10, help="epochs of fine-tuning (default 10)")
    schedule.add_argument("--lr-kt", type=float, default=1e-3, help="learning rate per rank, kt (default 1e-3)")
    schedule.add_argument("--lr-finetune", type=float, default=1e-4, help="same for finetune (default 1e-4)")
    schedule.add_argument("--warmup-steps", type=int, default=20,
                          help="linear LR warm-up steps; the LR is scaled by the number of ranks (default 20)")
    schedule.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                          help="adam (betas 0.9/0.999, as CheXpert; default), adamw (decoupled --weight-decay), "
                               "rmsprop (Keras' rho 0.9, eps 1e-7, no momentum: report 003) or sgd (with --momentum)")
    schedule.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    schedule.add_argument("--weight-decay", type=float, default=0.0,
                          help="L2 penalty (adam, sgd) or decoupled weight decay (adamw); default 0")
    schedule.add_argument("--schedule", choices=SCHEDULES, default="constant",
                          help="after warm-up: constant (default), step (x --lr-gamma every --lr-step-epochs), "
                               "plateau (x --lr-gamma after --lr-patience epochs without a better val AUROC) or "
                               "cosine (to 0 over the stage)")
    schedule.add_argument("--lr-gamma", type=float, default=0.1, help="factor of step and plateau drops (0.1)")
    schedule.add_argument("--lr-step-epochs", type=int, default=3, help="epochs between step drops (3)")
    schedule.add_argument("--lr-patience", type=int, default=1, help="plateau: epochs without improvement (1)")
    schedule.add_argument("--batch-size", type=int, default=16, help="per rank (default 16)")
    schedule.add_argument("--augment", default="none",
                          help="train-time augmentation: none (default), default (flip, +-7 degrees, zoom 10%%, "
                               "shift 5%%, brightness/contrast 10%%), or overrides such as "
                               "'flip=0,rotate_degrees=10' (training/data/augment.py); seeded per epoch and rank")
    schedule.add_argument("--augment-minority-only", action="store_true",
                          help="augment only the rows of the classes --oversample repeats, as report 003 "
                               "augmented its NORMAL copies; the other rows go in as stored")
    schedule.add_argument("--loss", choices=LOSSES, default="pos-weighted",
                          help="binary cross-entropy, unweighted (bce), with per-label positive weights "
                               "negatives/positives of the train split (pos-weighted, default), or with the "
                               "per-batch weights of ChestX-ray8 (batch-weighted); masked labels never count and "
                               "U-MultiClass labels always use a three-way cross-entropy")
    schedule.add_argument("--oversample", type=float, default=0.0,
                          help="instead of weighting: repeat rows of each class with fewer rows than this "
                               "fraction of the most common class, up to that count (1 balances a binary task), "
                               "seeded; use with --loss bce (training/data/sampling.py; default 0: off)")
    schedule.add_argument("--max-steps-per-epoch", type=int, default=0, help="stop epochs early (0: full pass)")
    schedule.add_argument("--bootstrap", type=int, default=1000,
                          help="patient-level bootstrap resamples for the 95%% CI of each AUROC (default 1000)")
    decisions = parser.add_argument_group("calibration and operating points (fitted on val, applied to test)")
    decisions.add_argument("--calibration", choices=calibration.METHODS, default="auto",
                           help="per-label calibration of the probabilities, fitted on val and stored with the "
                                "checkpoint: platt, temperature, isotonic, auto (isotonic with >= "
                                f"{calibration.ISOTONIC_MIN_PER_CLASS} val positives and negatives, else platt; "
                                "default) or none (training/evaluation/calibration.py)")
    decisions.add_argument("--operating-point", default=DEFAULT_OPERATING_POINT,
                           help="policy of the thresholds that predict uses and the Delta rows report: youden, "
                                "f1, sens>=X, spec>=X or prevalence=P (training/evaluation/operating_points.py; "
                                f"default {DEFAULT_OPERATING_POINT}, see README)")
    decisions.add_argument("--operating-points", default=",".join(DEFAULT_POLICIES),
                           help="policies whose val-chosen thresholds the report shows on val and test "
                                f"(default {','.join(DEFAULT_POLICIES)})")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--backend", default="auto", choices=["auto", "horovod", "torch", "single"],
                         help="auto: horovod under horovodrun, torch under torchrun, else single")
    runtime.add_argument("--seed", type=int, default=0)
    runtime.add_argument("--amp", choices=AMP_MODES, default="off",
                         help="mixed precision: bf16 or fp16 (with a gradient scaler) autocast of the forward pass; "
                              "for GPUs (tensor cores), off by default (training/loop/precision.py)")
    runtime.add_argument("--channels-last", action="store_true",
                         help="keep model and images in channels-last memory layout (faster convolutions on GPUs)")
    runtime.add_argument("--reader-pool", choices=["dummy", "thread", "process"], default="dummy",
                         help="Petastorm reader pool; dummy (default) reads in a prefetch thread. Petastorm "
                              "0.13.1's thread pool can skip row groups: a reader that delivers fewer rows than "
                              "planned stops the run with an error")
    runtime.add_argument("--reader-workers", type=int, default=2, help="workers of a thread/process pool")
    runtime.add_argument("--resume", help="checkpoint.pth of an interrupted run: continue it")
    runtime.add_argument("--run-id", help="name of this run (default: time + random suffix)")
    tracking.add_arguments(parser)
    return parser


def resolve_dataset(args, resume: dict | None, dist: distributed.Single) -> None:
    """Point args.dataset at the one dataset version this run reads, the same on every rank (rank 0 resolves
    the current version, or a resumed run reads the version it started on), and record it."""
    if resume and resume.get("dataset_dir"):
        args.dataset, args.dataset_version = resume["dataset_dir"], resume.get("dataset_version")
        if not Path(args.dataset).is_dir():
            raise SystemExit(f"--resume: the run read dataset version {args.dataset_version} at {args.dataset}, "
                             "which is gone (pruned?); restore it or start a new run")
        return
    try:
        resolved = versions.resolve(args.dataset) if dist.is_main else None
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--dataset: {exc}") from None
    # In a list on every rank: Horovod names the collective after the object's type, which must match.
    resolved = dist.allgather_object([resolved])[0][0]
    args.dataset, args.dataset_version = str(resolved.path), resolved.version
    if dist.is_main:
        versions.record_reader(resolved, args.run_id)


def prepare(args, dist: distributed.Single, policies: list[Policy]) -> tuple[Feed, StageLoop, RunOutputs]:
    """Check the options against the dataset, then build how batches reach the model, the epoch loop and
    the run's outputs (which start the MLflow run on rank 0)."""
    spec = read_dataset_spec(args.dataset)
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    precision = Precision(args.amp, args.channels_last, device)
    layout = LabelLayout(spec)
    try:
        inputs = InputTransform.for_dataset(args.dataset, spec, args.normalisation, args.eval_resize, args.eval_crop)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--normalisation / --eval-resize / --eval-crop: {exc}") from None
    evaluated_at = args.eval_crop or args.eval_resize or spec.image_size
    if MODELS[args.model].sized and evaluated_at != spec.image_size:
        raise SystemExit(f"{args.model}'s dense layers are sized for the dataset's {spec.image_size} px "
                         f"images; evaluation at {evaluated_at} px cannot work: set --eval-crop to that size")
    fused = uses_metadata(args.model)
    train_labels, train_mask = label_table(args.dataset, "train", spec)
    weight = positive_weights(train_labels, train_mask, layout)
    try:
        oversampler = (Oversampler(train_labels, train_mask, layout.binary, args.oversample)
                       if args.oversample else None)
        augmentation = Augmentation.parse(args.augment)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--oversample / --augment: {exc}") from None
    if args.augment_minority_only and not (oversampler and augmentation):
        raise SystemExit("--augment-minority-only needs --oversample (which says what the minority is) and "
                         "--augment (what to do to it)")
    loss_fn = LabelLoss(layout, args.loss, weight if args.loss == "pos-weighted" else None).to(device)
    run_dir = Path(args.output_dir) / args.run_id
    feed = Feed(args.dataset, spec, layout, dist, args.batch_size, args.reader_pool, args.reader_workers, device,
                inputs, precision, loss_fn, fused)
    outputs = RunOutputs(args, dist, spec, run_dir, policies,
                         tracking.start(args, run_dir, spec, dist))  # MLflow on rank 0, else a no-op
    return feed, StageLoop(args, feed, oversampler, augmentation, run_dir, outputs), outputs


def main(argv=None) -> None:
    args = parse_args(build_parser(), "train", argv)
    dist = distributed.detect(args.backend)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"%(asctime)s train[{dist.rank}/{dist.size}] %(levelname)s %(message)s")
    logging.getLogger("petastorm").setLevel(logging.WARNING)  # per-reader schema notes
    if not args.dataset:
        raise SystemExit("missing --dataset (the ETL's --output folder), or set it in --config")
    try:
        policies = parse_policies(f"{args.operating_point},{args.operating_points}")
    except ValueError as exc:
        raise SystemExit(f"--operating-point(s): {exc}") from None
    args.operating_point = policies[0].text
    if args.channels_last and dist.name == "horovod":
        raise SystemExit("--channels-last does not work under Horovod 0.28.1: its broadcasts and allreduces need "
                         "tensors in the default layout (horovod/horovod#3491, open). Launch with torchrun (DDP "
                         "supports channels-last) or leave the switch off; --amp works with both")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or set(stages) - set(STAGES):
        raise SystemExit(f"--stages must list stages from {STAGES}, got {args.stages!r}")
    try:
        resume = checkpoints.load(args.resume) if args.resume else None
    except checkpoints.CheckpointError as exc:
        raise SystemExit(f"--resume: {exc}") from None
    args.run_id = resume["run_id"] if resume else dist.allgather_object(args.run_id or new_run_id())[0]
    resolve_dataset(args, resume, dist)
    torch.manual_seed(args.seed)
    feed, loop, outputs = prepare(args, dist, policies)
    run_dir = outputs.run_dir
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(args, run_dir / "config.yaml")
    log.info("run %s: %s on %s (version %s; %d labels, %d px), stages %s, %d %s rank(s), outputs in %s",
             args.run_id, args.model, args.dataset, args.dataset_version or "none: a plain folder",
             feed.spec.num_labels, feed.spec.image_size, stages, dist.size, dist.name, run_dir)
    state = None
    for stage in stages:
        if resume and stages.index(stage) < stages.index(resume["stage"]):
            state = checkpoints.load(run_dir / f"best_{stage}.pth")["model"]
            continue
        stage_resume = resume if resume and resume["stage"] == stage else None
        trained = loop.run_stage(stage, state, stage_resume)
        # The best model on val and test (and train with --predict-train): every rank predicts, rank 0 reports.
        raw, train = predict_for_report(trained.model, feed, args.predict_train)
        if dist.is_main:
            outputs.report_stage(stage, trained.best_epoch, trained.wait_fraction, raw, train)
        state = trained.best_state
    if dist.is_main and outputs.results_written:
        results = (read_run_rows(run_dir) if args.results_table == NO_TABLE  # else other runs too, to compare
                   else read_results(args.results_table, args.results_engine))
        log.info("report: %s", write_report(results, run_dir / "report.html", args.run_id))
    outputs.tracker.finish(stages[-1])  # report, AUROC table, Grad-CAM examples, the model (rank 0)
    log.info("run %s done; results in %s", args.run_id, args.results_table)
    dist.shutdown()


if __name__ == "__main__":
    main()
