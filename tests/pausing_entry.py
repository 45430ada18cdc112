"""Test-only trainer entry: the real `train_dreambooth_coeff.py` with pauses where a kill hurts most.

The kill tests in test_reliability.py run this script (also under `accelerate launch`) so that a
SIGKILL can land inside a checkpoint and between the final weights and the model card: with
``DREAMCOEFF_TEST_SLOW_CHECKPOINT=SECONDS`` in the environment it sleeps that long after writing an
alpha file (mid-checkpoint: before its LoRA file and state), before a checkpoint folder is flushed
and renamed, and before the model card. With ``DREAMCOEFF_TEST_SLOW_STEP=SECONDS`` it also sleeps that
long after every optimizer step, so that a signal sent at a random moment lands in the middle of the
loop (the SIGTERM tests). The production code has no such hook; this wraps its functions from outside.
"""

from __future__ import annotations

import os
import sys
import time

TEST_PAUSE_ENV = "DREAMCOEFF_TEST_SLOW_CHECKPOINT"
TEST_STEP_PAUSE_ENV = "DREAMCOEFF_TEST_SLOW_STEP"


def _after(fn, seconds: float):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        time.sleep(seconds)
        return result

    return wrapped


def _before(fn, seconds: float):
    def wrapped(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapped


def install_pauses(seconds: float) -> None:
    """Wrap the trainer's write steps with `seconds` of sleep (see the module docstring)."""
    import dreamcoeff.methods as methods
    import dreamcoeff.train.checkpoints as checkpoints
    import dreamcoeff.train.loop as loop

    methods.save_coeff_weights = _after(methods.save_coeff_weights, seconds)
    checkpoints.fsync_tree = _before(checkpoints.fsync_tree, seconds)
    loop.write_model_card = _before(loop.write_model_card, seconds)


def install_step_pause(seconds: float) -> None:
    """Sleep `seconds` after every optimizer step (before the step is counted and checkpointed)."""
    import dreamcoeff.train.loop as loop

    loop.Trainer.optimizer_step = _after(loop.Trainer.optimizer_step, seconds)


if __name__ == "__main__":
    if os.environ.get(TEST_PAUSE_ENV):
        install_pauses(float(os.environ[TEST_PAUSE_ENV]))
    if os.environ.get(TEST_STEP_PAUSE_ENV):
        install_step_pause(float(os.environ[TEST_STEP_PAUSE_ENV]))
    from dreamcoeff.train import main

    sys.exit(main())
