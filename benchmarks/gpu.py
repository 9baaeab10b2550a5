"""GPU figure of `make bench`: training images/s through the full loader vs synthetic input.

    python -m benchmarks.gpu --dataset /tmp/cxr-bench/nih_224 [--model densenet121] [--steps 60]

The same model, optimiser and precision (`--amp bf16 --channels-last` by default, as
train.py takes them) train once on batches from the Petastorm loader (read, uint8 pinned and
copied to the GPU, normalised there by training/data/inputs.py) and once on one synthetic batch of
model input already on the GPU; the ratio says how much of
the GPU the loader leaves idle (limit: >= 0.9). Without a CUDA device it says so and exits;
`--device cpu` runs the same code as a smoke test, whose figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from pathlib import Path

import torch

from cxr_pipeline.etl import versions
from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.data.inputs import InputTransform
from cxr_pipeline.training.data.reader import SplitReader, prefetch
from cxr_pipeline.training.loop.precision import AMP_MODES, Precision
from cxr_pipeline.training.models.registry import build_model


def loader_batches(dataset: Path, batch_size: int, pin: bool):
    """(stored uint8 images, labels) of the train split on the CPU, pass after pass, as train.py reads them."""
    spec = read_dataset_spec(dataset)
    for epoch in itertools.count():
        reader = SplitReader(dataset, "train", spec, batch_size, shuffle=True, seed=epoch, full_batches=True,
                             pin_memory=pin)
        with contextlib.closing(prefetch(reader)) as batches:
            for batch in batches:
                yield batch.images, batch.labels.pin_memory() if pin else batch.labels


def training_rate(model, precision: Precision, batches, steps: int, warmup: int, device: torch.device,
                  model_input=lambda images: images) -> float:
    """Images/s of `steps` optimiser steps after `warmup` untimed ones; `model_input` runs on the device."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    images_seen, started = 0, None
    for step, (images, labels) in enumerate(itertools.islice(batches, warmup + steps)):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        images = model_input(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(loss_fn(precision.forward(model, images), labels), optimizer)
        images_seen += len(images) if step >= warmup else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images_seen / (time.perf_counter() - started)


def measure(dataset: Path, model_name: str, batch_size: int, steps: int, warmup: int, amp: str,
            channels_last: bool, device: torch.device) -> dict:
    """{'device', 'loader', 'synthetic'}: images/s of the same training with each input."""
    dataset = versions.resolve(dataset).path
    spec = read_dataset_spec(dataset)
    precision = Precision(amp, channels_last, device)
    rates = {}
    for source in ("synthetic", "loader"):
        torch.manual_seed(0)
        model = build_model(model_name, spec.num_labels, "none", spec.image_size).to(device)
        model = precision.prepare_model(model).train()
        if source == "synthetic":
            images = torch.randn(batch_size, 3, spec.image_size, spec.image_size, device=device)
            labels = torch.randint(0, 2, (batch_size, spec.num_labels), device=device).float()
            rates[source] = training_rate(model, precision, itertools.repeat((images, labels)), steps, warmup, device)
        else:
            batches = loader_batches(dataset, batch_size, pin=device.type == "cuda")
            rates[source] = training_rate(model, precision, batches, steps, warmup, device, InputTransform(spec))
    rates["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return rates


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="an ETL output (e.g. make bench's /tmp/cxr-bench/nih_224)")
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per input (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--amp", choices=AMP_MODES, default="bf16")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("GPU figure not measured: no CUDA device on this machine")
        return None
    rates = measure(Path(args.dataset), args.model, args.batch_size, args.steps, args.warmup, args.amp,
                    args.channels_last, torch.device(args.device))
    size = read_dataset_spec(versions.resolve(args.dataset).path).image_size
    print(f"{args.model} at {size} px on {rates['device']} (amp {args.amp}, "
          f"channels-last {args.channels_last}): loader {rates['loader']:.0f} img/s, synthetic "
          f"{rates['synthetic']:.0f} img/s, ratio {rates['loader'] / rates['synthetic']:.2f} (limit >= 0.9)")
    return rates


if __name__ == "__main__":
    main()
