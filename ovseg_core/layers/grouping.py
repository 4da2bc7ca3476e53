"""GroupViT grouping: the block that merges patch tokens into a few group (segment) tokens.

Math after GroupViT (Xu et al., CVPR'22, NVlabs/GroupViT models/group_vit.py), used unchanged by OVSegmentor
(Xu et al., CVPR'23): one pass, no iterations/GRU.

    group tokens (B, T, C) -> LN -> token-MLP T->G -> LN                       ("project_group_token")
    -> CrossAttnBlock(groups query LN(patches), post-norm)                      ("pre_assign_attn")
    -> AssignAttention, 1 head: logits = q(groups) k(patches)^T / sqrt(C)      (B, G, N)
         assignment = softmax over GROUPS (each patch picks a group); training: hard Gumbel one-hot with
         straight-through gradients (tau=1); eval: arg-max one-hot (or soft, see `eval_hard`)
         pooled = (assignment / (sum over patches + eps)) @ v(patches)
    -> + residual (projected groups) -> + MLP(LN(.))

"q/k" of the OVSegmentor mask loss are exactly `q` and `k` of AssignAttention above (after their linear
projections, 1 head, width C): q are the G projected group tokens, k the N layer-normed patch tokens. Both are
returned in GroupingOutput so the model can build cross-image masks q_x k_y^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ovseg_core.layers.attention import CrossAttnBlock
from ovseg_core.layers.mlp import TokenMlp
from ovseg_core.numerics import at_least_float32


def straight_through_one_hot(y_soft: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot of the arg-max along `dim` in the forward pass, gradient of `y_soft` in the backward pass."""
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def gumbel_noise(shape: torch.Size | tuple[int, ...], device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(U)), always drawn and returned in float32.

    U is clamped away from 0 and 1: torch's F.gumbel_softmax draws from exponential_(), which can return 0 and
    produce inf noise (pytorch/pytorch#41663, the reason GroupViT re-implemented it). float32 even under bf16
    autocast: in bf16, U's 8-bit mantissa cuts the tail at about 5.5 and makes many draws equal, and equal
    scores then send the arg-max to the lowest group index.
    """
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    return -torch.log(-torch.log(u.clamp(torch.finfo(torch.float32).tiny, 1.0 - 1e-7)))


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = True, dim: int = -1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-softmax sample; `hard=True` gives a one-hot forward with straight-through gradients.

    Noise, softmax and arg-max run in float32 at least (float64 logits stay float64) whatever the logits' dtype
    (autocast off inside); the result is cast back to the logits' dtype.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        noisy = at_least_float32(logits) + gumbel_noise(logits.shape, logits.device, generator)
        y_soft = (noisy / tau).softmax(dim)
        y = straight_through_one_hot(y_soft, dim) if hard else y_soft
    return y.to(logits.dtype)


@dataclass
class GroupingOutput:
    """What the grouping block returns.

    Attributes:
        groups: (B, G, C) new group tokens.
        assign: (B, G, N) assignment used for pooling (hard straight-through in training; arg-max or soft in eval);
            one-hot/soft over groups, i.e. sums to 1 over G for every patch.
        soft_assign: (B, G, N) noise-free softmax over groups (what segmentation uses).
        q: (B, G, C) AssignAttention queries (projected group tokens).
        k: (B, N, C) AssignAttention keys (projected, layer-normed patch tokens).
    """

    groups: torch.Tensor
    assign: torch.Tensor
    soft_assign: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor


class AssignAttention(nn.Module):
    """Single-head attention whose softmax runs over the QUERIES (groups), so each patch is assigned to one group.

    Args:
        dim: token width.
        qkv_bias: bias in the q/k/v projections.
        gumbel_tau: Gumbel temperature in training.
        gumbel_noise: add Gumbel noise to the training assignment (GroupViT's `gumbel` flag); False keeps the hard
            straight-through arg-max of the clean softmax, the assignment inference uses.
        assign_eps: added to the per-group number of assigned patches before normalising (avoids 0/0 for empty
            groups; GroupViT: 1).
        eval_hard: pool with the arg-max assignment in eval mode (GroupViT) instead of the soft one.
    """

    def __init__(self, dim: int, qkv_bias: bool = True, gumbel_tau: float = 1.0, assign_eps: float = 1.0,
                 eval_hard: bool = True, gumbel_noise: bool = True) -> None:
        super().__init__()
        self.scale = dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.gumbel_tau = gumbel_tau
        self.assign_eps = assign_eps
        self.eval_hard = eval_hard
        self.gumbel_noise = gumbel_noise

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, GroupingOutput]:
        """query (B, G, C) group tokens, key (B, N, C) patch tokens -> pooled (B, G, C) and the assignment."""
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(key)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, G, N)
        soft = logits.softmax(dim=-2)
        if self.training and self.gumbel_noise:
            assign = gumbel_softmax(logits, tau=self.gumbel_tau, hard=True, dim=-2)
        elif self.training or self.eval_hard:
            assign = straight_through_one_hot(soft, dim=-2)
        else:
            assign = soft
        weights = assign / (assign.sum(dim=-1, keepdim=True) + self.assign_eps)
        out = self.proj(weights @ v)
        info = GroupingOutput(groups=out, assign=assign, soft_assign=soft, q=q, k=k)
        return out, info


class GroupingBlock(nn.Module):
    """GroupViT grouping block: T group tokens + N patches -> G new group tokens (see module docstring).

    Args:
        dim: token width.
        num_heads: heads of the pre-assignment cross-attention.
        num_group_tokens: T, input group tokens.
        num_output_groups: G, output groups.
        mlp_ratio: (token-MLP hidden / dim, channel-MLP hidden / dim); GroupViT uses (0.5, 4).
        gumbel_tau: Gumbel temperature of the hard assignment in training.
        assign_eps: see AssignAttention.
        eval_hard: see AssignAttention.
        gumbel_noise: see AssignAttention.
    """

    def __init__(self, dim: int, num_heads: int, num_group_tokens: int, num_output_groups: int,
                 mlp_ratio: tuple[float, float] = (0.5, 4.0), gumbel_tau: float = 1.0, assign_eps: float = 1.0,
                 eval_hard: bool = True, gumbel_noise: bool = True) -> None:
        super().__init__()
        tokens_hidden, channels_hidden = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.num_output_groups = num_output_groups
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = TokenMlp(num_group_tokens, tokens_hidden, num_output_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, post_norm=True)
        self.assign = AssignAttention(dim, qkv_bias=True, gumbel_tau=gumbel_tau, assign_eps=assign_eps,
                                      eval_hard=eval_hard, gumbel_noise=gumbel_noise)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channels_hidden, dim)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor) -> GroupingOutput:
        """x (B, N, C) patch tokens, group_tokens (B, T, C) -> GroupingOutput with groups (B, G, C)."""
        x = self.norm_x(x)
        groups = self.norm_post_tokens(self.mlp_inter(self.norm_tokens(group_tokens)))
        groups = self.pre_assign_attn(groups, x)
        pooled, info = self.assign(groups, x)
        new_groups = pooled + groups
        info.groups = new_groups + self.mlp_channels(self.norm_new_x(new_groups))
        return info


def resize_assignment(assign: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, G, N) assignment -> (B, G, h, w) on the patch grid."""
    b, g, n = assign.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"assignment has {n} patches, grid {grid} has {grid[0] * grid[1]}")
    return assign.reshape(b, g, grid[0], grid[1])


def upsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, G, h, w) -> (B, G, H, W) bilinear (align_corners=True, as OVSegmentor's mask loss)."""
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=True)
