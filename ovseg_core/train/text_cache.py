"""Cache the token states of a FROZEN text encoder, so each distinct text is encoded once per run.

With the text transformer frozen (text_trainable_layers=0, as in the sample's CPU recipe) the three text passes of a
training step (caption, masked question, answer) cost ~2/3 of the step on CPU, yet the same captions and questions
come back every epoch. The cache computes misses in eval mode (no dropout: the frozen encoder is a fixed feature
extractor, as in stage 2, where OVSegmentor freezes the text encoder and keeps it in eval mode) and returns exactly
what the uncached eval-mode forward returns (padding positions are zero; every consumer masks them).

The cache patches the instance's `forward` (no new submodule), so state dicts and checkpoints are unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn


def is_frozen(text_encoder: nn.Module) -> bool:
    return not any(p.requires_grad for p in text_encoder.parameters())


class FrozenTextCache:
    """LRU cache {token ids of one text: (length, width) states} in front of `text_encoder.forward`.

    Args:
        text_encoder: the model's TextEncoder (forward(input_ids, attention_mask) -> (B, L, width)); must be frozen.
        max_entries: LRU capacity (distinct texts); the sample build needs ~3 x its sample count plus answers.
    """

    def __init__(self, text_encoder: nn.Module, max_entries: int = 200_000) -> None:
        if not is_frozen(text_encoder):
            raise ValueError("FrozenTextCache needs a frozen text encoder (no parameter requires grad)")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.text_encoder = text_encoder
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._uncached = text_encoder.forward

    def install(self) -> FrozenTextCache:
        self.text_encoder.forward = self.forward  # instance attribute: nn.Module.__call__ calls it
        return self

    def uninstall(self) -> None:
        if self.text_encoder.__dict__.get("forward") == self.forward:
            del self.text_encoder.forward

    @torch.no_grad()
    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inner = getattr(self.text_encoder, "model", self.text_encoder)
        was_training = inner.training
        inner.eval()
        try:
            return self._uncached(input_ids, attention_mask)
        finally:
            inner.train(was_training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(dim=1).tolist()
        ids_cpu = input_ids.detach().to("cpu")
        keys = [ids_cpu[i, : int(n)].numpy().tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            states = self._encode(input_ids[rows], attention_mask[rows])
            for j, i in enumerate(missing):
                self.entries[keys[i]] = states[j, : int(lengths[i])].detach().clone()
                while len(self.entries) > self.max_entries:
                    self.entries.popitem(last=False)
        first = self.entries.get(keys[0])
        width = first.shape[-1] if first is not None else int(self.text_encoder.width)
        dtype = first.dtype if first is not None else torch.float32
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1], width, dtype=dtype, device=input_ids.device)
        for i, key in enumerate(keys):
            states = self.entries.get(key)
            if states is None:  # evicted within this very batch (tiny max_entries): recompute this row
                states = self._encode(input_ids[i : i + 1], attention_mask[i : i + 1])[0, : int(lengths[i])]
            else:
                self.entries.move_to_end(key)
            out[i, : states.shape[0]] = states
        return out

    def stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"text_cache_hits": self.hits, "text_cache_misses": self.misses, "text_cache_entries": len(self.entries),
                "text_cache_hit_rate": round(self.hits / total, 4) if total else None}
