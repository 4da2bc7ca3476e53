"""Pretraining: config (TrainConfig + stage presets), optim (AdamW + cosine), checkpoint, distributed (DDP), loop."""
from ovseg_core.train.checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from ovseg_core.train.config import STAGE_PRESETS, TrainConfig
from ovseg_core.train.loop import TrainResult, add_train_arguments, cli_train, train

__all__ = [
    "STAGE_PRESETS",
    "TrainConfig",
    "TrainResult",
    "add_train_arguments",
    "cli_train",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "save_checkpoint",
    "train",
]
