"""Cross-attention layers (queries from one token set, keys/values from another) with key padding masks.

Self-attention blocks are timm's `vision_transformer.Block`; it accepts an `attn_mask`, built here by
`key_padding_to_attn_mask` so that padded keys never receive attention weight (the OVSegmentor release ignored its
`mask` argument, letting [PAD] words leak into the masked-entity-completion head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn


def key_padding_to_attn_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) mask with True/1 = real token -> (B, 1, 1, S) boolean mask for scaled_dot_product_attention.

    A row whose keys are all padding would give NaN after the softmax; callers pass text masks, whose [CLS] is
    always real.
    """
    if key_mask is None:
        return None
    if key_mask.dim() != 2:
        raise ValueError(f"key padding mask must be (B, S), got shape {tuple(key_mask.shape)}")
    return key_mask.bool()[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head attention of `query` tokens over `key` tokens, with separate q/k/v projections.

    Args:
        dim: token width of both inputs.
        num_heads: attention heads.
        qkv_bias: bias in the q/k/v projections.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, N, C), key (B, S, C), key_mask (B, S) True = attend -> (B, N, C)."""
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(key))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_to_attn_mask(key_mask),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        b, _, n, _ = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))


class CrossAttnBlock(nn.Module):
    """Transformer block whose attention is cross-attention (GroupViT's CrossAttnBlock).

    With `post_norm=True` (used by the grouping block and the MEC head) the inputs are not normalised and a
    LayerNorm is applied to the block output instead.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in q/k/v projections.
        drop_path: stochastic depth rate.
        post_norm: LayerNorm after the block instead of on its inputs.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, post_norm: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.Identity() if post_norm else nn.LayerNorm(dim)
        self.norm_k = nn.Identity() if post_norm else nn.LayerNorm(dim)
        self.norm_post = nn.LayerNorm(dim) if post_norm else nn.Identity()
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = query + self.drop_path(self.attn(self.norm_q(query), self.norm_k(key), key_mask))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return self.norm_post(x)
