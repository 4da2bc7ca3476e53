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

from ovseg_core.numerics import content_key

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


def propagate(scores: Tensor, affinity: Tensor, iterations: int = PAMR_ITERATIONS,
              dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """PAMR's iterations: each pixel's (N, K, H, W) `scores` become the `affinity`-weighted ((N, P, H, W), from
    `pixel_affinity` with the same dilations) sum of its neighbours' scores. Each channel is refined on its own, so
    a channel's result does not depend on which other channels are refined with it (bit for bit)."""
    height, width = scores.shape[-2:]
    pad = max(dilations)
    weights = affinity[:, :, None]  # (N, P, 1, H, W): one weight map per neighbour, shared by the channels
    out = scores.float()
    for _ in range(iterations):
        padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        total = torch.zeros_like(out)
        shifts = ((dy * d, dx * d) for d in dilations for dy, dx in _OFFSETS)
        # Accumulating shift by shift, instead of stacking all P shifted copies, keeps the working set at two maps
        # (8x faster on a 64 px image with 23 classes).
        for p, (oy, ox) in enumerate(shifts):
            total.addcmul_(padded[..., pad + oy: pad + oy + height, pad + ox: pad + ox + width], weights[:, p])
        out = total
    return out


def pamr(image: Tensor, scores: Tensor, iterations: int = PAMR_ITERATIONS,
         dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """Refine (N, K, H, W) `scores` along the edges of the (N, 3, H, W) `image` (same H, W); returns new scores."""
    _check_pamr_inputs(image, scores, iterations, dilations)
    return propagate(scores, pixel_affinity(image.float(), dilations), iterations, dilations)


def _check_pamr_inputs(image: Tensor, scores: Tensor, iterations: int, dilations: Sequence[int]) -> None:
    if image.shape[0] != scores.shape[0] or image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and scores {tuple(scores.shape)} must share N, H and W")
    if iterations < 0 or not dilations or min(dilations) < 1:
        raise ValueError(f"need iterations >= 0 and dilations >= 1, got {iterations}, {tuple(dilations)}")


class MemoisedPamr:
    """`pamr` for one image at a time that remembers each image's affinity and each refined score channel, keyed by
    their exact content. A selection sweep refines the same image's scores for every candidate, and candidates that
    differ in bg_thresh change only the background channel (top-k changes the class channels, and zeroes most):
    each distinct channel is then refined once. Results are bit-identical to `pamr` (`propagate` refines channels
    independently). Memory grows with the distinct channels seen: `clear()` between independent sweeps.
    """

    def __init__(self, iterations: int = PAMR_ITERATIONS, dilations: Sequence[int] = PAMR_DILATIONS) -> None:
        self.iterations, self.dilations = iterations, tuple(dilations)
        self._affinity: dict[tuple, Tensor] = {}
        self._channels: dict[tuple, Tensor] = {}
        self.channels_refined = 0  # how many channels went through `propagate` (the sweep's PAMR work)

    def clear(self) -> None:
        self._affinity.clear()
        self._channels.clear()

    def __call__(self, image: Tensor, scores: Tensor) -> Tensor:
        if image.shape[0] != 1:
            raise ValueError(f"MemoisedPamr refines one image at a time, got a batch of {image.shape[0]}")
        _check_pamr_inputs(image, scores, self.iterations, self.dilations)
        image_key = content_key(image)
        if image_key not in self._affinity:
            self._affinity[image_key] = pixel_affinity(image.float(), self.dilations)
        channels = scores.float()[0]
        keys = [(image_key, content_key(channel)) for channel in channels]
        todo: dict[tuple, int] = {}  # each channel not seen yet -> its first index in `scores`
        for index, key in enumerate(keys):
            if key not in self._channels:
                todo.setdefault(key, index)
        if todo:
            refined = propagate(channels[list(todo.values())][None], self._affinity[image_key], self.iterations,
                                self.dilations)[0]
            self._channels.update(zip(todo, refined))
            self.channels_refined += len(todo)
        return torch.stack([self._channels[key] for key in keys])[None]
