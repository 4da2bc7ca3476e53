"""OVSegmentor (Xu et al., "Learning Open-vocabulary Semantic Segmentation Models From Natural Language
Supervision", CVPR'23, arXiv:2301.09121): GroupViT image encoder + BERT-family text encoder trained with
image-text contrast (ITC), masked entity completion (MEC) and, in stage 2, cross-image mask consistency.

Layout (timm style): MECHead -> OVSegmentor (encode_image / encode_text / forward_train) -> registered presets.

Deviations from the released code (Jazzcharles/OVSegmentor), all deliberate fixes:
- MEC head: padded question words are masked as keys of the word self-attention (the release ignored the mask).
  The cross-attention keys are the G groups, which have no padding.
- Contrastive rows whose caption has no entity (has_entity=False) are excluded from the MEC loss.
- Mask loss: averaged over the valid rows of all ranks (the release summed over each GPU's batch and divided by G,
  so cfg.mask_weight = 1.6 reproduces its effective weight at 128 rows per GPU); rows without a partner
  (partner_valid=False) are excluded; the EMA teacher runs in eval mode (no drop-path noise in targets)
  and only up to the grouping block, which is all the loss reads.
- M1 and M2 are both scaled by 1/sqrt(C) (as the release's project_and_mask does for both).
- Least related groups (stage 2): ranked by the cosine between each group's projected embedding (image projector
  with its running BatchNorm statistics, as at inference) and the frozen text embedding of "a photo of a
  {entity}."; the release ranks them with another computation (found by the issue-11 parity check). Only which
  groups get detached depends on it.
- Gumbel noise, its softmax and arg-max run in float32 even under bf16 autocast (ovseg_core/layers/grouping.py).

One addition, off in every preset (cfg.entity_prompt_weight = 0 is the paper's objective): the entity-prompt loss
(`entity_loss`) classifies the image embedding, and per class its best-matching group, among the prompts
"a photo of a {class}." of the whole vocabulary, with the caption's entities as targets. The labels are still the
captions' (curation's parse, the same ones MEC's answers use). The CPU recipe for the embedded sample turns it on:
with ~1,300 captioned images, caption contrast alone fits the pairs without learning what the classes look like
(benchmarks/results/learning.json).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from manifests.vocabulary import load_vocabulary
from ovseg_core.batch import ENTITY_TARGETS_KEY, STAGE1_KEYS, STAGE2_KEYS
from ovseg_core.config import MINILM_TEXT_MODEL, OVSegConfig
from ovseg_core.layers.attention import CrossAttnBlock, key_padding_to_attn_mask
from ovseg_core.layers.grouping import resize_assignment, upsample_masks
from ovseg_core.layers.mlp import ProjectionHead, batchnorm_frozen
from ovseg_core.losses import (
    colour_affinity_loss,
    contrastive_loss,
    gather_with_grad,
    mask_consistency_loss,
    soft_target_cross_entropy,
    soft_target_nll,
    unclaimed_group_loss,
)
from ovseg_core.models._registry import register_model
from ovseg_core.models.group_vit import GroupViT, VisionFeatures, load_timm_vit_checkpoint
from ovseg_core.models.text import TextEncoder

# The zero-shot classifier's single segmentation prompt: the entity-prompt loss trains exactly what inference scores.
ENTITY_PROMPT = "a photo of a {}."


@dataclass
class ImageOutput:
    """Result of `OVSegmentor.encode_image`.

    Attributes:
        image_emb: (B, D) L2-normalised image embedding (projected mean of the groups).
        group_emb: (B, G, D) L2-normalised projected group embeddings.
        assign: (B, G, h, w) assignment of patches to groups, sums to 1 over G (hard straight-through in training
            mode, soft in eval mode).
    """

    image_emb: torch.Tensor
    group_emb: torch.Tensor
    assign: torch.Tensor


class MECHead(nn.Module):
    """Masked-entity-completion head (the release's MultimodalGroupingNetwork, one layer).

    LN(question token states) and LN(unprojected groups) -> cross-attention, words query groups (post-norm block)
    -> word self-attention with padded words masked, + residual -> LN -> position 0 -> bridge projector.

    Args:
        image_width: width of the group tokens.
        text_width: width of the text token states.
        out_dim: shared embedding dimension D.
        hidden_dim: bridge projector hidden width.
        num_heads: attention heads (paper: 8).
    """

    def __init__(self, image_width: int, text_width: int, out_dim: int, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        dim = min(image_width, text_width)
        if dim % num_heads:
            raise ValueError(f"MEC width {dim} is not divisible by mec_heads {num_heads}")
        # The release maps the wider modality down to the narrower one (align_proj_img / align_proj_text).
        self.align_img = nn.Linear(image_width, dim) if image_width != dim else nn.Identity()
        self.align_text = nn.Linear(text_width, dim) if text_width != dim else nn.Identity()
        self.norm_text = nn.LayerNorm(dim)
        self.norm_groups = nn.LayerNorm(dim)
        self.cross_attn = CrossAttnBlock(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, post_norm=True)
        self.self_attn = Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True)
        self.norm_out = nn.LayerNorm(dim)
        self.bridge = ProjectionHead(dim, hidden_dim, out_dim)

    def forward(self, groups: torch.Tensor, question_states: torch.Tensor,
                question_mask: torch.Tensor) -> torch.Tensor:
        """groups (B, G, Cv), question_states (B, L, Ct), question_mask (B, L) 1 = real -> (B, D) unnormalised."""
        words = self.norm_text(self.align_text(question_states))
        groups = self.norm_groups(self.align_img(groups))
        words = self.cross_attn(words, groups)
        words = self.self_attn(words, attn_mask=key_padding_to_attn_mask(question_mask)) + words
        return self.bridge(self.norm_out(words)[:, 0])


class OVSegmentor(nn.Module):
    """GroupViT + BERT-family text encoder with ITC, MEC and cross-image mask losses.

    Args:
        cfg: the model configuration (see OVSegConfig; build presets with `ovseg_core.create_model`).
    """

    def __init__(self, cfg: OVSegConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = GroupViT(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                               depths=cfg.depths, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                               num_group_tokens=cfg.num_group_tokens, num_groups=cfg.num_groups,
                               drop_path_rate=cfg.drop_path_rate, patch_norm=cfg.patch_norm,
                               gumbel_tau=cfg.gumbel_tau, gumbel_noise=cfg.gumbel_noise, assign_eps=cfg.assign_eps,
                               eval_hard_pooling=cfg.eval_hard_pooling, patch_embed=cfg.patch_embed)
        self.text = TextEncoder(cfg.text_model, pretrained=cfg.text_pretrained,
                                trainable_layers=cfg.text_trainable_layers, num_layers=cfg.text_num_layers)
        self.image_proj = ProjectionHead(cfg.embed_dim, cfg.proj_hidden_dim, cfg.embed_dim_out)
        self.text_proj = ProjectionHead(self.text.width, cfg.proj_hidden_dim, cfg.embed_dim_out)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.contrast_temperature)))
        self.mec_head = MECHead(cfg.embed_dim, self.text.width, cfg.embed_dim_out, cfg.proj_hidden_dim,
                                cfg.mec_heads)
        self.visual_teacher: GroupViT | None = None
        # Prompts of the entity-prompt loss (cfg.entity_prompt_weight > 0): tokenised once, kept out of checkpoints.
        self.entity_classes: tuple[str, ...] = ()
        if cfg.entity_prompt_weight > 0:
            self.entity_classes = tuple(load_vocabulary(cfg.entity_vocabulary).classes)
            prompts = self.tokenize([ENTITY_PROMPT.format(c) for c in self.entity_classes])
            self.register_buffer("entity_prompt_ids", prompts["input_ids"], persistent=False)
            self.register_buffer("entity_prompt_mask", prompts["attention_mask"], persistent=False)
            # Entity counts seen in training (logit adjustment, cfg.entity_logit_adjust). Saved with the weights, so
            # a resumed run or stage 2 goes on with the prior it had instead of re-counting from a few batches.
            self.register_buffer("entity_seen", torch.zeros(len(self.entity_classes), dtype=torch.float64))
            self.register_load_state_dict_pre_hook(_zero_missing_entity_counts)
        self.visual_init_report: dict[str, list[str]] | None = None
        if cfg.visual_init is not None:
            self.visual_init_report = load_timm_vit_checkpoint(self.visual, cfg.visual_init)

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def num_groups(self) -> int:
        return self.cfg.num_groups

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim_out

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at cfg.logit_scale_max (the value multiplying cosine similarities)."""
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)

    # ------------------------------------------------------------------------------------------------- encoders
    def _encode_image(self, images: torch.Tensor) -> tuple[ImageOutput, VisionFeatures]:
        feats = self.visual.forward_features(images)
        image_emb = F.normalize(self.image_proj(feats.groups.mean(dim=1)), dim=-1)
        # Only the pooled image feature may update the projector's BatchNorm statistics (as in GroupViT): per-group
        # features have other statistics, and mixing them in left the running stats fit for neither, which bunched
        # eval-mode embeddings together. Group embeddings always use the running statistics, as at inference. In
        # training they need a gradient only for the entity-prompt loss; the mask loss just ranks them.
        # bn_stats="release": the released code projects the groups in training mode, so their batch statistics
        # normalise them and update the running statistics (the fidelity switch; see OVSegConfig.bn_stats).
        group_grad = torch.is_grad_enabled() and (not self.training or self.cfg.entity_prompt_weight > 0)
        frozen = batchnorm_frozen(self.image_proj) if self.cfg.bn_stats == "pooled" else contextlib.nullcontext()
        with torch.set_grad_enabled(group_grad), frozen:
            group_emb = F.normalize(self.image_proj(feats.groups), dim=-1)
        assign = feats.grouping.assign if self.training else feats.grouping.soft_assign
        return ImageOutput(image_emb, group_emb, resize_assignment(assign, feats.grid)), feats

    def encode_image(self, images: torch.Tensor) -> ImageOutput:
        """images (B, 3, H, W), normalised, H and W multiples of the patch size -> ImageOutput."""
        return self._encode_image(images)[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids + mask -> (B, D) L2-normalised embedding of the [CLS] state."""
        states = self.text(input_ids, attention_mask)
        if self.cfg.bn_stats == "release" and self.training:
            # the release projects every token state (its BatchNorm sees all B x L of them), then takes [CLS]
            return F.normalize(self.text_proj(states)[:, 0], dim=-1)
        return F.normalize(self.text_proj(states[:, 0]), dim=-1)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize with the model's tokenizer: pad to the longest text, truncate to cfg.text_max_length."""
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=max_length or self.cfg.text_max_length, return_tensors="pt")

    def encode_text_strings(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, D) L2-normalised embeddings (zero-shot classifiers). Call in eval mode (BatchNorm)."""
        if isinstance(texts, str):
            raise TypeError("encode_text_strings expects a list of strings, got a single str")
        if len(texts) == 0:
            return torch.empty(0, self.cfg.embed_dim_out, device=self.logit_scale.device)
        device = self.logit_scale.device
        out = []
        for start in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[start:start + batch_size])
            out.append(self.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)))
        return torch.cat(out)

    def forward(self, batch: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
        """Same as `forward_train`: DistributedDataParallel only synchronises gradients of calls that go through
        `forward`, so the trainer calls `ddp_model(batch, stage)`."""
        return self.forward_train(batch, stage)

    # ----------------------------------------------------------------------------------------- stage-2 helpers
    def freeze_text_encoder(self, mode: str = "eval") -> None:
        """Stage 2: freeze the text transformer; the text projector keeps training. mode "eval" (ours) keeps it in
        eval mode (no dropout); "train" keeps it in training mode with dropout on, as the release does."""
        self.text.freeze(mode)

    def init_momentum_teacher(self) -> None:
        """Create the EMA teacher of the image encoder as a copy of the current (stage-1) image encoder."""
        teacher = copy.deepcopy(self.visual)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.visual_teacher = teacher.eval()

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """teacher = m * teacher + (1 - m) * online, for every parameter; buffers are copied."""
        if self.visual_teacher is None:
            raise RuntimeError("momentum_update() before init_momentum_teacher()")
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {m}")
        for t, s in zip(self.visual_teacher.parameters(), self.visual.parameters(), strict=True):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        for t, s in zip(self.visual_teacher.buffers(), self.visual.buffers(), strict=True):
            t.copy_(s)

    def train(self, mode: bool = True) -> OVSegmentor:
        super().train(mode)
        if self.visual_teacher is not None:
            self.visual_teacher.eval()  # targets without drop-path/Gumbel noise
        return self

    # ------------------------------------------------------------------------------------------------- training
    def forward_train(self, batch: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
        """Losses for one batch (keys: see the contract; stage 2 also needs the partner keys).

        Returns:
            {"loss": total, "itc": ..., "mec": ..., "mask": ... (0 in stage 1)}; stage 1 total = itc + mec_weight
            * mec; stage 2 total = itc + mec_weight * mec + mask_weight * mask.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        needed = STAGE1_KEYS + (STAGE2_KEYS if stage == 2 else ()) + (
            (ENTITY_TARGETS_KEY,) if self.cfg.entity_prompt_weight > 0 else ())
        missing = [k for k in needed if k not in batch]
        if missing:
            raise KeyError(f"forward_train(stage={stage}) batch is missing {missing}")
        scale = self.scale()
        image_out, feats = self._encode_image(batch["image"])
        text_emb = self.encode_text(batch["input_ids"], batch["attention_mask"])
        itc = contrastive_loss(image_out.image_emb, text_emb, scale)

        question_states = self.text(batch["question_ids"], batch["question_mask"])
        answer_emb = self.encode_text(batch["answer_ids"], batch["answer_mask"])
        mec_emb = F.normalize(self.mec_head(feats.groups, question_states, batch["question_mask"]), dim=-1)
        mec = contrastive_loss(mec_emb, answer_emb, scale, valid=batch["has_entity"])

        total = itc + self.cfg.mec_weight * mec
        out = {}
        if self.cfg.entity_prompt_weight > 0:
            out["entity"] = self.entity_loss(image_out, batch["entity_targets"], scale)
            total = total + self.cfg.entity_prompt_weight * out["entity"]
        if self.cfg.colour_affinity_weight > 0:
            out["affinity"] = colour_affinity_loss(resize_assignment(feats.grouping.soft_assign, feats.grid),
                                                   batch["image"], self.cfg.colour_affinity_sigma)
            total = total + self.cfg.colour_affinity_weight * out["affinity"]
        if stage == 2:
            mask = self.cross_image_mask_loss(batch, feats, image_out)
            total = total + self.cfg.mask_weight * mask
        else:
            mask = torch.zeros((), device=itc.device)
        return {"loss": total, "itc": itc, "mec": mec, "mask": mask, **out}

    def entity_loss(self, image_out: ImageOutput, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Entity-prompt loss over the prompts of all `entity_classes`, the caption's entities (B, V multi-hot
        `targets`) as labels; rows without an entity are left out. Mean of two terms:

        - image: the image embedding classified among all prompts, the entities as soft targets (GroupViT's
          multi-label idea, with the whole vocabulary as negatives instead of the batch); this ranks the
          image-level top-k at inference;
        - groups (multiple instance): for each caption entity, the group most sure of it, sure by the group's own
          softmax over the classes, which is what zero-shot segmentation reads. One group covering two objects can
          give each at most half its probability, so the term favours one group per entity. (It does not stop the
          assignment from collapsing by itself: the sample recipe's lower front-end lr does that.)

        The group embeddings are `image_out.group_emb`: projected with the running BatchNorm statistics, as at
        inference (the pooled embedding alone updates them, see `_encode_image`).

        With cfg.entity_logit_adjust = tau > 0, both terms score logits + tau * log(prior), the prior being the
        entity frequencies counted so far in training (`_entity_log_prior`): logit adjustment, so that the scores
        inference reads (unadjusted) are fit for classes met evenly rather than as skewed as the captions. Which
        group is a class's most sure one is still decided by the unadjusted scores, and the unclaimed-group term
        reads them too (it flattens what inference thresholds).
        """
        if targets.shape[-1] != len(self.entity_classes):
            raise ValueError(f"entity_targets has {targets.shape[-1]} classes, the model scores "
                             f"{len(self.entity_classes)} ({self.cfg.entity_vocabulary})")
        with batchnorm_frozen(self.text_proj):
            prompts = F.normalize(self.text_proj(self.text(self.entity_prompt_ids, self.entity_prompt_mask)[:, 0]),
                                  dim=-1)  # (V, D)
        tau = self.cfg.entity_logit_adjust
        adjust = tau * self._entity_log_prior(targets) if tau else 0.0
        image_term = soft_target_cross_entropy(scale * image_out.image_emb @ prompts.t() + adjust, targets)
        group_logits = scale * image_out.group_emb @ prompts.t()  # (B, G, V)
        group_log_probs = F.log_softmax(group_logits, dim=-1)
        adjusted = F.log_softmax(group_logits + adjust, dim=-1) if tau else group_log_probs
        # the most sure group per class is chosen by the unadjusted scores, the ones zero-shot reads
        best = group_log_probs.argmax(dim=1, keepdim=True)  # (B, 1, V)
        loss = 0.5 * (image_term + soft_target_nll(adjusted.gather(1, best).squeeze(1), targets))
        if self.cfg.unclaimed_group_weight > 0:
            loss = loss + self.cfg.unclaimed_group_weight * unclaimed_group_loss(group_log_probs, targets)
        return loss

    def _entity_log_prior(self, targets: torch.Tensor) -> torch.Tensor:
        """log of the entity frequencies seen so far in training (+1 smoothing), counting this batch; (V,)."""
        if self.training:
            with torch.no_grad():
                self.entity_seen += gather_with_grad(targets.detach().to(self.entity_seen.dtype)).sum(dim=0)
        seen = self.entity_seen + 1.0
        return (seen / seen.sum()).log().to(targets.dtype)

    def cross_image_masks(self, feats: VisionFeatures, partner_image: torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """M1 = q_online(x) k_teacher(y)^T / sqrt(C) and M2 = q_teacher(y) k_teacher(y)^T / sqrt(C), (B, G, h, w).

        q/k are the AssignAttention projections of the first (only) grouping block: q = projected group tokens,
        k = projected layer-normed patch tokens (see ovseg_core/layers/grouping.py).
        """
        if self.visual_teacher is None:
            raise RuntimeError("stage-2 training needs the EMA teacher: call init_momentum_teacher() first")
        with torch.no_grad():
            teacher, grid_y = self.visual_teacher.forward_grouping(partner_image)
        inv_sqrt = self.cfg.embed_dim ** -0.5
        m1 = feats.grouping.q @ teacher.k.transpose(1, 2) * inv_sqrt
        m2 = (teacher.q @ teacher.k.transpose(1, 2) * inv_sqrt).detach()
        return resize_assignment(m1, grid_y), resize_assignment(m2, grid_y)

    def cross_image_mask_loss(self, batch: dict[str, torch.Tensor], feats: VisionFeatures,
                              image_out: ImageOutput) -> torch.Tensor:
        m1, m2 = self.cross_image_masks(feats, batch["partner_image"])
        num_detached = int(self.cfg.num_groups * self.cfg.group_ratio)
        if num_detached > 0:
            with torch.no_grad():
                shared = self.encode_text(batch["shared_ids"], batch["shared_mask"])
                relevance = (image_out.group_emb * shared[:, None, :]).sum(-1)  # (B, G)
                least = relevance.topk(num_detached, dim=1, largest=False).indices
                detach = torch.zeros_like(relevance, dtype=torch.bool).scatter_(1, least, True)
            # The groups of x unrelated to the shared entity should not be pulled towards the partner's masks.
            m1 = torch.where(detach[:, :, None, None], m1.detach(), m1)
        size = tuple(batch["partner_image"].shape[-2:])
        m1, m2 = upsample_masks(m1, size), upsample_masks(m2, size)
        return mask_consistency_loss(m1, m2, self.cfg.cross_threshold, valid=batch["partner_valid"])


def _zero_missing_entity_counts(module: OVSegmentor, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: checkpoints from before the entity counts were saved load with no counts."""
    key = prefix + "entity_seen"
    if key not in state_dict:
        state_dict[key] = torch.zeros_like(module.entity_seen)


# -------------------------------------------------------------------------------------------------------- presets
@register_model
def tiny() -> OVSegConfig:
    """CPU-sized: 64 px, patch 8 (8x8 grid), width 192, 2+2 blocks, 32 group tokens -> 8 groups; text = the bundled
    MiniLM-L6 with only its top 2 layers trained (text_num_layers=3 cuts a further ~25% of the step time)."""
    return OVSegConfig(name="tiny", image_size=64, patch_size=8, embed_dim=192, depths=(2, 2), num_heads=4,
                       num_group_tokens=32, num_groups=8, drop_path_rate=0.0, embed_dim_out=128,
                       proj_hidden_dim=256, text_model=MINILM_TEXT_MODEL, text_trainable_layers=2,
                       text_max_length=32, mec_heads=4)


@register_model
def vit_s() -> OVSegConfig:
    """ViT-S/16 GroupViT (384, 6+6 blocks, 6 heads, 224 px, 64 -> 8 groups) with the bundled MiniLM-L6 text."""
    return OVSegConfig(name="vit_s", image_size=224, patch_size=16, embed_dim=384, depths=(6, 6), num_heads=6,
                       num_group_tokens=64, num_groups=8, drop_path_rate=0.1, patch_norm=False, embed_dim_out=256,
                       proj_hidden_dim=4096, text_model=MINILM_TEXT_MODEL)


@register_model
def vit_b() -> OVSegConfig:
    """The paper's model: ViT-B/16 GroupViT (768, 6+6 blocks, 8 heads as in its config) + bert-base-uncased.

    patch_norm=False as in OVSegmentor's config: it initialises from DINO ViT-B/16 (`visual_init`), which has no
    norm after the patch embedding. vit_s likewise (DINO ViT-S/16).

    bert-base-uncased is never downloaded: pass text_model=<local folder> (or have it in the local HF cache).
    """
    return OVSegConfig(name="vit_b", image_size=224, patch_size=16, embed_dim=768, depths=(6, 6), num_heads=8,
                       num_group_tokens=64, num_groups=8, drop_path_rate=0.1, patch_norm=False, embed_dim_out=256,
                       proj_hidden_dim=4096, text_model="bert-base-uncased")
