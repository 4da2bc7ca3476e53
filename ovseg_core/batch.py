"""The keys of a training batch, defined once: the loader (ovseg_core.data.loader) produces them and the model
(OVSegmentor.forward_train) checks them.

Stage 1: the image, the caption's and the MEC question's and answer's token ids and masks, and whether the caption
has an entity. Stage 2 adds the partner image (same entity, another sample), whether it exists, and the shared
entity's prompt tokens.
"""
from __future__ import annotations

TEXT_KEYS = ("input_ids", "attention_mask", "question_ids", "question_mask", "answer_ids", "answer_mask")
PARTNER_KEYS = ("partner_image", "partner_valid", "shared_ids", "shared_mask")
STAGE1_KEYS = ("image", *TEXT_KEYS, "has_entity")
STAGE2_KEYS = PARTNER_KEYS
# (ids, mask) pairs of every text in a batch (padding trimmed together)
TEXT_PAIRS = (("input_ids", "attention_mask"), ("question_ids", "question_mask"), ("answer_ids", "answer_mask"),
              ("shared_ids", "shared_mask"))
ENTITY_TARGETS_KEY = "entity_targets"  # only when the entity-prompt loss is on (entity_prompt_weight > 0)
