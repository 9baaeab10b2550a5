"""The training loop of one stage: a fresh model and optimizer, then epoch by epoch a pass over this rank's
shard of train and a val evaluation, keeping the best model (best_<stage>.pth), the --keep-epochs best
epochs and the checkpoint that --resume continues from (rank 0 writes them).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr_pipeline.etl.hold_points import hold_at
from cxr_pipeline.training.data.augment import Augmentation, augment_rows, batch_generator
from cxr_pipeline.training.data.reader import prefetch
from cxr_pipeline.training.data.sampling import Oversampler
from cxr_pipeline.training.evaluation.gathered import Feed, predict
from cxr_pipeline.training.evaluation.metrics import mean_auroc, per_label_auroc
from cxr_pipeline.training.loop import checkpoints
from cxr_pipeline.training.loop.outputs import RunOutputs
from cxr_pipeline.training.loop.schedules import LearningRate, build_optimizer
from cxr_pipeline.training.models.registry import build_model, head_name, in_head, set_backbone_trainable

log = logging.getLogger("train")
STAGES = ("kt", "finetune")


@dataclass
class StageResult:
    model: torch.nn.Module  # with the best epoch's weights loaded
    best_state: dict  # those weights
    best_epoch: int  # 0 when no epoch had a val mean AUROC
    wait_fraction: float | None  # mean share of the epochs' time spent waiting for data


class StageLoop:
    """Trains the stages of a run, each from the best weights of the one before."""

    def __init__(self, args, feed: Feed, oversampler: Oversampler | None, augmentation: Augmentation | None,
                 run_dir: Path, outputs: RunOutputs):
        self.args, self.feed, self.dist = args, feed, feed.dist
        self.oversampler, self.augmentation = oversampler, augmentation
        self.run_dir, self.outputs = run_dir, outputs

    def make_stage(self, stage: str, init_state: dict | None):
        """A fresh model (fresh parameters, so no optimizer hooks of an earlier stage), the model to
        call (DDP-wrapped under torchrun), the optimizer to step (Horovod's wrapper builds a new
        optimizer, so state must be loaded into it, never before wrapping) and its scheduler."""
        args, feed = self.args, self.feed
        model = build_model(args.model, feed.layout.num_outputs, args.weights if init_state is None else "none",
                            feed.spec.image_size)
        if init_state is not None:
            model.load_state_dict(init_state)
        set_backbone_trainable(model, args.model, trainable=(stage != "kt"))
        feed.precision.prepare_model(model.to(feed.device))
        lr = getattr(args, f"lr_{stage}") * self.dist.size  # linear scaling rule
        optimizer = build_optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad], lr,
                                    args.momentum, args.weight_decay)
        forward, optimizer = self.dist.wrap(model, optimizer)
        scheduler = LearningRate(optimizer, args.schedule, getattr(args, f"epochs_{stage}"), args.warmup_steps,
                                 args.lr_gamma, args.lr_step_epochs, args.lr_patience)
        return model, forward, optimizer, scheduler

    def train_one_epoch(self, stage, model, forward, optimizer, scheduler, epoch) -> dict:
        args, dist, feed = self.args, self.dist, self.feed
        model.train()
        if stage == "kt":
            # A frozen backbone keeps its BatchNorm statistics too. Module by module: eval() would
            # recurse into head modules nested in a backbone container.
            head = head_name(args.model)
            for name, module in model.named_modules():
                if name and not in_head(name, head):
                    module.training = False
        # Every rank takes the same number of full batches, every row at least once (training/data/shards.py).
        reader = feed.reader("train", shuffle=True, seed=args.seed * 1000 + epoch, full_batches=True,
                             oversampler=self.oversampler)
        planned = len(reader)
        batches = contextlib.closing(prefetch(reader))
        bar = tqdm(total=min(planned, args.max_steps_per_epoch or planned), desc=f"{stage} epoch {epoch}",
                   disable=not dist.is_main, leave=False)
        losses, steps, images_seen, wait = [], 0, 0, 0.0
        generator = batch_generator(args.seed, 1000 * STAGES.index(stage) + epoch, dist.rank)
        started = time.perf_counter()
        with batches as batch_iterator:
            while not args.max_steps_per_epoch or steps < args.max_steps_per_epoch:
                waited = time.perf_counter()
                batch = next(batch_iterator, None)
                wait += time.perf_counter() - waited
                if batch is None:  # the same step on every rank: their shares are equal
                    break
                images = feed.inputs(batch.images.to(feed.device, non_blocking=True))
                labels = batch.labels.to(feed.device)
                if args.augment_minority_only:
                    minority = torch.from_numpy(self.oversampler.row_factors(batch.labels.numpy()) > 1)
                    images = augment_rows(self.augmentation, images, minority.to(feed.device), generator)
                elif self.augmentation is not None:
                    images = self.augmentation(images, generator)
                optimizer.zero_grad()
                logits = feed.precision.forward(forward, images, *feed.extra_inputs(batch))
                loss = feed.loss_fn(logits, labels, batch.mask.to(feed.device))
                if dist.allreduce_min(int(torch.isfinite(loss).item())) == 0:
                    raise SystemExit(
                        f"{stage} epoch {epoch} step {steps + 1}: the loss is not finite on some rank "
                        f"(here {loss.item()}); stopped before updating the weights. The last good checkpoint is "
                        f"{self.run_dir / 'checkpoint.pth'}: lower the learning rate or check the inputs, then "
                        "continue with --resume")
                feed.precision.backward_and_step(loss, optimizer)
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
            # the pass over train, all ranks: its rows (oversampling copies included) and the rows read twice
            # to give every rank whole batches
            "train_rows": reader.shard.pass_rows,
            "rows_repeated": reader.shard.padding,
        }

    def run_stage(self, stage: str, init_state: dict | None, resume: dict | None) -> StageResult:
        args, dist, feed = self.args, self.dist, self.feed
        model, forward, optimizer, scheduler = self.make_stage(stage, init_state)
        first_epoch, best_auroc, best_epoch = 1, -1.0, 0
        best_state = copy.deepcopy(model.state_dict())
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            feed.precision.load_state_dict(resume.get("grad_scaler"))
            first_epoch, best_auroc, best_epoch = resume["epoch"] + 1, resume["best_auroc"], resume["best_epoch"]
            best_state = checkpoints.load(self.run_dir / f"best_{stage}.pth")["model"]
            torch.set_rng_state(resume["torch_rng"])
        dist.broadcast(model, optimizer)
        epochs = getattr(args, f"epochs_{stage}")
        wait_fractions = []
        for epoch in range(first_epoch, epochs + 1):
            stats = self.train_one_epoch(stage, model, forward, optimizer, scheduler, epoch)
            val = predict(model, "val", feed)
            val_auroc = mean_auroc(per_label_auroc(val.labels, val.scores, feed.spec.label_names))
            scheduler.end_epoch(val_auroc)
            wait_fractions.append(stats["data_wait_fraction"])
            improved = val_auroc is not None and val_auroc > best_auroc
            if improved:
                best_auroc, best_epoch, best_state = val_auroc, epoch, copy.deepcopy(model.state_dict())
            log.info("%s epoch %d/%d: loss %.4f, val loss %.4f, val mean AUROC %s%s, %.1f img/s, waiting for data "
                     "%.1f%% of the time; %d train rows in %d steps x %d ranks, %d read twice to fill the last "
                     "batches", stage, epoch, epochs, stats["train_loss"], val.loss,
                     "n/a" if val_auroc is None else f"{val_auroc:.4f}",
                     " (best)" if improved else "", stats["images_per_second"], 100 * stats["data_wait_fraction"],
                     stats["train_rows"], stats["steps"], dist.size, stats["rows_repeated"])
            if dist.is_main:
                self.outputs.record_epoch(stage, epoch, stats, val.loss, val_auroc)
                if improved:
                    checkpoints.save(self.model_entry(best_state, stage, epoch, val_auroc),
                                     self.run_dir / f"best_{stage}.pth")
                if args.keep_epochs and val_auroc is not None:
                    self.keep_best_epochs(stage, self.model_entry(model.state_dict(), stage, epoch, val_auroc))
                checkpoints.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "grad_scaler": feed.precision.state_dict(),
                                  "torch_rng": torch.get_rng_state(),
                                  "stage": stage, "epoch": epoch, "best_auroc": best_auroc,
                                  "best_epoch": best_epoch, "run_id": args.run_id,
                                  "dataset_dir": args.dataset, "dataset_version": args.dataset_version},
                                 self.run_dir / "checkpoint.pth")
                hold_at(f"train:{stage}:{epoch}")  # fault tests: a rank is killed here
        model.load_state_dict(best_state)
        return StageResult(model, best_state, best_epoch,
                           float(np.mean(wait_fractions)) if wait_fractions else None)

    def model_entry(self, state, stage, epoch, val_auroc) -> dict:
        """A model checkpoint that training.predict and training.ensemble can use on their own."""
        return {"model": state, "stage": stage, "epoch": epoch, "val_mean_auroc": val_auroc,
                "model_name": self.args.model, "dataset_spec": self.feed.spec.to_json(),
                "run_id": self.args.run_id, "dataset_version": self.args.dataset_version,
                "inputs": self.feed.inputs.state()}

    def keep_best_epochs(self, stage, entry) -> None:
        """Save this epoch's model as epoch_<stage>_<epoch>.pth and keep only the --keep-epochs
        best of the stage by val mean AUROC (members of a snapshot ensemble)."""
        checkpoints.save(entry, self.run_dir / f"epoch_{stage}_{entry['epoch']}.pth")
        saved = sorted(self.run_dir.glob(f"epoch_{stage}_*.pth"),
                       key=lambda path: checkpoints.load(path)["val_mean_auroc"], reverse=True)
        for worse in saved[self.args.keep_epochs:]:
            checkpoints.remove(worse)
