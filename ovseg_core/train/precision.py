"""Training precision (TrainConfig.precision): "fp32", "tf32" or "bf16".

- fp32: fp32 storage and math (TF32 matmuls switched off on CUDA);
- tf32: fp32 storage, TF32 tensor-core matmuls and convolutions on CUDA. The release pinned torch 1.11, whose
  default `allow_tf32=True` made its "fp32" A100 run exactly this, so the `paper` recipe uses it;
- bf16: autocast to bfloat16 (ours before the recipe existed). The numerically fragile parts stay fp32 whatever
  the autocast: the Gumbel noise and its softmax (ovseg_core/layers/grouping.py), the contrastive logits and
  softmax, and the Dice sums (ovseg_core/losses.py, via `ovseg_core.numerics.fp32_island`).
On CPU every precision runs fp32: CPU bf16 autocast is slow on most CPUs and changes the tests' reference numerics.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def configure_precision(precision: str, device: torch.device) -> None:
    """Set the process-wide TF32 switches for `precision` (CUDA only; a no-op elsewhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda":
        return
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's autocast context: bf16 on CUDA under "bf16", none otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
