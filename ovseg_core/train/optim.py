"""AdamW with weight-decay exclusions, LR scaling by global batch, and a per-iteration cosine schedule.

Deviation from the release (kept on purpose, listed in the README): the release (GroupViT's `build_optimizer`)
exempts only 1-D parameters and biases from weight decay, so it DOES decay the position embedding, the group tokens
and BERT's position/token-type embeddings. We also exempt those (NO_DECAY_KEYWORDS). The logit scale, which the
release decays too, is the one with a switch (TrainConfig.decay_logit_scale; the `paper` recipe decays it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ovseg_core.train.config import LR_REFERENCE_BATCH, TrainConfig

# Parameters never decayed whatever their shape (our choice, not the release's, see the module docstring): learned
# positions, group/cls tokens and the logit scale are not "weights" whose norm should shrink (decaying them pulls
# positions/groups toward zero and the temperature toward 1).
NO_DECAY_KEYWORDS = ("pos_embed", "position_embedding", "group_token", "cls_token", "logit_scale", "token_type_embedding")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_KEYWORDS)


def param_groups(model: nn.Module, weight_decay: float, decay_logit_scale: bool = False) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decayed weights and everything in `is_no_decay`.
    decay_logit_scale: decay the logit scale as the release does (a 0-d parameter, so its 1-D rule misses it)."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_no_decay(name, p) and not (decay_logit_scale and name.endswith("logit_scale")):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


@dataclass(frozen=True)
class LRValues:
    base: float
    warmup: float
    min: float


def scaled_lrs(cfg: TrainConfig) -> LRValues:
    """The config's lrs times global batch / 4096 (the paper's linear scaling) when cfg.scale_lr."""
    factor = cfg.batch_size / LR_REFERENCE_BATCH if cfg.scale_lr else 1.0
    return LRValues(cfg.base_lr * factor, cfg.warmup_lr * factor, cfg.min_lr * factor)


def lr_scale_of(name: str, lr_scales: tuple[tuple[str, float], ...]) -> float:
    """The multiplier of the first prefix in `lr_scales` that `name` starts with (1.0 when none does)."""
    return next((float(scale) for prefix, scale in lr_scales if name.startswith(prefix)), 1.0)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, split further by cfg.lr_scales: each group carries an "lr_scale" that
    CosineWarmupSchedule multiplies into its lr (AdamW's decoupled decay scales with lr, so 0 also stops decay)."""
    out = []
    for g in param_groups(model, cfg.weight_decay, cfg.decay_logit_scale):
        by_scale: dict[float, list[torch.Tensor]] = {}
        for name, p in zip(g["names"], g["params"]):
            by_scale.setdefault(lr_scale_of(name, cfg.lr_scales), []).append(p)
        out += [{"params": ps, "weight_decay": g["weight_decay"], "lr_scale": scale} for scale, ps in by_scale.items()]
    groups = [g for g in out if g["params"]]
    # On the GPU the step is launch-bound (~3,400 kernels; benchmarks/results/gpu_profile.json): the fused AdamW
    # kernel replaces the per-tensor update launches. Same update rule; CPU keeps the default implementation.
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=scaled_lrs(cfg).base, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


class CosineWarmupSchedule:
    """Per-iteration LR: linear warmup warmup_lr -> base_lr over warmup_steps, then cosine base_lr -> min_lr over
    the remaining steps (timm's `warmup_prefix=True` shape). `step()` is called once after every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lrs: LRValues) -> None:
        if total_steps <= 0:
            raise ValueError("total_steps must be positive")
        self.optimizer, self.total_steps, self.lrs = optimizer, total_steps, lrs
        self.warmup_steps = min(max(0, warmup_steps), total_steps)
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lrs.warmup + (self.lrs.base - self.lrs.warmup) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lrs.min + 0.5 * (self.lrs.base - self.lrs.min) * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "lrs": [self.lrs.base, self.lrs.warmup, self.lrs.min]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
