"""Mixed precision and memory layout for training: `--amp` and `--channels-last`.

One object owns the three things these switches touch, so the training loop has no
branches for them: the autocast context around the forward pass, the gradient scaler (fp16
only: bf16 has fp32's exponent range and needs none) and the channels-last layout of model
and inputs (what tensor cores want for convolutions on GPUs).

Under Horovod the scaler must see gradients that are already averaged across ranks (else
ranks could disagree on whether a step overflowed), so the step runs
`optimizer.synchronize()` before unscaling and then steps without a second synchronisation.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags of native bfloat16 arithmetic: without one, oneDNN emulates bf16 and it runs slower than float32
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
log = logging.getLogger("train")


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (Linux's /proc/cpuinfo flags); None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return bool(flags & NATIVE_BF16_FLAGS)


class Precision:
    def __init__(self, amp: str, channels_last: bool, device: torch.device):
        if amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {AMP_MODES}, got {amp!r}")
        self.amp, self.channels_last, self.device = amp, channels_last, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        if amp == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
            log.warning("--amp bf16 on a CPU without AVX-512 BF16 or AMX: bfloat16 is emulated and slower than "
                        "float32 here; use --amp off")

    def autocast(self):
        """The forward pass's context: autocast to the chosen dtype, or nothing."""
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.amp])

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def forward(self, model, images: torch.Tensor, *inputs) -> torch.Tensor:
        """`model(images, *inputs)` in the chosen layout and precision; float32 logits, so losses
        and probabilities are computed at full precision."""
        with self.autocast():
            return self.evaluate(model, images, *inputs)

    def evaluate(self, model, images: torch.Tensor, *inputs) -> torch.Tensor:
        """`model(images, *inputs)` in float32 whatever --amp says: the scores, calibration and thresholds a
        run reports are then the ones predict and the MLflow model compute, which run in float32."""
        return model(self.prepare_images(images), *inputs).float()

    def backward_and_step(self, loss: torch.Tensor, optimizer) -> None:
        """loss.backward() and optimizer.step(), through the scaler when there is one."""
        if not self.scaler.is_enabled():
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        synchronize = getattr(optimizer, "synchronize", None)  # Horovod's DistributedOptimizer
        if synchronize is None:
            self.scaler.step(optimizer)
        else:
            synchronize()
            self.scaler.unscale_(optimizer)
            with optimizer.skip_synchronize():
                self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
