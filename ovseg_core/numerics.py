"""Precision helpers shared by the layers, the losses and the distributed code."""
from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or in its own dtype when that is wider: bf16/fp16 widen, float64 stays float64.

    Where a computation must not run in half precision (Gumbel noise and its arg-max, cross-rank sums), `x.float()`
    would also narrow a float64 model, and float64 is what exact comparisons (the DDP parity test) run in.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))
