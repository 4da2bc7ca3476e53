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
from dataclasses import dataclass
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


def _check_tokenizer(tokenizer: Any, max_len: int) -> None:
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError("build_mec_inputs needs a fast tokenizer (offset mapping)")
    if max_len < tokenizer.num_special_tokens_to_add() + 1:
        raise ValueError(f"max_len={max_len} leaves no room for text")


def _encode_many(texts: Sequence[str], tokenizer: Any) -> list[tuple[list[int], list, list[int]]]:
    """(ids, offsets, special mask) of each text, from ONE tokenizer call (the fast tokenizer batches in Rust)."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True))


def _collapse_spans(encoding: tuple[list[int], list, list[int]], tokenizer: Any, max_len: int,
                    spans: Sequence[tuple[int, int]]) -> tuple[list[int], int]:
    """Token ids of one encoding with every span collapsed to one mask token, truncated to max_len (specials kept).

    Returns (ids, number of masks in the output).
    """
    ids, offsets, special = encoding
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
    return list(ids[:lead]) + content[:room] + list(ids[trail:]), sum(1 for p in n_masks_at if p < room)


def _pad_rows(rows: Sequence[list[int]], max_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows to (N, max_len) ids and attention mask, built as two tensors in one go."""
    ids = torch.tensor([row + [pad_id] * (max_len - len(row)) for row in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (max_len - len(row)) for row in rows], dtype=torch.long)
    return ids.reshape(len(rows), max_len), mask.reshape(len(rows), max_len)


def tokenize_many(texts: Sequence[str], tokenizer: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, max_len) ids and mask of N texts from one tokenizer call: truncated with the closing special token
    kept, right-padded (row i equals `tokenize(texts[i], ...)`)."""
    _check_tokenizer(tokenizer, max_len)
    rows = [_collapse_spans(enc, tokenizer, max_len, ())[0] for enc in _encode_many(texts, tokenizer)]
    return _pad_rows(rows, max_len, tokenizer.pad_token_id)


def tokenize(text: str, tokenizer: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (max_len,), truncated with the closing special token kept, right-padded."""
    ids, mask = tokenize_many([text], tokenizer, max_len)
    return ids[0], mask[0]


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


@dataclass(frozen=True)
class TextPlan:
    """The text of one sample before tokenization (what the loader's workers pass to the batched collate).

    caption: as curation stored it; spans: merged entity character spans; answer: the drawn answer string;
    has_entity: whether MEC scores this row; shared: the stage-2 shared-class prompt (None: no stage-2 text).
    """

    caption: str
    spans: tuple[tuple[int, int], ...]
    answer: str
    has_entity: bool
    shared: str | None = None


def plan_mec_text(caption: str, entity_words: Sequence[Mapping[str, Any]], rng: random.Random | None = None,
                  entities: Sequence[str] | None = None) -> TextPlan:
    """Validate the entity offsets and draw the answer's template prefix (see `build_mec_inputs` for the args)."""
    rng = rng or random.Random(0)
    spans = entity_spans(caption, entity_words)
    classes = list(entities) if entities is not None else [str(ew["class"]) for ew in entity_words]
    return TextPlan(caption=caption, spans=tuple(spans), answer=answer_text(classes, rng),
                    has_entity=bool(classes) and bool(spans))


def encode_mec_batch(plans: Sequence[TextPlan], tokenizer: Any, max_len: int) -> dict[str, torch.Tensor]:
    """Batch tensors of N plans with two tokenizer calls (captions with offsets; answers), three with stage-2
    prompts: input_ids/attention_mask, question_ids/question_mask, answer_ids/answer_mask (N, max_len) long,
    has_entity (N,) bool, num_masks (N,) long, and shared_ids/shared_mask when every plan has `shared` set.

    The caption is tokenized once: its ids are the caption input, and the same encoding with the entity spans
    collapsed is the question.
    """
    _check_tokenizer(tokenizer, max_len)
    captions = _encode_many([p.caption for p in plans], tokenizer)
    caption_rows = [_collapse_spans(enc, tokenizer, max_len, ())[0] for enc in captions]
    questions = [_collapse_spans(enc, tokenizer, max_len, p.spans) for enc, p in zip(captions, plans, strict=True)]
    pad = tokenizer.pad_token_id
    out: dict[str, torch.Tensor] = {}
    out["input_ids"], out["attention_mask"] = _pad_rows(caption_rows, max_len, pad)
    out["question_ids"], out["question_mask"] = _pad_rows([q for q, _ in questions], max_len, pad)
    out["answer_ids"], out["answer_mask"] = tokenize_many([p.answer for p in plans], tokenizer, max_len)
    out["has_entity"] = torch.tensor([p.has_entity for p in plans], dtype=torch.bool)
    out["num_masks"] = torch.tensor([n for _, n in questions], dtype=torch.long)
    if plans and all(p.shared is not None for p in plans):
        out["shared_ids"], out["shared_mask"] = tokenize_many([p.shared for p in plans], tokenizer, max_len)
    return out


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
    plan = plan_mec_text(caption, entity_words, rng, entities)
    batch = encode_mec_batch([plan], tokenizer, max_len)
    out: dict[str, Any] = {k: v[0] for k, v in batch.items() if k not in ("has_entity", "num_masks")}
    out.update(has_entity=plan.has_entity, num_masks=int(batch["num_masks"][0]), answer=plan.answer)
    return out


def shared_prompt(shared_class: str | None) -> str:
    """'a photo of a {shared_class}.' (the stage-2 partner prompt; an empty class when there is no partner)."""
    return SHARED_CLASS_TEMPLATE.format(shared_class or "")


def build_shared_inputs(shared_class: str | None, tokenizer: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """'a photo of a {shared_class}.' for the stage-2 partner (an all-padding prompt when there is no partner)."""
    return tokenize(shared_prompt(shared_class), tokenizer, max_len)
