"""Oversampling of rare classes, the reports' alternative to weighting the loss.

The classes are the labels and "no finding" (rows without a positive label, so that in a
binary task the negative class counts too). A class with fewer rows than `target` times the
most common class gets the repeat factor that brings it up to that count; a row is repeated by
the largest factor of its classes, the fraction drawn at random (seeded). `target` 1 balances a
binary task. Use it with `--loss bce`: weighting and oversampling together would count twice.
"""
from __future__ import annotations

import numpy as np


class Oversampler:
    def __init__(self, labels: np.ndarray, mask: np.ndarray, binary: list[int], target: float):
        """`labels`, `mask`: (N, L) of the train split; `binary`: the label columns that are 0/1."""
        if not 0 < target <= 1:
            raise ValueError(f"--oversample is a fraction of the most common class's share, in (0, 1], got {target}")
        positive = (np.asarray(labels)[:, binary] == 1) & (np.asarray(mask)[:, binary] == 1)
        shares = np.r_[positive.mean(axis=0), (~positive.any(axis=1)).mean()]
        self.binary = binary
        wanted = target * shares.max()
        self.factors = np.where(shares > 0, np.maximum(1.0, wanted / np.maximum(shares, 1e-12)), 1.0)

    def row_factors(self, labels: np.ndarray) -> np.ndarray:
        """Repeat factor of each row: the largest factor of its classes."""
        positive = np.asarray(labels)[:, self.binary] == 1
        classes = np.c_[positive, ~positive.any(axis=1)]
        return np.where(classes, self.factors[None, :], 1.0).max(axis=1)

    def repeats(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Whole copies per row: floor(factor), plus one with probability of the fraction."""
        factors = self.row_factors(labels)
        whole = np.floor(factors)
        return (whole + (rng.random(len(factors)) < factors - whole)).astype(int)
