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
import contextlib
import copy
import csv
import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr_pipeline.config import dump_config, parse_args
from cxr_pipeline.etl.hold_points import hold_at
from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training import calibration, checkpoints, distributed, tracking
from cxr_pipeline.training.augment import Augmentation, augment_rows, batch_generator
from cxr_pipeline.training.inputs import NORMALISATIONS, InputTransform
from cxr_pipeline.training.data import METADATA_COLUMNS, SplitReader, label_table, prefetch, split_row_count, split_row_groups
from cxr_pipeline.training.metrics import auroc_report, mean_auroc, per_label_auroc
from cxr_pipeline.training.operating_points import DEFAULT_POLICIES, Policy, choose_thresholds, operating_table, parse_policies
from cxr_pipeline.training.models import (MODELS, build_model, head_name, in_head, metadata_features, set_backbone_trainable,
                             uses_metadata)
from cxr_pipeline.training.plots import reliability_diagram, roc_curves, training_curves
from cxr_pipeline.training.precision import AMP_MODES, Precision
from cxr_pipeline.training.report import write_report
from cxr_pipeline.training.results import ENGINES, append_results
from cxr_pipeline.training.sampling import Oversampler
from cxr_pipeline.training.schedules import OPTIMIZERS, SCHEDULES, LearningRate, build_optimizer
from cxr_pipeline.training.targets import LOSSES, LabelLayout, LabelLoss, positive_weights

log = logging.getLogger("train")
STAGES = ("kt", "finetune")
EVAL_SPLITS = ("val", "test")
# The options that make a model what it is, kept with each result row to compare runs.
MODEL_CONFIG = ("model", "weights", "stages", "epochs_kt", "epochs_finetune", "lr_kt", "lr_finetune", "optimizer",
                "weight_decay", "schedule", "batch_size", "loss", "oversample", "augment", "amp", "seed",
                "calibration", "operating_point")
# The policy that held up on data from elsewhere (README, "Evaluation": measured on the official
# pneumonia test split, where thresholds at Youden's J or the F1 optimum on val did not).
DEFAULT_OPERATING_POINT = "sens>=0.95"


