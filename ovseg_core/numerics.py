"""Precision helpers shared by the layers, the losses and the distributed code."""
from __future__ import annotations

import contextlib

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or in its own dtype when that is wider: bf16/fp16 widen, float64 stays float64.

    Where a computation must not run in half precision (Gumbel noise and its arg-max, cross-rank sums), `x.float()`
    would also narrow a float64 model, and float64 is what exact comparisons (the DDP parity test) run in.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def fp32_island(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off on `x`'s device: inside, the math runs in the dtype of its inputs (widen them with
    `at_least_float32` first). Used for the contrastive logits and softmax and the Dice sums under bf16 training."""
    return torch.autocast(x.device.type, enabled=False)
