"""Convolutional patch embedding ("Early Convolutions Help Transformers See Better", Xiao et al., NeurIPS'21).

A ViT's patch embedding is one linear map per non-overlapping patch. The convolutional stem reaches the same patch
grid through log2(patch) 3x3 stride-2 convolutions (BatchNorm + ReLU after each) and a final 1x1 convolution to
the token width, so a token sees its neighbourhood's edges and textures, not just its own pixels. It is an option
for models trained from scratch (`OVSegConfig.patch_embed="conv"`); the paper's models start from a DINO ViT,
whose linear patch embedding it would throw away.
"""

from __future__ import annotations

from torch import nn


def conv_stem(in_chans: int, embed_dim: int, patch_size: int) -> nn.Sequential:
    """(B, in_chans, H, W) -> (B, embed_dim, H / patch, W / patch); drop-in for a PatchEmbed's `proj`.

    The stride-2 stages double the channels up to embed_dim / 2: for patch 4 and width 96, 3 -> 24 -> 48 -> 96.

    Args:
        in_chans: image channels.
        embed_dim: token width; must be divisible by patch_size.
        patch_size: a power of two >= 2 (one stride-2 stage per factor of two).
    """
    stages = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << stages != patch_size:
        raise ValueError(f"a convolutional stem needs a power-of-two patch size >= 2, got {patch_size}")
    if embed_dim % patch_size:
        raise ValueError(f"a convolutional stem needs embed_dim divisible by the patch size, got {embed_dim} and "
                         f"{patch_size}")
    layers: list[nn.Module] = []
    channels = in_chans
    for stage in range(stages):
        out = embed_dim * 2**stage // patch_size  # embed_dim / patch, ..., embed_dim / 2
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True)]
        channels = out
    layers.append(nn.Conv2d(channels, embed_dim, 1))
    return nn.Sequential(*layers)
