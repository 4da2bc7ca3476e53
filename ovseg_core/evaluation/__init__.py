"""Zero-shot segmentation evaluation: datasets by on-disk layout (datasets), confusion-matrix mIoU (metrics),
the evaluation loop and ``cc4m eval`` CLI (evaluate), side-by-side PNG overlays (overlay)."""

from ovseg_core.evaluation.datasets import DATASET_LAYOUTS, DatasetLayoutError, SegDataset, SegSample, load_dataset
from ovseg_core.evaluation.evaluate import add_eval_arguments, cli_eval, evaluate, image_to_tensor
from ovseg_core.evaluation.metrics import ConfusionMatrix, SegmentationScores
from ovseg_core.evaluation.overlay import save_overlay, voc_palette

__all__ = [
    "DATASET_LAYOUTS",
    "ConfusionMatrix",
    "DatasetLayoutError",
    "SegDataset",
    "SegSample",
    "SegmentationScores",
    "add_eval_arguments",
    "cli_eval",
    "evaluate",
    "image_to_tensor",
    "load_dataset",
    "save_overlay",
    "voc_palette",
]
