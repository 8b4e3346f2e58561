"""Training: the loop, checkpoints and resume, metrics and the loss plot."""

from lorakit.train.config import TrainConfig
from lorakit.train.loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
