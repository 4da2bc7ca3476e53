"""The `paper` recipe: the released CC4M run of OVSegmentor, per stage, and its run plan (what `--dry-run` prints).

The recipe owns the GLOBAL batch; the hardware only splits it (per-device batch = global / (GPUs x nodes)).
Gradient accumulation is not offered: for a contrastive loss it is not equivalent (fewer negatives per step), so a
per-device batch that does not fit is refused (ovseg_core.train.memory). `--global-batch N` is the one way to run
smaller: it rescales the lrs (x N / 4096, as always) and is recorded in the plan.

Values (../shared/docs/ovsegmentor.md, the released configs; lrs before scaling by global batch / 4096):
  stage 1: vit_b + bert-base-uncased, DINO ViT-B/16 init, 224 px, 77 tokens; 30 epochs, global batch 2048;
           lr 6.4e-4, warmup from 1.6e-5 over 2 epochs, cosine to 1.6e-4; DeiT augmentation (bilinear,
           rand-m9-mstd0.5, random erasing 0.25); ITC + MEC.
  stage 2: from the stage-1 checkpoint; 10 epochs, global batch 1024; lr 1e-5 -> 1e-6, no warmup; text
           transformer frozen; + cross-image mask loss (threshold 0.6), EMA teacher 0.99; crop + flip.
Fidelity switches (PAPER_FIDELITY) take the release's side, except checkpoint selection (docs/training.md).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ovseg_core.train.config import TrainConfig

RECIPES = ("paper", "sample", "custom")
PAPER_PRESET = "vit_b"
PAPER_VISUAL_INIT = "vit_base_patch16_224.dino"
PAPER_STAGES: dict[int, dict[str, Any]] = {
    1: {"epochs": 30.0, "global_batch": 2048, "base_lr": 6.4e-4, "warmup_lr": 1.6e-5, "min_lr": 1.6e-4,
        "warmup_epochs": 2.0, "augment": "deit"},
    2: {"epochs": 10.0, "global_batch": 1024, "base_lr": 1e-5, "warmup_lr": 1e-5, "min_lr": 1e-6,
        "warmup_epochs": 0.0, "augment": "light"},
}
# The release's side of every fidelity switch, but checkpoint selection: "voc-val-miou" chooses on the test set.
# tf32: the release pinned torch 1.11, whose default allow_tf32=True made its fp32 A100 run TF32 matmuls.
PAPER_FIDELITY: dict[str, Any] = {"precision": "tf32", "bn_stats": "release", "decay_logit_scale": True,
                                  "frozen_text_mode": "train", "checkpoint_selection": "heldout-itc",
                                  "interpolation": "bilinear"}
PLAN_KEYS = ("preset", "stage", "world_size", "global_batch", "per_device_batch", "epochs", "steps_per_epoch",
             "peak_lr", "warmup_start_lr", "final_lr", "warmup_epochs", "weight_decay", "visual_init", "text_encoder",
             "text_frozen", "image_size", "max_text_len", "augment", "precision", "loss_weights",
             "checkpoint_selection", "shuffle")
RUN_PLAN_NAME = "run.json"


def per_device_batch(global_batch: int, world_size: int) -> int:
    """global / world size; a global batch the devices cannot split evenly is refused (one line)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not split evenly over {world_size} devices")
    return global_batch // world_size


def paper_config(stage: int, build_dir: str, out_dir: str, *, world_size: int = 8, global_batch: int | None = None,
                 visual_init: str | None = None, init_checkpoint: str | None = None, preset: str = PAPER_PRESET,
                 **overrides: Any) -> TrainConfig:
    """The `paper` recipe's TrainConfig for `stage` on `world_size` devices.

    global_batch: None = the recipe's; N = a smaller (or larger) run, lrs rescaled. visual_init: None = DINO
    ViT-B/16 (timm name), "none" = from scratch (recorded), else a timm name or a local file. `overrides`: any
    other TrainConfig field (the tests' tiny runs: preset, steps, model_overrides, ...)."""
    if stage not in PAPER_STAGES:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    values = dict(PAPER_STAGES[stage])
    batch = int(global_batch or values.pop("global_batch"))
    values.pop("global_batch", None)
    per_device_batch(batch, world_size)
    fields: dict[str, Any] = {
        **values, **PAPER_FIDELITY, "recipe": "paper", "stage": stage, "preset": preset, "batch_size": batch,
        "build_dir": str(build_dir), "out_dir": str(out_dir), "scale_lr": True, "weight_decay": 0.05,
        "max_text_len": 77, "momentum": 0.99, "init_checkpoint": init_checkpoint,
        "visual_init": PAPER_VISUAL_INIT if visual_init is None else visual_init,
    }
    fields.update(overrides)
    if "steps" in overrides:
        fields.pop("epochs")
    return TrainConfig(**fields)


