"""The compiled training step: `torch.compile` of the forward and the losses, with fixed text lengths.

Why: eager, a `vit_s` step launches ~3,400 small kernels and its time hardly changes between batch 64 and 256
(README, gpu.json): the GPU waits on launches. Inductor fuses the elementwise chains (LayerNorm, GELU, the grouping
block's Gumbel noise / softmax / straight-through one-hot / normalisation, the losses) into few kernels, and on a
single CUDA process CUDA graphs ("reduce-overhead") replay the whole step with one launch per graph.

Shapes: the image batch is fixed (drop_last=True); texts are cut to their longest real token and then padded up to
the next of a few fixed lengths (`TEXT_BUCKETS`), so a run compiles a handful of graphs instead of one per batch.
Padding columns carry mask 0: every real token's state, hence every loss, is unchanged (up to float rounding).

Switch: `TrainConfig.compile` ("auto" = on for CUDA, off on CPU; "on"; "off"). What runs compiled is the module's
`forward(batch, stage)` (the trainer's TrainStep / DDP wrapper); backward, clipping and the optimizer stay eager.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ovseg_core.batch import TEXT_PAIRS

COMPILE_CHOICES = ("auto", "on", "off")
# Text lengths a compiled step sees (plus the loader's max_len when longer): captions are mostly < 32 tokens,
# answers and shared-class prompts < 16.
TEXT_BUCKETS = (16, 32, 48, 64, 80)

StepFn = Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether `setting` ("auto" | "on" | "off") compiles on `device`; "auto" compiles on CUDA only."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {setting!r}")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def compile_mode(device: torch.device, world_size: int) -> str:
    """torch.compile mode: CUDA graphs on a single CUDA process; plain inductor under DDP and on CPU.

    DDP's gradient hooks all-reduce buckets during backward, outside any captured graph, so several ranks use the
    default mode (fusion only).
    """
    return "reduce-overhead" if device.type == "cuda" and world_size == 1 else "default"


def bucket_length(width: int, buckets: Sequence[int] = TEXT_BUCKETS) -> int:
    """The smallest bucket >= width (width itself when it is longer than every bucket)."""
    return next((b for b in buckets if b >= width), width)


def pad_text_to_buckets(batch: dict[str, torch.Tensor],
                        buckets: Sequence[int] = TEXT_BUCKETS) -> dict[str, torch.Tensor]:
    """Pad every (ids, mask) pair on the right, with id 0 and mask 0, to `bucket_length` of its width.

    Use after `trim_text_padding`: trimming cuts pure-padding columns, this adds some back so that the widths
    take only a few values. Masked columns change nothing the model reads (attention never looks at them; the
    sentence embedding is position 0).
    """
    out = dict(batch)
    for ids_key, mask_key in TEXT_PAIRS:
        if ids_key not in out or mask_key not in out:
            continue
        ids, mask = out[ids_key], out[mask_key]
        extra = bucket_length(ids.shape[1], buckets) - ids.shape[1]
        if extra:
            out[ids_key] = torch.nn.functional.pad(ids, (0, extra), value=0)
            out[mask_key] = torch.nn.functional.pad(mask, (0, extra), value=0)
    return out


def build_train_step(module: nn.Module, setting: str, device: torch.device, world_size: int = 1) -> StepFn:
    """`step(batch, stage) -> losses`: `module(batch, stage)`, compiled when `setting` says so on `device`.

    Eager (compile off) the batch goes through untouched, so an eager run is exactly what it was before.
    """
    if not compile_enabled(setting, device):
        return module
    compiled = torch.compile(module, mode=compile_mode(device, world_size), dynamic=False)

    def step(batch: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous step are no longer read
        return compiled(pad_text_to_buckets(batch), stage)

    return step
