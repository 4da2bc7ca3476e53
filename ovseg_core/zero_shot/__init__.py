"""Zero-shot segmentation: prompt templates and class lists (templates), text classifier (classifier),
GroupViT-protocol segmenter with top-k, background threshold and sliding window (segment)."""

from ovseg_core.zero_shot.classifier import build_zero_shot_classifier
from ovseg_core.zero_shot.segment import SegmenterConfig, ZeroShotSegmenter
from ovseg_core.zero_shot.templates import SEGMENTATION_TEMPLATES, TEMPLATE_SETS, get_templates

__all__ = [
    "SEGMENTATION_TEMPLATES",
    "TEMPLATE_SETS",
    "SegmenterConfig",
    "ZeroShotSegmenter",
    "build_zero_shot_classifier",
    "get_templates",
]
