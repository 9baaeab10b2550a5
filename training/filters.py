"""Draw the learned 3x3 convolution kernels of a checkpoint, layer by layer (report 002, 4.5).

    python -m training.filters --checkpoint RUN_DIR/best_finetune.pth --output RUN_DIR/filters

One PNG per 3x3 conv layer, each a grid with a row per output channel and a column per input
channel, every cell one kernel (grey levels scaled to the layer's own weight range), and an
index.html that shows them in order; train.py's report links RUN_DIR/filters/index.html when
it exists. The input layer is left out, as in the report: its input is one grey image (the
loader's three channels are copies of it), so its kernels say little. Wide layers are cut to
their first --max-channels outputs and inputs, as the page says.
"""
from __future__ import annotations

import argparse
import html
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

from cxr_pipeline.training.serving.scorer import load

CELL = 3  # kernel side
GAP = 1  # pixels between kernels
ZOOM = 4  # screen pixels per kernel pixel


def kernel_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name, layer) of every 3x3 convolution after the input layer, in forward order."""
    convolutions = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [(name, m) for name, m in convolutions[1:] if m.kernel_size == (CELL, CELL)]


def kernel_grid(weight: np.ndarray, max_channels: int) -> np.ndarray:
    """(out, in, 3, 3) weights -> a uint8 picture: row o, column i holds kernel [o, i], scaled
    from the layer's minimum (black) to its maximum (white)."""
    shown = weight[:max_channels, :max_channels]
    low, high = float(weight.min()), float(weight.max())
    scaled = (shown - low) / (high - low) if high > low else np.zeros_like(shown)
    outputs, inputs = shown.shape[:2]
    step = CELL + GAP
    grid = np.full((outputs * step - GAP, inputs * step - GAP), 0.5)
    for o in range(outputs):
        for i in range(inputs):
            grid[o * step:o * step + CELL, i * step:i * step + CELL] = scaled[o, i]
    return np.round(grid * 255).astype(np.uint8).repeat(ZOOM, 0).repeat(ZOOM, 1)


def draw(checkpoint: str, output: Path, max_channels: int = 64) -> Path:
    scorer = load(checkpoint)
    layers = kernel_layers(scorer.model)
    if not layers:
        raise SystemExit(f"{checkpoint}: {scorer.model_name} has no 3x3 convolution after its input layer")
    output.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (name, layer) in enumerate(layers, start=1):
        weight = layer.weight.detach().cpu().numpy()
        path = output / f"layer{index:02d}_{name.replace('.', '_')}.png"
        Image.fromarray(kernel_grid(weight, max_channels)).save(path)
        cut = "" if max(weight.shape[:2]) <= max_channels else f", first {max_channels} outputs and inputs shown"
        entries.append(f"<h2>{index}. <code>{html.escape(name)}</code></h2><p>{weight.shape[0]} outputs x "
                       f"{weight.shape[1]} inputs, weights {weight.min():.3f} (black) to {weight.max():.3f} "
                       f"(white){cut}</p><img src='{path.name}' alt='{html.escape(name)}'>")
    page = output / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Kernels of {html.escape(checkpoint)}"
                    "</title><style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;"
                    "max-width:100%}</style></head><body>"
                    f"<h1>3x3 kernels of {html.escape(scorer.model_name)}</h1><p>{html.escape(checkpoint)}: "
                    f"{len(layers)} layers after the input layer; rows are output channels, columns input "
                    "channels.</p>" + "".join(entries) + "</body></html>")
    return page


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/best_<stage>.pth from train.py")
    parser.add_argument("--output", required=True, help="folder for the PNGs and index.html (RUN_DIR/filters is "
                                                        "linked from the run's report)")
    parser.add_argument("--max-channels", type=int, default=64, help="outputs and inputs drawn per layer (64)")
    args = parser.parse_args(argv)
    page = draw(args.checkpoint, Path(args.output), args.max_channels)
    print(f"wrote {page}")
    return page


if __name__ == "__main__":
    main()
