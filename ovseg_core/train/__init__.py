"""Pretraining: config (TrainConfig + stage presets), recipe (the `paper` run), optim (AdamW + cosine), distributed
(DDP), loop (TrainingRun); the CLI is ovseg_core.train.cli."""
from ovseg_core.train.config import STAGE_PRESETS, TrainConfig
from ovseg_core.train.loop import TrainingRun, TrainResult, train

__all__ = ["STAGE_PRESETS", "TrainConfig", "TrainResult", "TrainingRun", "train"]