@dataclass
class Predictions:
    image_ids: list[str]
    patient_ids: list[str]
    scores: np.ndarray  # (N, L) probabilities
    labels: np.ndarray  # (N, L) truth: 1, 0, or NaN where unknown (training.targets.LabelLayout.truth)
    loss: float | None = None  # the training loss on these rows (per-image mean), to see over-fitting


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and outputs")
    data.add_argument("--dataset", help="folder written by etl/preprocess.py (its --output)")
    data.add_argument("--output-dir", default="outputs/runs", help="runs go to OUTPUT_DIR/RUN_ID (default outputs/runs)")
    data.add_argument("--results-table", default="outputs/results_delta", help="Delta table of AUROC rows")
    data.add_argument("--predict-train", action="store_true",
                      help="also write each stage's best-model probabilities on the train split "
                           "(predictions_<stage>_train.csv), e.g. for the U-SelfTrained relabel step")
    data.add_argument("--keep-epochs", type=int, default=0,
                      help="also keep the N best epochs of each stage as epoch_<stage>_<epoch>.pth, e.g. for "
                           "python -m training.ensemble (default 0: only best_<stage>.pth)")
    data.add_argument("--results-engine", choices=ENGINES, default="deltalake",
                      help="deltalake (delta-rs, no Spark; default) or delta-spark (a Spark session with Delta jars)")
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
                               "'flip=0,rotate_degrees=10' (training/augment.py); seeded per epoch and rank")
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
                               "seeded; use with --loss bce (training/sampling.py; default 0: off)")
    schedule.add_argument("--max-steps-per-epoch", type=int, default=0, help="stop epochs early (0: full pass)")
    schedule.add_argument("--bootstrap", type=int, default=1000,
                          help="patient-level bootstrap resamples for the 95%% CI of each AUROC (default 1000)")
    decisions = parser.add_argument_group("calibration and operating points (fitted on val, applied to test)")
    decisions.add_argument("--calibration", choices=calibration.METHODS, default="auto",
                           help="per-label calibration of the probabilities, fitted on val and stored with the "
                                "checkpoint: platt, temperature, isotonic, auto (isotonic with >= "
                                f"{calibration.ISOTONIC_MIN_PER_CLASS} val positives and negatives, else platt; "
                                "default) or none (training/calibration.py)")
    decisions.add_argument("--operating-point", default=DEFAULT_OPERATING_POINT,
                           help="policy of the thresholds that predict uses and the Delta rows report: youden, "
                                "f1, sens>=X, spec>=X or prevalence=P (training/operating_points.py; default "
                                f"{DEFAULT_OPERATING_POINT}, see README)")
    decisions.add_argument("--operating-points", default=",".join(DEFAULT_POLICIES),
                           help="policies whose val-chosen thresholds the report shows on val and test "
                                f"(default {','.join(DEFAULT_POLICIES)})")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--backend", default="auto", choices=["auto", "horovod", "torch", "single"],
                         help="auto: horovod under horovodrun, torch under torchrun, else single")
    runtime.add_argument("--seed", type=int, default=0)
    runtime.add_argument("--amp", choices=AMP_MODES, default="off",
                         help="mixed precision: bf16 or fp16 (with a gradient scaler) autocast of the forward pass; "
                              "for GPUs (tensor cores), off by default (training/precision.py)")
    runtime.add_argument("--channels-last", action="store_true",
                         help="keep model and images in channels-last memory layout (faster convolutions on GPUs)")
    runtime.add_argument("--reader-pool", choices=["dummy", "thread", "process"], default="dummy",
                         help="Petastorm reader pool; dummy (default) reads in a prefetch thread. Petastorm "
                              "0.13.1's thread pool dropped row groups in tests here")
    runtime.add_argument("--reader-workers", type=int, default=2, help="workers of a thread/process pool")
    runtime.add_argument("--resume", help="checkpoint.pth of an interrupted run: continue it")
    runtime.add_argument("--run-id", help="name of this run (default: time + random suffix)")
    tracking.add_arguments(parser)
    return parser


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class Trainer:
    def __init__(self, args, dist: distributed.Single, policies: list[Policy]):
        self.args, self.dist, self.policies = args, dist, policies
        self.spec = read_dataset_spec(args.dataset)
        self.device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.precision = Precision(args.amp, args.channels_last, self.device)
        groups = split_row_groups(args.dataset, "train")
        if groups < dist.size:
            raise SystemExit(f"the train split has {groups} row groups but {dist.size} ranks; rerun the ETL "
                             "with a smaller --rows-per-file so every rank gets data")
        self.layout = LabelLayout(self.spec)
        try:
            self.inputs = InputTransform.for_dataset(args.dataset, self.spec, args.normalisation, args.eval_resize,
                                                     args.eval_crop)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"--normalisation / --eval-resize / --eval-crop: {exc}") from None
        evaluated_at = args.eval_crop or args.eval_resize or self.spec.image_size
        if MODELS[args.model].sized and evaluated_at != self.spec.image_size:
            raise SystemExit(f"{args.model}'s dense layers are sized for the dataset's {self.spec.image_size} px "
                             f"images; evaluation at {evaluated_at} px cannot work: set --eval-crop to that size")
        self.fused = uses_metadata(args.model)
        train_labels, train_mask = label_table(args.dataset, "train", self.spec)
        weight = positive_weights(train_labels, train_mask, self.layout)
        try:
            self.oversampler = (Oversampler(train_labels, train_mask, self.layout.binary, args.oversample)
                                if args.oversample else None)
            self.augmentation = Augmentation.parse(args.augment)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"--oversample / --augment: {exc}") from None
        if args.augment_minority_only and not (self.oversampler and self.augmentation):
            raise SystemExit("--augment-minority-only needs --oversample (which says what the minority is) and "
                             "--augment (what to do to it)")
        self.train_rows_per_epoch = (int(self.oversampler.row_factors(train_labels).sum()) if self.oversampler
                                     else len(train_labels))
        self.loss_fn = LabelLoss(self.layout, args.loss, weight if args.loss == "pos-weighted" else None).to(self.device)
        self.run_dir = Path(args.output_dir) / args.run_id
        self.results_written = 0  # Delta rows this process appended (rank 0)
        self.tracker = tracking.start(args, self.run_dir, self.spec, dist)  # MLflow on rank 0, else a no-op

    # ---- one stage -------------------------------------------------------------------------
    def make_stage(self, stage: str, init_state: dict | None):
        """A fresh model (fresh parameters, so no optimizer hooks of an earlier stage), the model to
        call (DDP-wrapped under torchrun), the optimizer to step (Horovod's wrapper builds a new
        optimizer, so state must be loaded into it, never before wrapping) and its scheduler."""
        args = self.args
        model = build_model(args.model, self.layout.num_outputs, args.weights if init_state is None else "none",
                            self.spec.image_size)
        if init_state is not None:
            model.load_state_dict(init_state)
        set_backbone_trainable(model, args.model, trainable=(stage != "kt"))
        self.precision.prepare_model(model.to(self.device))
        lr = getattr(args, f"lr_{stage}") * self.dist.size  # linear scaling rule
        optimizer = build_optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad], lr,
                                    args.momentum, args.weight_decay)
        forward, optimizer = self.dist.wrap(model, optimizer)
        scheduler = LearningRate(optimizer, args.schedule, getattr(args, f"epochs_{stage}"), args.warmup_steps,
                                 args.lr_gamma, args.lr_step_epochs, args.lr_patience)
        return model, forward, optimizer, scheduler

    def extra_inputs(self, batch) -> tuple:
        """What the model takes after the images: the metadata features of fusion models."""
        if not self.fused:
            return ()
        return (metadata_features(*(batch.metadata[column] for column in METADATA_COLUMNS)).to(self.device),)

    def train_one_epoch(self, stage, model, forward, optimizer, scheduler, epoch) -> dict:
        args, dist = self.args, self.dist
        model.train()
        if stage == "kt":
            # A frozen backbone keeps its BatchNorm statistics too. Module by module: eval() would
            # recurse into head modules nested in a backbone container.
            head = head_name(args.model)
            for name, module in model.named_modules():
                if name and not in_head(name, head):
                    module.training = False
        reader = SplitReader(args.dataset, "train", self.spec, args.batch_size, dist.rank, dist.size, shuffle=True,
                             seed=args.seed * 1000 + epoch, drop_last=True, pool=args.reader_pool,
                             workers=args.reader_workers, with_metadata=self.fused, oversampler=self.oversampler,
                             pin_memory=self.device.type == "cuda")
        batches = contextlib.closing(prefetch(reader))
        expected = self.train_rows_per_epoch // (args.batch_size * dist.size)
        bar = tqdm(total=expected, desc=f"{stage} epoch {epoch}", disable=not dist.is_main, leave=False)
        losses, steps, images_seen, wait = [], 0, 0, 0.0
        generator = batch_generator(args.seed, 1000 * STAGES.index(stage) + epoch, dist.rank)
        started = time.perf_counter()
        with batches as batch_iterator:
            while not args.max_steps_per_epoch or steps < args.max_steps_per_epoch:
                waited = time.perf_counter()
                batch = next(batch_iterator, None)
                wait += time.perf_counter() - waited
                # Shards can differ by a row group: all ranks stop when the first runs out.
                if dist.allreduce_min(int(batch is not None)) == 0:
                    break
                images = self.inputs(batch.images.to(self.device, non_blocking=True))
                labels = batch.labels.to(self.device)
                if self.args.augment_minority_only:
                    minority = torch.from_numpy(self.oversampler.row_factors(batch.labels.numpy()) > 1)
                    images = augment_rows(self.augmentation, images, minority.to(self.device), generator)
                elif self.augmentation is not None:
                    images = self.augmentation(images, generator)
                optimizer.zero_grad()
                logits = self.precision.forward(forward, images, *self.extra_inputs(batch))
                loss = self.loss_fn(logits, labels, batch.mask.to(self.device))
                if dist.allreduce_min(int(torch.isfinite(loss).item())) == 0:
                    raise SystemExit(
                        f"{stage} epoch {epoch} step {steps + 1}: the loss is not finite on some rank "
                        f"(here {loss.item()}); stopped before updating the weights. The last good checkpoint is "
                        f"{self.run_dir / 'checkpoint.pth'}: lower the learning rate or check the inputs, then "
                        "continue with --resume")
                self.precision.backward_and_step(loss, optimizer)
                scheduler.step()
                losses.append(loss.item())
                steps += 1
                images_seen += len(labels)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.close()
        dist.sync_buffers(model)
        if steps == 0:
            raise SystemExit("no training batch: the train split is smaller than one batch per rank")
        elapsed = time.perf_counter() - started
        return {
            "train_loss": dist.allreduce_mean(float(np.mean(losses))),
            "images_per_second": dist.allreduce_mean(images_seen / elapsed) * dist.size,
            "data_wait_fraction": dist.allreduce_mean(wait / elapsed),
            "steps": steps,
            "lr": scheduler.lr,
        }

    @torch.no_grad()
    def predict(self, model, split: str) -> Predictions:
        """Exact predictions of the whole split: every rank scores its shard, all are gathered."""
        model.eval()
        reader = SplitReader(self.args.dataset, split, self.spec, self.args.batch_size, self.dist.rank,
                             self.dist.size, pool=self.args.reader_pool, workers=self.args.reader_workers,
                             with_metadata=self.fused, pin_memory=self.device.type == "cuda")
        image_ids, patient_ids, scores, labels = [], [], [], []
        loss_sum = 0.0
        for batch in prefetch(reader):
            images = self.inputs(batch.images.to(self.device, non_blocking=True), evaluation=True)
            logits = self.precision.forward(model, images, *self.extra_inputs(batch))
            loss = self.loss_fn(logits, batch.labels.to(self.device), batch.mask.to(self.device))
            loss_sum += loss.item() * len(batch.image_ids)
            scores.append(self.layout.probabilities(logits).cpu().numpy())
            labels.append(self.layout.truth(batch.labels.numpy(), batch.mask.numpy()))
            image_ids.extend(batch.image_ids)
            patient_ids.extend(batch.patient_ids)
        empty = np.zeros((0, self.spec.num_labels), dtype=np.float32)
        shards = self.dist.allgather_object(
            (image_ids, patient_ids, np.concatenate(scores or [empty]), np.concatenate(labels or [empty]), loss_sum))
        gathered = Predictions([i for s in shards for i in s[0]], [p for s in shards for p in s[1]],
                               np.concatenate([s[2] for s in shards]), np.concatenate([s[3] for s in shards]),
                               sum(s[4] for s in shards) / max(sum(len(s[0]) for s in shards), 1))
        expected = split_row_count(self.args.dataset, split)
        if len(gathered.image_ids) != expected or len(set(gathered.image_ids)) != expected:
            raise RuntimeError(f"{split}: gathered {len(gathered.image_ids)} predictions "
                               f"({len(set(gathered.image_ids))} distinct) for {expected} rows; evaluation must "
                               "see each row exactly once")
        return gathered

    def run_stage(self, stage: str, init_state: dict | None, resume: dict | None) -> dict:
        args, dist = self.args, self.dist
        model, forward, optimizer, scheduler = self.make_stage(stage, init_state)
        first_epoch, best_auroc, best_epoch = 1, -1.0, 0
        best_state = copy.deepcopy(model.state_dict())
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            self.precision.load_state_dict(resume.get("grad_scaler"))
            first_epoch, best_auroc, best_epoch = resume["epoch"] + 1, resume["best_auroc"], resume["best_epoch"]
            best_state = checkpoints.load(self.run_dir / f"best_{stage}.pth")["model"]
            torch.set_rng_state(resume["torch_rng"])
        dist.broadcast(model, optimizer)
        epochs = getattr(args, f"epochs_{stage}")
        wait_fractions = []
        for epoch in range(first_epoch, epochs + 1):
            stats = self.train_one_epoch(stage, model, forward, optimizer, scheduler, epoch)
            val = self.predict(model, "val")
            val_auroc = mean_auroc(per_label_auroc(val.labels, val.scores, self.spec.label_names))
            scheduler.end_epoch(val_auroc)
            wait_fractions.append(stats["data_wait_fraction"])
            improved = val_auroc is not None and val_auroc > best_auroc
            if improved:
                best_auroc, best_epoch, best_state = val_auroc, epoch, copy.deepcopy(model.state_dict())
            log.info("%s epoch %d/%d: loss %.4f, val loss %.4f, val mean AUROC %s%s, %.1f img/s, waiting for data "
                     "%.1f%% of the time", stage, epoch, epochs, stats["train_loss"], val.loss,
                     "n/a" if val_auroc is None else f"{val_auroc:.4f}",
                     " (best)" if improved else "", stats["images_per_second"], 100 * stats["data_wait_fraction"])
            if dist.is_main:
                self.record_epoch(stage, epoch, stats, val.loss, val_auroc)
                if improved:
                    checkpoints.save(self.model_entry(best_state, stage, epoch, val_auroc),
                                     self.run_dir / f"best_{stage}.pth")
                if args.keep_epochs and val_auroc is not None:
                    self.keep_best_epochs(stage, self.model_entry(model.state_dict(), stage, epoch, val_auroc))
                checkpoints.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "grad_scaler": self.precision.state_dict(),
                                  "torch_rng": torch.get_rng_state(),
                                  "stage": stage, "epoch": epoch, "best_auroc": best_auroc,
                                  "best_epoch": best_epoch, "run_id": args.run_id},
                                 self.run_dir / "checkpoint.pth")
                hold_at(f"train:{stage}:{epoch}")  # fault tests: a rank is killed here
        model.load_state_dict(best_state)
        self.report_stage(stage, model, best_epoch, float(np.mean(wait_fractions)) if wait_fractions else None)
        return best_state

    # ---- outputs (rank 0) ------------------------------------------------------------------
    def model_entry(self, state, stage, epoch, val_auroc) -> dict:
        """A model checkpoint that training.predict and training.ensemble can use on their own."""
        return {"model": state, "stage": stage, "epoch": epoch, "val_mean_auroc": val_auroc,
                "model_name": self.args.model, "dataset_spec": self.spec.to_json(), "inputs": self.inputs.state()}

    def keep_best_epochs(self, stage, entry) -> None:
        """Save this epoch's model as epoch_<stage>_<epoch>.pth and keep only the --keep-epochs
        best of the stage by val mean AUROC (members of a snapshot ensemble)."""
        checkpoints.save(entry, self.run_dir / f"epoch_{stage}_{entry['epoch']}.pth")
        saved = sorted(self.run_dir.glob(f"epoch_{stage}_*.pth"),
                       key=lambda path: checkpoints.load(path)["val_mean_auroc"], reverse=True)
        for worse in saved[self.args.keep_epochs:]:
            checkpoints.remove(worse)

    def record_epoch(self, stage, epoch, stats, val_loss, val_auroc) -> None:
        row = {"stage": stage, "epoch": epoch, **stats, "val_loss": val_loss, "val_mean_auroc": val_auroc}
        path = self.run_dir / "summary.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.tracker.log_epoch(stage, epoch, row)

    def report_stage(self, stage, model, best_epoch, wait_fraction) -> None:
        """Evaluate the stage's best model on val and test. On val, fit the calibration and choose
        the thresholds of every operating-point policy; store them with the checkpoint; apply them
        unchanged to test. Rank 0 appends the rows to Delta and writes the tables and figures."""
        args = self.args
        splits = [split for split in EVAL_SPLITS if split_row_count(args.dataset, split)]
        raw = {split: self.predict(model, split) for split in splits}  # every rank takes part
        train = self.predict(model, "train") if args.predict_train else None
        if not self.dist.is_main:
            return
        calibrators, thresholds = None, {}
        if "val" in raw:
            val = raw["val"]
            calibrators = calibration.fit(val.labels, val.scores, args.calibration)
            thresholds = choose_thresholds(val.labels, calibration.apply(calibrators, val.scores), self.policies)
            log.info("%s calibration (fitted on val): %s", stage,
                     calibration.describe(calibrators, self.spec.label_names))
            if best_epoch:
                best = checkpoints.load(self.run_dir / f"best_{stage}.pth")
                checkpoints.save({**best, "calibration": calibrators, "operating_points": thresholds,
                                  "operating_point": args.operating_point,
                                  "thresholds": thresholds[args.operating_point]}, self.run_dir / f"best_{stage}.pth")
        rows, operating_rows, calibration_rows = [], [], []
        created = datetime.now(timezone.utc)
        for split, predictions in raw.items():
            scores = calibration.apply(calibrators, predictions.scores)
            calibrated = replace(predictions, scores=scores)
            metrics = auroc_report(predictions.labels, scores, predictions.patient_ids, self.spec.label_names,
                                   args.bootstrap, args.seed)
            operating = operating_table(predictions.labels, scores, predictions.patient_ids, self.spec.label_names,
                                        thresholds, args.bootstrap, args.seed)
            operating_rows += [{"split": split, **row} for row in operating]
            fit = calibration.calibration_metrics(predictions.labels, predictions.scores, scores,
                                                  self.spec.label_names)
            calibration_rows += [{"split": split, **row} for row in fit]
            chosen = {row["label"]: row for row in operating if row["policy"] == args.operating_point}
            quality = {row["label"]: row for row in fit}
            for metric in metrics:
                at_threshold = {key: value for key, value in chosen.get(metric["label"], {}).items()
                                if key in OPERATING_COLUMNS}
                rows.append({
                    "run_id": args.run_id, "created_at": created, "dataset": self.spec.dataset,
                    "image_size": self.spec.image_size, "model": args.model, "stage": stage, "split": split,
                    **metric, **at_threshold, "operating_point": args.operating_point if at_threshold else None,
                    "brier": quality.get(metric["label"], {}).get("brier"),
                    "ece": quality.get(metric["label"], {}).get("ece"),
                    "best_epoch": best_epoch, "world_size": self.dist.size, "backend": self.dist.name,
                    "data_wait_fraction": wait_fraction, "run_dir": str(self.run_dir.resolve()),
                    "model_config": json.dumps({key: getattr(args, key) for key in MODEL_CONFIG}),
                    "mlflow_run_id": self.tracker.run_id,
                })
            self.save_predictions(stage, split, calibrated)
            title = f"{args.model}, {stage} (best epoch {best_epoch}), {split}: {len(predictions.image_ids)} images"
            roc_curves(predictions.labels, scores, metrics, self.run_dir / f"roc_{stage}_{split}.png", title)
            fitted = ", ".join(sorted({state["method"] for state in calibrators or [{"method": "none"}]}))
            reliability_diagram(predictions.labels, {"before calibration": predictions.scores,
                                                     f"after ({fitted}, fitted on val)": scores},
                                self.spec.label_names, self.run_dir / f"reliability_{stage}_{split}.png", title)
            self.log_split(stage, best_epoch, split, metrics[-1], chosen)
        if train is not None:
            self.save_predictions(stage, "train",
                                  replace(train, scores=calibration.apply(calibrators, train.scores)))
        write_csv(self.run_dir / f"operating_points_{stage}.csv", operating_rows)
        write_csv(self.run_dir / f"calibration_{stage}.csv", calibration_rows)
        if rows:
            append_results(args.results_table, rows, args.results_engine)
            self.results_written += len(rows)
            training_curves(self.run_dir / "summary.csv", self.run_dir / "training_curves.png")
        self.tracker.log_stage(stage, rows)

    def log_split(self, stage, best_epoch, split, mean, chosen) -> None:
        text = ("n/a" if mean["auroc"] is None
                else f"{mean['auroc']:.4f} [95% CI {mean['auroc_ci_low']:.4f}, {mean['auroc_ci_high']:.4f}]")
        if len(chosen) == 1:  # one label: say what the operating point gives
            (row,) = chosen.values()
            text += (f"; at the val-chosen {self.args.operating_point} threshold {row['threshold']:.3f}: accuracy "
                     f"{row['accuracy']:.3f}, sensitivity {row['recall']:.3f}, specificity {row['specificity']:.3f}")
        log.info("%s best (epoch %d) on %s: mean AUROC %s", stage, best_epoch, split, text)

    def save_predictions(self, stage, split, predictions: Predictions) -> None:
        """image_id and one probability column per label: the format training.evaluate reads."""
        with (self.run_dir / f"predictions_{stage}_{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_id", *self.spec.label_names])
            for image_id, row in zip(predictions.image_ids, predictions.scores):
                writer.writerow([image_id, *(f"{value:.6f}" for value in row)])


