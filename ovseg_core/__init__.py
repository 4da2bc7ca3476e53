"""OVSegmentor: open-vocabulary segmentation learned from captions (ViT + grouping block + BERT text encoder).

Public API:
    create_model(name, **overrides) -> OVSegmentor      presets: list_models() == ["tiny", "vit_b", "vit_s"]
    OVSegConfig                                          frozen, validated architecture/loss config
    OVSegmentor.encode_image / encode_text / encode_text_strings / forward_train
    ovseg_core.losses                                    contrastive_loss, gather_with_grad, dice_loss, ...
Sub-packages zero_shot/, evaluation/, data/, train/ build on these.

The model names are imported lazily (PEP 562), so `import ovseg_core.losses` or `ovseg_core.data` in a data-loader
or distributed worker does not pay for importing transformers and timm.
"""

from importlib import import_module
from typing import Any

from ovseg_core.config import MINILM_TEXT_MODEL, OVSegConfig

_LAZY = {
    "ImageOutput": "ovseg_core.models.ovseg",
    "OVSegmentor": "ovseg_core.models.ovseg",
    "TextModelNotFoundError": "ovseg_core.models.text",
    "create_model": "ovseg_core.models._factory",
    "get_model_config": "ovseg_core.models",
    "list_models": "ovseg_core.models",
    "register_model": "ovseg_core.models",
}

__all__ = [
    "MINILM_TEXT_MODEL", "ImageOutput", "OVSegConfig", "OVSegmentor", "TextModelNotFoundError", "create_model",
    "get_model_config", "list_models", "register_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ovseg_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
