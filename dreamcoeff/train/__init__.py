"""The DreamBooth trainer: flags (`config`), data, the loop in phases (`loop`), checkpoints, outputs.

`train(cfg)` runs one training; `main(argv)` is the command line behind `train_dreambooth_coeff.py`,
`dreamcoeff-train` and `python -m dreamcoeff.train`.
"""

from .card import TrainResult
from .checkpoints import COMPLETE_NAME, STATE_NAME, TrainingError, list_checkpoints
from .cli import main
from .config import TrainConfig, UsageError, parse_args
from .loop import train
from .stopping import STOP_EXIT_CODE, TrainingStopped

__all__ = [
    "COMPLETE_NAME",
    "STATE_NAME",
    "STOP_EXIT_CODE",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingStopped",
    "UsageError",
    "list_checkpoints",
    "main",
    "parse_args",
    "train",
]