def _model_config(cfg: TrainConfig) -> Any:
    from ovseg_core.models._registry import get_model_config  # imports the model code, loads no weights

    return get_model_config(cfg.preset, **cfg.model_create_kwargs)


def run_plan(cfg: TrainConfig, world_size: int, train_samples: int, model_cfg: Any = None) -> dict[str, Any]:
    """The resolved run as one JSON-able dict with exactly PLAN_KEYS (lrs are the effective, scaled values).
    `model_cfg`: the built model's config (default: the preset's, from the registry; no weights loaded)."""
    from ovseg_core.data.transforms import describe_augment
    from ovseg_core.train.optim import scaled_lrs

    model = _PlanModel.of(model_cfg if model_cfg is not None else _model_config(cfg))
    lrs = scaled_lrs(cfg)
    text_frozen = cfg.stage == 2 or model.text_trainable_layers == 0
    plan = {
        "preset": cfg.preset, "stage": cfg.stage, "world_size": world_size, "global_batch": cfg.batch_size,
        "per_device_batch": per_device_batch(cfg.batch_size, world_size),
        "epochs": cfg.epochs if cfg.epochs is not None else round(cfg.steps * cfg.batch_size / train_samples, 4),
        "steps_per_epoch": round(train_samples / cfg.batch_size, 4),
        "peak_lr": lrs.base, "warmup_start_lr": lrs.warmup if _has_warmup(cfg) else lrs.base, "final_lr": lrs.min,
        "warmup_epochs": cfg.warmup_epochs if cfg.warmup_steps is None else round(
            cfg.warmup_steps * cfg.batch_size / train_samples, 4),
        "weight_decay": cfg.weight_decay, "visual_init": cfg.visual_init or "none", "text_encoder": model.text_model,
        "text_frozen": text_frozen, "image_size": model.image_size, "max_text_len": cfg.max_text_len,
        "augment": describe_augment(cfg.augment, cfg.interpolation), "precision": cfg.precision,
        "loss_weights": {"itc": 1.0, "mec": model.mec_weight, "mask": model.mask_weight if cfg.stage == 2 else 0.0,
                         "entity_prompt": model.entity_prompt_weight},
        "checkpoint_selection": cfg.checkpoint_selection,
        "shuffle": {"method": "build: ids permuted per growth round; run: shards reshuffled per epoch, read "
                              "interleaved into a shuffle buffer (docs/training.md)",
                    "shuffle_buffer": cfg.shuffle_buffer, "shards_in_flight": cfg.shards_in_flight,
                    "partner_source": cfg.partner_source if cfg.stage == 2 else None, "seed": cfg.seed},
    }
    assert tuple(plan) == PLAN_KEYS  # the dry-run's contract (issue 17 item 3)
    return plan


@dataclass(frozen=True)
class _PlanModel:
    """The model settings a plan shows (models that are not OVSegConfig, e.g. the tests' stand-ins, lack some)."""

    text_model: str | None
    text_trainable_layers: int | None
    image_size: int | None
    mec_weight: float
    mask_weight: float
    entity_prompt_weight: float

    @classmethod
    def of(cls, model_cfg: Any) -> _PlanModel:
        defaults = {"mec_weight": 0.0, "mask_weight": 0.0, "entity_prompt_weight": 0.0}
        return cls(**{f.name: getattr(model_cfg, f.name, defaults.get(f.name)) for f in fields(cls)})


def _has_warmup(cfg: TrainConfig) -> bool:
    return (cfg.warmup_steps or 0) > 0 or (cfg.warmup_steps is None and cfg.warmup_epochs > 0)


def count_train_samples(cfg: TrainConfig) -> int:
    """Training samples of the build (its manifest checked first; no image is read)."""
    from ovseg_core.data.cc4m import BuildReader, check_build

    check_build(cfg.build_dir, shards_here=cfg.shard_base_url is None)
    return len(BuildReader(cfg.build_dir, shard_base_url=cfg.shard_base_url).split_ids("train", cfg.val_percent))


def save_run_plan(plan: dict[str, Any], out_dir: str | Path) -> Path:
    from manifests.fileio import write_text_atomic

    return write_text_atomic(Path(out_dir) / RUN_PLAN_NAME, json.dumps(plan, indent=1) + "\n")


def total_steps(cfg: TrainConfig, train_samples: int) -> int:
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * train_samples / cfg.batch_size))
