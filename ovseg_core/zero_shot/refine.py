"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), an optional last step of zero-shot inference.

A grouping model assigns patches, not pixels, to groups: its masks are the patch grid's assignment upsampled
bilinearly, so object borders are blurred over a patch or more. PAMR propagates the class scores between
neighbouring pixels of similar colour: each pixel's scores become an affinity-weighted mean of its neighbours'
(8 neighbours at each dilation), where the affinity of neighbour j of pixel i is a softmax over the neighbours of
-|I_i - I_j| / (0.1 * local standard deviation), averaged over the colour channels, and the step is repeated.
Scores then follow the image's edges. TCL (CVPR 2023) reports its zero-shot segmentation with it; the
OVSegmentor/GroupViT protocol does not use it, so it is off by default (``SegmenterConfig.refine = "none"``) and a
selection split decides whether a run uses it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

REFINE_MODES = ("none", "pamr")
PAMR_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
PAMR_ITERATIONS = 10
_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _neighbours(x: Tensor, dilations: Sequence[int]) -> Tensor:
    """(N, C, H, W) -> (N, C, P, H, W): the 8 neighbours at each dilation (P = 8 x len(dilations)), borders replicated."""
    height, width = x.shape[-2:]
    pad = max(dilations)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    shifted = [padded[..., pad + dy * d: pad + dy * d + height, pad + dx * d: pad + dx * d + width]
               for d in dilations for dy, dx in _OFFSETS]
    return torch.stack(shifted, dim=2)


def pixel_affinity(image: Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """(N, 3, H, W) image -> (N, P, H, W) weights over each pixel's neighbours (they sum to 1 per pixel)."""
    neighbours = _neighbours(image, dilations)  # (N, 3, P, H, W)
    distance = (neighbours - image[:, :, None]).abs()
    # Local contrast per dilation: the standard deviation of the pixel and its 8 neighbours at that distance.
    n, c, _, h, w = neighbours.shape
    rings = torch.cat([image[:, :, None, None].expand(n, c, len(dilations), 1, h, w),
                       neighbours.view(n, c, len(dilations), len(_OFFSETS), h, w)], dim=3)
    local_std = rings.std(dim=3, keepdim=True).expand(-1, -1, -1, len(_OFFSETS), -1, -1).reshape(n, c, -1, h, w)
    logits = (-distance / (1e-8 + 0.1 * local_std)).mean(dim=1)
    return logits.softmax(dim=1)


def pamr(image: Tensor, scores: Tensor, iterations: int = PAMR_ITERATIONS,
         dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """Refine (N, K, H, W) `scores` along the edges of the (N, 3, H, W) `image` (same H, W); returns new scores."""
    if image.shape[0] != scores.shape[0] or image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and scores {tuple(scores.shape)} must share N, H and W")
    if iterations < 0 or not dilations or min(dilations) < 1:
        raise ValueError(f"need iterations >= 0 and dilations >= 1, got {iterations}, {tuple(dilations)}")
    affinity = pixel_affinity(image.float(), dilations)[:, None]  # (N, 1, P, H, W)
    out = scores.float()
    for _ in range(iterations):
        out = (_neighbours(out, dilations) * affinity).sum(dim=2)
    return out
