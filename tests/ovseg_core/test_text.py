"""Masked-entity question / answer construction: exactly one [MASK] per entity span, no character stripping."""
from __future__ import annotations

import random
import re

import pytest

from ovseg_core.data.text import TEMPLATE_PREFIXES, answer_text, build_mec_inputs, build_shared_inputs, question_text

MAX_LEN = 32


def words_of(caption: str, *words: str, cls: dict[str, str] | None = None) -> list[dict]:
    """entity_words for each given word's first occurrence as a whole word (like curation records them)."""
    out = []
    for w in words:
        m = re.search(rf"\b{re.escape(w)}\b", caption)
        assert m, (w, caption)
        out.append({"word": w, "class": (cls or {}).get(w, w), "start": m.start(), "end": m.end()})
    return out


def decode(tok, ids, mask) -> list[str]:
    return tok.convert_ids_to_tokens([i for i, m in zip(ids.tolist(), mask.tolist()) if m])


@pytest.mark.parametrize(
    "caption, words, expected_question",
    [
        ("a red bus on the road", ["bus"], "a red [MASK] on the road"),
        ("a glass of wine", ["glass"], "[MASK] of wine"),
        ("sheep grazing in a field", ["sheep"], "[MASK] grazing in a field"),
        ("a cat sleeping on the sofa", ["cat", "sofa"], "a [MASK] sleeping on the [MASK]"),
        ("a sink in the bathroom", ["sink"], "a [MASK] in the bathroom"),
        ("a dog, a cat, and a bus.", ["dog", "cat", "bus"], "a [MASK], a [MASK], and a [MASK]."),
        ("<PERSON> walks her dog", ["dog"], "<PERSON> walks her [MASK]"),
        ("dog", ["dog"], "[MASK]"),
        ("a skateboard and a snowboard", ["skateboard", "snowboard"], "a [MASK] and a [MASK]"),
        ("a refrigerator next to a microwave", ["refrigerator", "microwave"], "a [MASK] next to a [MASK]"),
    ],
)
def test_question_masks_each_entity_once(minilm_tokenizer, caption, words, expected_question):
    tok = minilm_tokenizer
    if caption.startswith("a glass"):
        expected_question = "a " + expected_question
    ew = words_of(caption, *words)
    assert question_text(caption, ew) == expected_question
    out = build_mec_inputs(caption, ew, tok, MAX_LEN, rng=random.Random(0))
    q = decode(tok, out["question_ids"], out["question_mask"])
    assert q.count("[MASK]") == len(words) == out["num_masks"]
    # the masked question is exactly the tokenisation of the question string (mask = one token, rest untouched)
    ref = tok(expected_question)["input_ids"]
    assert out["question_ids"][: len(ref)].tolist() == ref
    # none of the entity words' pieces survive; the caption itself is untouched
    assert not any(w in " ".join(q) for w in words if len(w) > 3)
    c = decode(tok, out["input_ids"], out["attention_mask"])
    assert "[MASK]" not in c and c == tok.convert_ids_to_tokens(tok(caption)["input_ids"])


def test_wordpiece_split_word_becomes_single_mask(minilm_tokenizer):
    tok = minilm_tokenizer
    caption = "a snowboard leaning on a skateboard"
    assert len(tok.tokenize("snowboard")) > 1  # the point of the test: several pieces, one mask
    out = build_mec_inputs(caption, words_of(caption, "snowboard"), tok, MAX_LEN)
    q = decode(tok, out["question_ids"], out["question_mask"])
    assert q == ["[CLS]", "a", "[MASK]", "leaning", "on", "a", *tok.tokenize("skateboard"), "[SEP]"]


def test_entity_inside_longer_token_is_masked_as_one(minilm_tokenizer):
    # a span covering only part of a token (e.g. curation marked "dog" in "dogs") still yields one mask
    caption = "two dogs playing"
    out = build_mec_inputs(caption, [{"word": "dog", "class": "dog", "start": 4, "end": 7}], minilm_tokenizer, 16)
    q = decode(minilm_tokenizer, out["question_ids"], out["question_mask"])
    assert q.count("[MASK]") == 1 and "dogs" not in q


def test_padding_mask_and_truncation(minilm_tokenizer):
    tok = minilm_tokenizer
    caption = "a dog " + "very " * 40 + "near a bus"
    out = build_mec_inputs(caption, words_of(caption, "dog", "bus"), tok, 16)
    for ids_key, mask_key in (("input_ids", "attention_mask"), ("question_ids", "question_mask")):
        ids, mask = out[ids_key], out[mask_key]
        assert ids.shape == mask.shape == (16,)
        assert mask.sum() == 16 and ids[-1] == tok.sep_token_id and ids[0] == tok.cls_token_id
    assert out["num_masks"] == 1  # "bus" was truncated away
    short = build_mec_inputs("a dog", words_of("a dog", "dog"), tok, 16)
    n = int(short["question_mask"].sum())
    assert n == 4 and short["question_mask"][:n].all() and not short["question_mask"][n:].any()
    assert (short["question_ids"][n:] == tok.pad_token_id).all()


def test_offsets_must_match_caption(minilm_tokenizer):
    with pytest.raises(ValueError, match="does not match"):
        build_mec_inputs("a bus", [{"word": "bus", "class": "bus", "start": 1, "end": 4}], minilm_tokenizer, 16)


def test_answer_and_shared_prompt(minilm_tokenizer):
    rng = random.Random(3)
    ans = answer_text(["people", "dog", "dog"], rng)
    prefix = ans[: -len("dog and people")].strip()
    assert ans.endswith("dog and people") and prefix in TEMPLATE_PREFIXES
    assert answer_text(["dog"], random.Random(1)) == answer_text(["dog"], random.Random(1))  # seeded
    caption = "a man with a dog"
    ew = words_of(caption, "man", "dog", cls={"man": "people"})
    out = build_mec_inputs(caption, ew, minilm_tokenizer, MAX_LEN, rng=random.Random(0))
    assert out["has_entity"] and out["answer"].endswith("dog and people")
    none = build_mec_inputs("an empty street", [], minilm_tokenizer, MAX_LEN)
    assert not none["has_entity"] and none["num_masks"] == 0
    ids, mask = build_shared_inputs("dog", minilm_tokenizer, MAX_LEN)
    assert decode(minilm_tokenizer, ids, mask)[1:-1] == minilm_tokenizer.tokenize("a photo of a dog.")
