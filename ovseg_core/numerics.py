"""Tensor helpers shared by the layers, the losses, the distributed code and inference: precision and content keys."""
from __future__ import annotations

import contextlib
import hashlib

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


def content_key(x: torch.Tensor) -> tuple:
    """A hashable key equal for two tensors exactly when their shape, dtype and bytes are (memoising by input)."""
    x = x.detach().cpu().contiguous()
    array = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
    return tuple(x.shape), str(x.dtype), hashlib.sha256(array.tobytes()).hexdigest()
