"""Zero-shot segmentation evaluation: datasets by on-disk layout (datasets), confusion-matrix mIoU (metrics),
the evaluation loop (evaluate), evaluator-setting selection on a selection split (selection), side-by-side PNG
overlays (overlay); ``cc4m eval`` is ovseg_core.evaluation.cli."""

from ovseg_core.evaluation.datasets import DATASET_LAYOUTS, DatasetLayoutError, SegDataset, SegSample, load_dataset
from ovseg_core.evaluation.evaluate import evaluate, image_to_tensor
from ovseg_core.evaluation.metrics import ConfusionMatrix, SegmentationScores
from ovseg_core.evaluation.overlay import save_overlay, voc_palette

__all__ = [
    "DATASET_LAYOUTS",
    "ConfusionMatrix",
    "DatasetLayoutError",
    "SegDataset",
    "SegSample",
    "SegmentationScores",
    "evaluate",
    "image_to_tensor",
    "load_dataset",
    "save_overlay",
    "voc_palette",
]
