"""Data for OVSegmentor pretraining: build reader (cc4m), text inputs (text), augmentations (transforms), loaders."""
from ovseg_core.data.cc4m import BuildReader, is_val_sample
from ovseg_core.data.loader import CC4MMapDataset, CC4MTrainStream, SampleProcessor, collate
from ovseg_core.data.text import build_mec_inputs, build_shared_inputs
from ovseg_core.data.transforms import AUGMENTATIONS, build_eval_transform, build_train_transform

__all__ = [
    "AUGMENTATIONS",
    "BuildReader",
    "CC4MMapDataset",
    "CC4MTrainStream",
    "SampleProcessor",
    "build_eval_transform",
    "build_mec_inputs",
    "build_shared_inputs",
    "build_train_transform",
    "collate",
    "is_val_sample",
]
