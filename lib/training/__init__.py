"""Training: optimizer, LR schedules and the training loop (one loop for every mode)."""

from lib.training.loop import TrainResult, evaluate, train

__all__ = ["TrainResult", "evaluate", "train"]
