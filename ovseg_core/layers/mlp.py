"""MLP variants: token mixing (GroupViT's group-token MLP) and the BatchNorm projection head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.layers import Mlp
from torch import nn


class TokenMlp(nn.Module):
    """MLP over the token axis: (B, N_in, C) -> (B, N_out, C). Maps 64 group tokens to 8 in the grouping block.

    Args:
        in_tokens: number of input tokens.
        hidden: hidden width (GroupViT: dim / 2).
        out_tokens: number of output tokens.
    """

    def __init__(self, in_tokens: int, hidden: int, out_tokens: int) -> None:
        super().__init__()
        self.mlp = Mlp(in_tokens, hidden, out_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


class ProjectionHead(nn.Module):
    """linear -> BatchNorm1d -> ReLU -> linear, on (B, C) or per token on (B, L, C).

    Plain BatchNorm1d: converting to SyncBatchNorm is the trainer's job
    (`torch.nn.SyncBatchNorm.convert_sync_batchnorm`). On (B, L, C) the statistics run over all B*L tokens, which is
    what the paper's Conv1d(k=1) + BatchNorm1d over (B, C, L) computes.

    Args:
        in_dim: input width.
        hidden_dim: hidden width (paper: 4096).
        out_dim: output width (paper: 256).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"ProjectionHead expects (B, C) or (B, L, C), got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x = self.fc1(x.reshape(-1, x.shape[-1]))
        x = self.fc2(self.act(self.bn(x)))
        return x.reshape(*lead, -1)


@contextmanager
def batchnorm_frozen(module: nn.Module) -> Iterator[None]:
    """Run `module`'s BatchNorm layers in eval mode (running statistics used, not updated), then restore them."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()