OPERATING_COLUMNS = ("threshold", "accuracy", "precision", "recall", "specificity", "f1", "tp", "fp", "fn", "tn")


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)


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
    torch.manual_seed(args.seed)
    trainer = Trainer(args, dist, policies)
    if dist.is_main:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(args, trainer.run_dir / "config.yaml")
    log.info("run %s: %s on %s (%d labels, %d px), stages %s, %d %s rank(s), outputs in %s", args.run_id, args.model,
             args.dataset, trainer.spec.num_labels, trainer.spec.image_size, stages, dist.size, dist.name,
             trainer.run_dir)
    state = None
    for stage in stages:
        if resume and stages.index(stage) < stages.index(resume["stage"]):
            state = checkpoints.load(trainer.run_dir / f"best_{stage}.pth")["model"]
            continue
        stage_resume = resume if resume and resume["stage"] == stage else None
        state = trainer.run_stage(stage, state, stage_resume)
    if dist.is_main and trainer.results_written:
        log.info("report: %s", write_report(args.results_table, trainer.run_dir / "report.html", args.run_id))
    trainer.tracker.finish(stages[-1])  # report, AUROC table, Grad-CAM examples, the model (rank 0)
    log.info("run %s done; results in %s", args.run_id, args.results_table)
    dist.shutdown()


if __name__ == "__main__":
    main()
