"""The training loop on accelerate, and atomic checkpoints."""

from kdistill.training.checkpoint import latest_checkpoint, load_student_weights, save_student
from kdistill.training.loop import EpochSampler, TrainConfig, TrainResult, train

__all__ = ["EpochSampler", "TrainConfig", "TrainResult", "latest_checkpoint", "load_student_weights",
           "save_student", "train"]  # fmt: skip
