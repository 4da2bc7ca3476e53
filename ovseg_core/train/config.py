"""TrainConfig: one frozen, validated description of a pretraining run, saved as JSON in its out_dir.

Stage presets (`STAGE_PRESETS`, the paper's values, before LR scaling by global batch / 4096):
  stage 1: base lr 6.4e-4, warmup from 1.6e-5 over 2 epochs, cosine to 1.6e-4, DeiT augmentation, ITC + MEC.
  stage 2: lr 1e-5 -> 1e-6, no warmup, text encoder frozen, light augmentation, + mask loss, EMA teacher 0.99;
           starts from a stage-1 checkpoint (init_checkpoint).
Paper LRs are tuned for a 4096 batch: scaled to a CPU batch of 32 they are ~128x smaller, too small to learn anything
in minutes, so small runs pass explicit lrs and `scale_lr=False` (the tiny benchmark does; it is recorded).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovseg_core.data.transforms import AUGMENTATIONS

STAGE_PRESETS: dict[int, dict[str, Any]] = {
    1: {"base_lr": 6.4e-4, "warmup_lr": 1.6e-5, "min_lr": 1.6e-4, "warmup_epochs": 2.0, "augment": "deit"},
    2: {"base_lr": 1e-5, "warmup_lr": 1e-5, "min_lr": 1e-6, "warmup_epochs": 0.0, "augment": "light"},
}
LR_REFERENCE_BATCH = 4096


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (stage 1 or 2). `batch_size` is GLOBAL (split evenly over ranks).

    Length: exactly one of `steps` / `epochs` (epochs count training samples of the build, read from its meta).
    Warmup: `warmup_steps` if given, else `warmup_epochs` converted with the same samples-per-epoch.
    """

    build_dir: str
    out_dir: str
    preset: str = "tiny"
    stage: int = 1
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    base_lr: float = STAGE_PRESETS[1]["base_lr"]
    warmup_lr: float = STAGE_PRESETS[1]["warmup_lr"]
    min_lr: float = STAGE_PRESETS[1]["min_lr"]
    warmup_epochs: float = STAGE_PRESETS[1]["warmup_epochs"]
    warmup_steps: int | None = None
    scale_lr: bool = True
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 5.0
    augment: str = "deit"
    max_text_len: int = 77
    momentum: float = 0.99
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    shuffle_buffer: int = 256
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0
    val_percent: float = 2.0
    val_max_samples: int = 512
    val_batch_size: int = 64
    init_checkpoint: str | None = None
    resume: bool = True
    time_limit_s: float | None = None
    model_overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "model_overrides", tuple((str(k), v) for k, v in self.model_overrides))
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not (0 < self.min_lr <= self.base_lr and 0 < self.warmup_lr):
            raise ValueError(f"need 0 < min_lr <= base_lr and warmup_lr > 0, got {self.min_lr}, {self.base_lr}, "
                             f"{self.warmup_lr}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError("warmup must be >= 0")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if not 0 <= self.val_percent < 100:
            raise ValueError(f"val_percent must be in [0, 100), got {self.val_percent}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("num_workers", "shuffle_buffer", "log_every", "save_every", "eval_every", "val_max_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_text_len < 4:
            raise ValueError(f"max_text_len must be >= 4, got {self.max_text_len}")
        if self.stage == 2 and not self.init_checkpoint:
            raise ValueError("stage 2 starts from a stage-1 checkpoint: set init_checkpoint")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError("time_limit_s must be positive")

    @classmethod
    def for_stage(cls, stage: int, **kwargs: Any) -> TrainConfig:
        """The paper's stage preset (lrs, warmup, augmentation) with explicit kwargs taking precedence."""
        if stage not in STAGE_PRESETS:
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        return cls(**{**STAGE_PRESETS[stage], "stage": stage, **kwargs})

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.model_overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["model_overrides"] = [[k, v] for k, v in self.model_overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        d = dict(d)
        if "model_overrides" in d:
            d["model_overrides"] = tuple(tuple(kv) for kv in d["model_overrides"])
        return cls(**d)

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
