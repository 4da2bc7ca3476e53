"""Models: GroupViT image encoder, BERT-family text encoder, OVSegmentor and its registered presets."""

from ovseg_core.models._factory import create_model, create_model_from_config
from ovseg_core.models._registry import get_model_config, is_model, list_models, register_model
from ovseg_core.models.group_vit import GroupViT, VisionFeatures, load_timm_vit_checkpoint
from ovseg_core.models.ovseg import ImageOutput, MECHead, OVSegmentor
from ovseg_core.models.text import TextEncoder, TextModelNotFoundError

__all__ = [
    "GroupViT", "ImageOutput", "MECHead", "OVSegmentor", "TextEncoder", "TextModelNotFoundError", "VisionFeatures",
    "create_model", "create_model_from_config", "get_model_config", "is_model", "list_models",
    "load_timm_vit_checkpoint", "register_model",
]
