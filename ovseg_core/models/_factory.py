"""create_model: preset name + overrides -> OVSegmentor."""

from __future__ import annotations

from ovseg_core.config import OVSegConfig
from ovseg_core.models._registry import get_model_config
from ovseg_core.models.ovseg import OVSegmentor


def create_model(name: str, **overrides: object) -> OVSegmentor:
    """Build a registered preset (`list_models()`), e.g. `create_model("tiny", text_pretrained=False)`.

    Args:
        name: preset name ("tiny", "vit_s", "vit_b").
        **overrides: OVSegConfig fields to change (validated; unknown names raise ValueError).
    """
    return OVSegmentor(get_model_config(name, **overrides))


def create_model_from_config(cfg: OVSegConfig) -> OVSegmentor:
    return OVSegmentor(cfg)
