"""The trainer's command line: parse flags, run, and turn bad input into one-line errors (exit 2); a run
stopped by SIGTERM prints how to resume and exits with `stopping.STOP_EXIT_CODE` (143)."""

from __future__ import annotations

import logging
import sys

from ..models import ModelError
from ..tokens import TokenError
from ..weights import CoeffWeightsError
from .checkpoints import TrainingError
from .config import UsageError, parse_args
from .data import DataError
from .loop import train
from .stopping import STOP_EXIT_CODE, TrainingStopped


def _end_process_group() -> None:
    """Tear down a multi-process run's process group before the process exits with an error: left to
    the interpreter's shutdown, gloo sometimes aborts (SIGABRT) and the exit code 2 is lost."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (the error being reported matters more than a teardown problem)
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train_dreambooth_coeff.py`, `dreamcoeff-train` and `python -m dreamcoeff.train`."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_args(argv)
        train(cfg)
    except TrainingStopped as exc:
        if exc.announce:
            print(f"dreamcoeff: {exc}", file=sys.stderr, flush=True)
        return STOP_EXIT_CODE
    except (UsageError, DataError, ModelError, CoeffWeightsError, TokenError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _end_process_group()
        return 2
    except ImportError as exc:
        if "xformers" in str(exc) or "bitsandbytes" in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0
