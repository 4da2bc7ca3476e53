"""Zero-shot text classifier: class names x prompt templates -> one L2-normalised text embedding per class."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_core.zero_shot.templates import validate_templates


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and restore its previous mode afterwards.

    Restoring matters because the trainer may evaluate mid-training: leaving the model in eval mode would silently
    switch off dropout/drop-path and the hard (straight-through) group assignment for the rest of the run.
    A model already in eval mode (``model.training`` False, as ``model.eval()`` leaves it) is left alone: switching
    walks every module, which cost 40% of a selection sweep that calls this per image.
    """
    if not model.training:
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def build_zero_shot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
) -> Tensor:
    """Text embeddings of every class, averaged over prompt templates (open_clip style).

    Each prompt ``template.format(classname)`` is embedded with ``model.encode_text_strings`` and L2-normalised, the
    embeddings of one class are averaged over templates and the mean is renormalised, so each row is a unit vector.
    No class is treated specially: callers that threshold background (``ZeroShotSegmenter``) must pass only the
    foreground classes.

    Args:
        model: anything with ``encode_text_strings(list[str]) -> (N, D)`` (OVSegmentor).
        classnames: K class names.
        templates: T templates, each with exactly one ``{}``.
        batch_size: prompts per ``encode_text_strings`` call (bounds memory for 80 templates x 150 classes).

    Returns:
        (K, D) float tensor on the model's output device, rows L2-normalised.
    """
    templates = validate_templates(templates)
    classnames = list(classnames)
    if not classnames:
        raise ValueError("at least one class name is required")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [template.format(name) for name in classnames for template in templates]
    chunks = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            emb = model.encode_text_strings(prompts[start : start + batch_size])
            chunks.append(F.normalize(emb.float(), dim=-1))
    per_prompt = torch.cat(chunks).reshape(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
