"""Checkpoints as plain dicts of tensors and numbers, with an integrity check.

Each file is written next to a `.sha256` sidecar and loaded with
`torch.load(weights_only=True)`, so a file that was altered after it was written, or one
that carries arbitrary pickled objects, is refused instead of executed or silently used.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save(state: dict, path: Path) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint in place."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    _sidecar(partial).write_text(_digest(partial) + "\n")
    os.replace(partial, path)
    os.replace(_sidecar(partial), _sidecar(path))


def load(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = _sidecar(path)
    if not sidecar.exists():
        raise CheckpointError(f"{path} has no {sidecar.name}: it was not written by train.py; refusing to load it")
    if sidecar.read_text().strip() != _digest(path):
        raise CheckpointError(f"{path} changed after it was written (sha256 differs from {sidecar.name}); "
                              "refusing to load it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values; refusing: {exc}") from exc


def recorded_sha256(path: Path) -> str | None:
    """The sha256 save() recorded beside the checkpoint (what load() checks it against); None without one."""
    sidecar = _sidecar(Path(path))
    return sidecar.read_text().strip() if sidecar.exists() else None


def remove(path: Path) -> None:
    """Delete a checkpoint and its sidecar."""
    Path(path).unlink(missing_ok=True)
    _sidecar(Path(path)).unlink(missing_ok=True)
