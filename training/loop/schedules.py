"""Optimisers and learning-rate schedules of the reports, with linear warm-up.

The rate is base_lr x warm-up factor (per step, first `warmup_steps` steps) x epoch factor:
`constant`; `step` (x gamma every `step_epochs` epochs); `plateau` (x gamma when the
validation mean AUROC has not improved for `patience` epochs); `cosine` (to 0 over the
stage's epochs). One small class owns it all, so a resumed run restores it with one state dict.
"""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "step", "plateau", "cosine")


def build_optimizer(name: str, parameters, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """Adam with betas 0.9/0.999 (CheXpert's setting; weight decay as an L2 term), AdamW (the same
    with decoupled weight decay, Loshchilov & Hutter), RMSProp or SGD with momentum.

    RMSProp has Keras' defaults, as report 003 used it: rho (torch's alpha) 0.9, eps 1e-7 added to the
    square root as in Keras 2, no momentum (`momentum` is SGD's only); weight decay as an L2 term."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, alpha=0.9, eps=1e-7, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class LearningRate:
    def __init__(self, optimizer, schedule: str, epochs: int, warmup_steps: int = 0, gamma: float = 0.1,
                 step_epochs: int = 3, patience: int = 1):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.optimizer, self.schedule, self.epochs = optimizer, schedule, max(epochs, 1)
        self.warmup_steps, self.gamma, self.step_epochs, self.patience = warmup_steps, gamma, step_epochs, patience
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps, self.epochs_done, self.plateau_factor, self.best, self.bad_epochs = 0, 0, 1.0, -math.inf, 0
        self._apply()

    def factor(self) -> float:
        warmup = min(1.0, (self.steps + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "step":
            return warmup * self.gamma ** (self.epochs_done // self.step_epochs)
        if self.schedule == "plateau":
            return warmup * self.plateau_factor
        if self.schedule == "cosine":
            return warmup * 0.5 * (1 + math.cos(math.pi * min(self.epochs_done, self.epochs) / self.epochs))
        return warmup

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor()

    def step(self) -> None:
        """After each optimizer step."""
        self.steps += 1
        self._apply()

    def end_epoch(self, val_auroc: float | None) -> None:
        """After each epoch, with that epoch's validation mean AUROC (None: undefined)."""
        self.epochs_done += 1
        if self.schedule == "plateau" and val_auroc is not None:
            if val_auroc > self.best:
                self.best, self.bad_epochs = val_auroc, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= self.patience:
                    self.plateau_factor *= self.gamma
                    self.bad_epochs = 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("steps", "epochs_done", "plateau_factor", "best", "bad_epochs")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._apply()
