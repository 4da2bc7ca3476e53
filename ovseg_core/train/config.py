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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests.fileio import write_text_atomic
from ovseg_core.config import BN_STATS, refuse_released_names
from ovseg_core.data.transforms import AUGMENTATIONS

STAGE_PRESETS: dict[int, dict[str, Any]] = {
    1: {"base_lr": 6.4e-4, "warmup_lr": 1.6e-5, "min_lr": 1.6e-4, "warmup_epochs": 2.0, "augment": "deit"},
    2: {"base_lr": 1e-5, "warmup_lr": 1e-5, "min_lr": 1e-6, "warmup_epochs": 0.0, "augment": "light"},
}
LR_REFERENCE_BATCH = 4096
# The fidelity switches (issue 17 item 6): each value names whose behaviour it is; docs/training.md lists them.
FIDELITY_CHOICES: dict[str, tuple[Any, ...]] = {
    "precision": ("fp32", "tf32", "bf16"),
    "bn_stats": BN_STATS,
    "decay_logit_scale": (False, True),
    "frozen_text_mode": ("eval", "train"),
    "checkpoint_selection": ("heldout-itc", "voc-val-miou"),
    "interpolation": ("bicubic", "bilinear"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (stage 1 or 2). `batch_size` is GLOBAL (split evenly over ranks).

    Length: exactly one of `steps` / `epochs` (epochs count training samples of the build, read from its meta).
    Warmup: `warmup_steps` if given, else `warmup_epochs` converted with the same samples-per-epoch.
    repeat_threshold: None = every training sample once per epoch; t = LVIS repeat-factor sampling over the
        caption classes (see ovseg_core.data.loader.class_repeat_factors).
    lr_scales: ((parameter-name prefix, lr multiplier), ...): parameters whose name starts with a prefix (first match)
        train at lr x multiplier (0 = locked); e.g. (("text_proj.", 0.0),) locks the text projector. Empty = one lr
        for everything (the paper).
    cache_frozen_text: when the whole text transformer is frozen, encode each distinct text once (eval mode) and
        reuse its token states (ovseg_core.train.text_cache); ignored when any text parameter trains.
    shuffle_buffer / shards_in_flight: raw samples held for shuffling, and shards each loader slot reads at once
        (see ovseg_core.data.loader: batches then span several shards instead of a few hundred neighbouring rows).
    partner_source: stage-2 partners from the shuffle buffer ("buffer", falling back to the locator when no
        buffered sample shares a class) or always via the locator ("locator", one random read per sample).
    shard_base_url: read the shards from http(s) or an fsspec URL (folder holding the manifest's shard names)
        instead of build_dir/shards; meta and index stay in build_dir.
    compile: torch.compile the forward and the losses ("auto" = on CUDA only; "on"; "off"); see
        ovseg_core.train.compiled (fixed text-length buckets, CUDA graphs on one GPU).
    gpu_decode: the loader ships JPEG bytes and crop draws; the training device decodes and crops the batch
        (ovseg_core.data.device_decode; light/crop augmentations only).
    recipe: the named recipe this config came from ("paper", "sample"), recorded; None = hand-made.
    visual_init: image-encoder init: a timm model name (e.g. "vit_base_patch16_224.dino") or a local state-dict
        file, mapped by ovseg_core.models.visual_init; None = from scratch. Not applied when resuming or starting
        from init_checkpoint (their weights replace it).
    Fidelity switches (recorded here, so in train_config.json and in every checkpoint's train_config):
    precision: "fp32" | "tf32" (fp32 storage, TF32 matmuls on CUDA) | "bf16" (autocast; Gumbel noise, contrastive
        logits/softmax and Dice sums stay fp32). CPU runs are always fp32.
    bn_stats: "pooled" (ours) | "release" (OVSegConfig.bn_stats; "release" also keeps text padding to max_text_len).
    decay_logit_scale: weight-decay the logit scale as the release does (ours exempts it).
    frozen_text_mode: the frozen text transformer of stage 2 in "eval" (ours) or "train" mode (the release, dropout).
    checkpoint_selection: "heldout-itc" (ours: the build's held-out split) | "voc-val-miou" (the release's: chooses
        on VOC val, which is the test set); selection_layout / selection_root / selection_max_images name that
        dataset (ovseg_core.evaluation.datasets layout, folder; 0 = every image).
    interpolation: resize filter of the training augmentation ("bicubic" ours, "bilinear" the release's).
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
    shuffle_buffer: int = 4096
    shards_in_flight: int = 16
    partner_source: str = "buffer"
    shard_base_url: str | None = None
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
    repeat_threshold: float | None = None
    lr_scales: tuple[tuple[str, float], ...] = ()
    cache_frozen_text: bool = False
    compile: str = "auto"
    gpu_decode: bool = False
    recipe: str | None = None
    visual_init: str | None = None
    precision: str = "bf16"
    bn_stats: str = "pooled"
    decay_logit_scale: bool = False
    frozen_text_mode: str = "eval"
    checkpoint_selection: str = "heldout-itc"
    interpolation: str = "bicubic"
    selection_layout: str | None = None
    selection_root: str | None = None
    selection_max_images: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "model_overrides", tuple((str(k), v) for k, v in self.model_overrides))
        object.__setattr__(self, "lr_scales", tuple((str(k), float(v)) for k, v in self.lr_scales))
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
        if self.shards_in_flight < 1:
            raise ValueError(f"shards_in_flight must be >= 1, got {self.shards_in_flight}")
        if self.partner_source not in ("buffer", "locator"):
            raise ValueError(f"partner_source must be 'buffer' or 'locator', got {self.partner_source!r}")
        if self.max_text_len < 4:
            raise ValueError(f"max_text_len must be >= 4, got {self.max_text_len}")
        if self.stage == 2 and not self.init_checkpoint:
            raise ValueError("stage 2 starts from a stage-1 checkpoint: set init_checkpoint")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError("time_limit_s must be positive")
        if self.repeat_threshold is not None and not 0 < self.repeat_threshold <= 1:
            raise ValueError(f"repeat_threshold must be None or in (0, 1], got {self.repeat_threshold}")
        if self.gpu_decode and self.augment not in ("light", "crop"):
            raise ValueError(f"gpu_decode supports the light and crop augmentations, not {self.augment!r} (DeiT's "
                             f"ColorJitter/RandAugment/RandomErasing run on the CPU path)")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        refuse_released_names(dict(self.model_overrides))
        self._check_fidelity()
        if any(float(scale) < 0 for _, scale in self.lr_scales):
            raise ValueError(f"lr_scales multipliers must be >= 0, got {self.lr_scales}")

    def _check_fidelity(self) -> None:
        for name, allowed in FIDELITY_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.checkpoint_selection == "voc-val-miou" and not (self.selection_layout and self.selection_root):
            raise ValueError("checkpoint_selection 'voc-val-miou' needs selection_layout and selection_root (the "
                             "dataset whose val split chooses the checkpoint: the release's VOC val, its test set)")
        if "bn_stats" in self.model_kwargs or "visual_init" in self.model_kwargs:
            raise ValueError("set bn_stats / visual_init as TrainConfig fields, not as model_overrides")

    @classmethod
    def for_stage(cls, stage: int, **kwargs: Any) -> TrainConfig:
        """The paper's stage preset (lrs, warmup, augmentation) with explicit kwargs taking precedence."""
        if stage not in STAGE_PRESETS:
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        return cls(**{**STAGE_PRESETS[stage], "stage": stage, **kwargs})

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.model_overrides)

    @property
    def model_create_kwargs(self) -> dict[str, Any]:
        """What the model factory gets: the overrides plus the model-side fidelity switch (bn_stats)."""
        return {**self.model_kwargs, "bn_stats": self.bn_stats}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["model_overrides"] = [[k, v] for k, v in self.model_overrides]
        d["lr_scales"] = [[k, v] for k, v in self.lr_scales]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        refuse_released_names(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        d = dict(d)
        for key in ("model_overrides", "lr_scales"):
            if key in d:
                d[key] = tuple(tuple(kv) for kv in d[key])
        return cls(**d)

    def save_json(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------ the CPU recipe for the embedded sample
# Seconds per stage-1 step used to size the cosine schedule to the wall-clock budget (4 minutes -> 400 steps).
# Measured on the 2-core CI machine (batch 32, frozen text transformer, padding trimmed, no augmentation) for the
# 8-px grid: 0.46-0.56 alone, 0.60 inside the demo (352 steps in 240 s). The fine grid (SAMPLE_FINE_GRID) steps at
# 0.40 inside the demo (400 steps in 183 s), but 0.6 stays: 600 steps were not better on every seed (docs/demo.md,
# "Fifth session"), and the 3-seed results are for 400.
SAMPLE_STEP_SECONDS = 0.6
# The image encoder up to and including the grouping block: patch embedding, position embedding, group tokens,
# stage-1 blocks, grouping. The sample recipe trains it at 0.3x the lr, except the assignment's own projections
# (GROUPING_ASSIGNMENT: q/k/v/out of the patch-to-group attention), which train at the full lr (see sample_recipe).
GROUPING_FRONT_END = ("visual.patch_embed.", "visual.pos_embed", "visual.group_token", "visual.blocks1.",
                      "visual.grouping.")
GROUPING_ASSIGNMENT = "visual.grouping.assign."
# The `tiny` preset on a 4-px patch grid (16 x 16 patches at 64 px) at width 96 (3 heads): 4x the tokens at a quarter
# of the width's square, so a step costs about the same as the preset's 8-px grid at width 192 (measured: 0.51 vs
# 0.52 s a step, one thread each, two runs side by side). A 64-px scene's objects are 2-3 patches across on the 8-px
# grid, too coarse for their outlines and shapes (docs/demo.md, "Fifth session").
SAMPLE_FINE_GRID: tuple[tuple[str, Any], ...] = (("patch_size", 4), ("embed_dim", 96), ("num_heads", 3))
SAMPLE_RECIPE: dict[str, Any] = {
    "preset": "tiny",
    "stage": 1,
    "batch_size": 32,
    "base_lr": 2e-3,
    "warmup_lr": 2e-5,
    "min_lr": 2e-4,
    "scale_lr": False,
    "weight_decay": 0.05,
    "augment": "none",
    "max_text_len": 32,
    "val_percent": 5.0,
    "repeat_threshold": 0.1,
    # first match wins: the assignment's projections at 1x, the rest of the front end at 0.3x
    "lr_scales": ((GROUPING_ASSIGNMENT, 1.0),) + tuple((prefix, 0.3) for prefix in GROUPING_FRONT_END),
    "cache_frozen_text": True,
    "model_overrides": (("text_trainable_layers", 0), ("entity_prompt_weight", 1.0), ("unclaimed_group_weight", 1.0),
                        ("entity_logit_adjust", 1.0), ("patch_embed", "conv"),
                        ("colour_affinity_weight", 1.0)) + SAMPLE_FINE_GRID,
    "threads": 2,
    "device": "cpu",
    "log_every": 25,
    "save_every": 0,
}


def sample_recipe(build_dir: str | os.PathLike, out_dir: str | os.PathLike, minutes: float = 10.0,
                  step_seconds: float | None = None, **overrides: Any) -> TrainConfig:
    """The stage-1 CPU recipe for the `tiny` preset on the embedded sample (2 cores, minutes of wall clock).

    Status: see benchmarks/results/learning*.json (README, Benchmarks) for what 10 minutes of it reach on the
    sample's eval set against the untrained model and all-background.

    Used by benchmarks/bench_learning.py and by the demo's pretrain flow. What differs from the paper's stage 1, and
    why. The evidence was the eval set's selection split, the build's held-out val ITC and the groups used per
    image; the last two choices were developed while the eval set's val split was also being looked at, so the
    benchmark also scores a freshly rendered eval set (another seed) that no experiment saw:
      - explicit lrs (peak 2e-3, warmup 1/15 of the run from 1e-2 x peak, cosine to 0.1 x peak), not the paper's
        batch/4096 scaling, which gives ~128x smaller lrs at batch 32 and nothing learned in minutes;
      - the MiniLM text transformer is frozen (text_trainable_layers=0; its projector trains): the pretrained 6-layer
        [CLS] state already maps captions near their classes' prompts ("a photo of a dog."), and training its top
        layers at the image side's lr destroyed that (zero-shot stayed at chance); freezing also skips the text
        backward, ~35% of the step;
      - no augmentation ("none": the eval transform): the DeiT colour ops destroy the colour that tells classes
        apart, and a random resized crop (0.4-1) cut whole objects out of an image whose caption still names them,
        which made the entity targets wrong; without it the share of selection objects whose group gets the right
        class rose from 0.26 to 0.42 in equal time (one seed, docs/demo.md "Screening"; the 3-seed runs showed
        0.20-0.26);
      - frozen text => each distinct text is encoded once (cache_frozen_text, eval mode): ~2x faster steps;
      - repeat-factor sampling over the caption classes (repeat_threshold=0.1, LVIS-style): "people" is in 43% of
        the sample's captions and most classes in < 5, so without it the rare classes are almost never seen;
      - text padded to the batch's longest text (answers are ~10 tokens), captions truncated to 32 tokens;
      - the entity-prompt loss (model override entity_prompt_weight=1, not in the paper; OVSegmentor.entity_loss): with
        ~1,300 captioned images, caption contrast + MEC alone fitted the pairs (train ITC 3.4 -> 1.2) while val ITC
        stayed at chance and zero-shot mIoU equalled all-background; classifying images and groups against the
        class prompts, with the caption's entities as labels, is what made the classes learnable;
      - its unclaimed-group term (unclaimed_group_weight=1, not in the paper; losses.unclaimed_group_loss): groups
        that no caption entity claims are pushed to a flat class distribution. Without it background groups took
        confident classes (selection background IoU 0.56) because the image embedding, the mean of all groups,
        is trained towards the caption; with it 0.72, and selection mIoU 0.091 -> 0.161 in equal time (one seed);
      - the grouping front end (GROUPING_FRONT_END) at 0.3x the lr: at full lr the patch-to-group assignment, which
        sorts objects apart at initialisation (~6.6 groups used per selection image), collapsed into one or two
        groups covering everything, and nothing could be segmented; frozen (0x), the features did not learn (val
        ITC at chance); in 4-minute runs 0.1x kept ~2.9 groups (selection mIoU 0.099) and 0.3x ~3.5 (0.131);
      - but the assignment's own projections (GROUPING_ASSIGNMENT) at the full lr: with them at 0.3x the grouping never
        left its random init (grouping oracle of trained vs untrained model equal, docs/demo.md "Third session");
        at 1x it learns (one seed, selection split: oracle 0.27 -> 0.50, objects classified right 0.17 -> 0.58,
        mIoU 0.108 -> 0.216).
      - a finer patch grid at a smaller width (SAMPLE_FINE_GRID: patch 4, width 96, 3 heads; the preset's 8-px grid
        at width 192 otherwise): at equal step cost, over four seeds each, selection mIoU 0.189-0.214 (mean 0.202)
        against the 8-px grid's 0.079-0.265 (mean 0.187): about the same mean, a quarter of the spread, and a finer
        grouping (docs/demo.md, "Fifth session").
      - logit adjustment of the entity-prompt loss (entity_logit_adjust=1, not in the paper): the model underfits
        rather than memorises (new training-style renders score like the training images), most of all the rare
        classes, and 17 of the 22 scored classes have 15-44 training images against people's 577. Scoring the loss
        on logits + log(entity frequency) lets the plain logits fit classes met evenly: 3 seeds, 400 steps, test
        split +0.040 / +0.013 / +0.006, a fresh render +0.087 / +0.019 / -0.027 (docs/demo.md, "Sixth session").
      - a convolutional stem (patch_embed="conv", Xiao et al. NeurIPS'21; this model lacks the paper's DINO patch
        features): tokens see their neighbourhood, where shape and texture are, at about the same step cost
        (3 seeds: test split and a fresh render +0.009 on average; docs/demo.md, "Seventh session");
      - a colour-affinity grouping prior (colour_affinity_weight=1, not in the paper; losses.colour_affinity_loss):
        the groups were 35-45% object; neighbouring patches of one colour now share a group, an edge splits them
        (selection split: purity 0.48-0.57; scored, 3 seeds: no measurable mIoU change, docs/demo.md "Ninth session").
    Length: `minutes` of wall clock: steps = minutes * 60 / step_seconds (default SAMPLE_STEP_SECONDS, or a probe's
    measurement) so that the cosine completes, with `time_limit_s` = minutes * 60 as a hard stop.

    Args:
        build_dir: the sample build (shards/, meta/, index/).
        out_dir: run folder.
        minutes: wall-clock training budget.
        step_seconds: seconds per step to plan with (None: SAMPLE_STEP_SECONDS).
        **overrides: any TrainConfig field (e.g. steps=..., seed=..., eval_every=...); they win over the recipe.
    """
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    step_s = SAMPLE_STEP_SECONDS if step_seconds is None else float(step_seconds)
    if step_s <= 0:
        raise ValueError(f"step_seconds must be positive, got {step_s}")
    budget = minutes * 60.0
    steps = max(10, int(budget / step_s))
    kwargs: dict[str, Any] = {**SAMPLE_RECIPE, "build_dir": str(build_dir), "out_dir": str(out_dir), "steps": steps,
                              "warmup_steps": max(1, steps // 15), "time_limit_s": budget}
    if "epochs" in overrides:
        kwargs.pop("steps")
    kwargs.update(overrides)
    return TrainConfig(**kwargs)
