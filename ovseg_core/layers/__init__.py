"""Reusable layers: cross-attention, MLP/projection heads, the GroupViT grouping block and a convolutional stem."""

from ovseg_core.layers.attention import CrossAttention, CrossAttnBlock, key_padding_to_attn_mask
from ovseg_core.layers.conv_stem import conv_stem
from ovseg_core.layers.grouping import (
    AssignAttention,
    GroupingBlock,
    GroupingOutput,
    gumbel_softmax,
    resize_assignment,
    straight_through_one_hot,
    upsample_masks,
)
from ovseg_core.layers.mlp import ProjectionHead, TokenMlp

__all__ = [
    "AssignAttention", "CrossAttention", "CrossAttnBlock", "GroupingBlock", "GroupingOutput", "ProjectionHead",
    "TokenMlp", "conv_stem", "gumbel_softmax", "key_padding_to_attn_mask", "resize_assignment",
    "straight_through_one_hot", "upsample_masks",
]
