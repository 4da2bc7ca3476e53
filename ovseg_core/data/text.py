"""Text inputs of one sample: caption tokens, the masked-entity question, the entity answer and the shared-class prompt.

The question replaces every entity word of the caption by exactly ONE mask token. Which characters are entity words is
decided by curation (`entity_words` with character offsets, caption[start:end] == word); we never re-derive it from the
text. The original code stripped characters with `word.strip("'s")` (bus -> bu, glass -> gla, sheep -> heep, sofa -> ofa)
and missed words followed by a comma; working on character offsets and the fast tokenizer's offset mapping avoids both:
every token whose character range overlaps an entity span is dropped, and one mask token stands for the whole span,
however many word pieces it had.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# OpenAI CLIP's 80 ImageNet prompt templates (the list OVSegmentor draws answer prefixes from).
CLIP_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
# The answer is "<prefix> <classes>": the text before "{}" (templates starting with "{}" give an empty prefix).
TEMPLATE_PREFIXES: tuple[str, ...] = tuple(t.split("{}")[0].strip() for t in CLIP_TEMPLATES)
SHARED_CLASS_TEMPLATE = "a photo of a {}."


def entity_spans(caption: str, entity_words: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """Sorted, merged (start, end) character spans of the entity words; raises if an offset does not match its word."""
    spans = []
    for ew in entity_words:
        start, end, word = int(ew["start"]), int(ew["end"]), str(ew["word"])
        if not (0 <= start < end <= len(caption)) or caption[start:end] != word:
            raise ValueError(
                f"entity word {word!r} does not match caption[{start}:{end}]={caption[start:end]!r} in {caption!r}"
            )
        spans.append((start, end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:  # overlapping spans (should not happen) become one span, hence one mask
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _pad(ids: list[int], max_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(ids)
    out = torch.full((max_len,), pad_id, dtype=torch.long)
    out[:n] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(max_len, dtype=torch.long)
    mask[:n] = 1
    return out, mask


def _encode_with_spans(
    text: str, tokenizer: Any, max_len: int, spans: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids of `text` with every span collapsed to one mask token, truncated to max_len (specials kept), padded.

    Returns (ids, attention_mask, number of masks in the output).
    """
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError("build_mec_inputs needs a fast tokenizer (offset mapping)")
    if max_len < tokenizer.num_special_tokens_to_add() + 1:
        raise ValueError(f"max_len={max_len} leaves no room for text")
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    # Specials sit only at the ends for BERT/RoBERTa-style single sequences.
    lead = 0
    while lead < len(ids) and special[lead]:
        lead += 1
    trail = len(ids)
    while trail > lead and special[trail - 1]:
        trail -= 1
    content: list[int] = []
    masked_span_of_last: int | None = None
    n_masks_at: list[int] = []  # positions (in content) of mask tokens
    span_idx = 0
    for tok_id, (cs, ce) in zip(ids[lead:trail], offsets[lead:trail]):
        while span_idx < len(spans) and spans[span_idx][1] <= cs:
            span_idx += 1
        overlap = span_idx < len(spans) and cs < spans[span_idx][1] and ce > spans[span_idx][0]
        if overlap:
            if masked_span_of_last != span_idx:  # first piece of this span: one mask for all its pieces
                n_masks_at.append(len(content))
                content.append(tokenizer.mask_token_id)
                masked_span_of_last = span_idx
            continue
        masked_span_of_last = None
        content.append(tok_id)
    room = max_len - lead - (len(ids) - trail)
    content = content[:room]
    out_ids = ids[:lead] + content + ids[trail:]
    tensor_ids, tensor_mask = _pad(out_ids, max_len, tokenizer.pad_token_id)
    return tensor_ids, tensor_mask, sum(1 for p in n_masks_at if p < room)


def tokenize(text: str, tokenizer: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (max_len,), truncated with the closing special token kept, right-padded."""
    ids, mask, _ = _encode_with_spans(text, tokenizer, max_len, ())
    return ids, mask


def answer_text(entities: Sequence[str], rng: random.Random, templates_prefixes: Sequence[str] = TEMPLATE_PREFIXES) -> str:
    """'<random template prefix> <class> and <class>' over the sorted unique classes (prefix alone when none)."""
    prefix = rng.choice(list(templates_prefixes))
    classes = " and ".join(sorted(set(entities)))
    return " ".join(part for part in (prefix, classes) if part)


def question_text(caption: str, entity_words: Sequence[Mapping[str, Any]], mask_token: str = "[MASK]") -> str:
    """Human-readable question (for logs/debugging): the caption with each entity span replaced by one mask token."""
    out, last = [], 0
    for start, end in entity_spans(caption, entity_words):
        out.append(caption[last:start])
        out.append(mask_token)
        last = end
    out.append(caption[last:])
    return "".join(out)


def build_mec_inputs(
    caption: str,
    entity_words: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_len: int,
    rng: random.Random | None = None,
    entities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Caption, question and answer tensors of one sample (the text part of the training batch).

    Args:
        caption: the caption exactly as curation stored it (offsets index into it).
        entity_words: [{"word", "class", "start", "end"}] from curation; caption[start:end] must equal word.
        tokenizer: the text encoder's fast HF tokenizer.
        max_len: padded length of every text tensor.
        rng: picks the answer's template prefix (seed it for reproducibility); default Random(0).
        entities: classes for the answer; default: the classes of entity_words.

    Returns:
        dict with input_ids/attention_mask (caption), question_ids/question_mask, answer_ids/answer_mask (each a
        (max_len,) long tensor), has_entity (bool), num_masks (int), answer (str).
    """
    rng = rng or random.Random(0)
    spans = entity_spans(caption, entity_words)
    classes = list(entities) if entities is not None else [str(ew["class"]) for ew in entity_words]
    input_ids, attention_mask = tokenize(caption, tokenizer, max_len)
    question_ids, question_mask, num_masks = _encode_with_spans(caption, tokenizer, max_len, spans)
    answer = answer_text(classes, rng)
    answer_ids, answer_mask = tokenize(answer, tokenizer, max_len)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "question_ids": question_ids,
        "question_mask": question_mask,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "has_entity": bool(classes) and bool(spans),
        "num_masks": num_masks,
        "answer": answer,
    }


def build_shared_inputs(shared_class: str | None, tokenizer: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """'a photo of a {shared_class}.' for the stage-2 partner (an all-padding prompt when there is no partner)."""
    return tokenize(SHARED_CLASS_TEMPLATE.format(shared_class or ""), tokenizer, max_len)
