"""Stopping on SIGTERM (what SLURM and Kubernetes send before SIGKILL) without losing the step.

While a :class:`StopRequest` is active (the trainer's ``train()`` holds one; importing the package
installs nothing), SIGTERM only sets a flag. The training loop turns the flags of all processes into
one decision after every optimizer step (``Trainer.stop_requested``: a sum over the ranks, so every
rank stops after the same step), writes a checkpoint through the usual atomic code and raises
:class:`TrainingStopped`; the command line prints how to resume and exits with
:data:`STOP_EXIT_CODE` (143 = 128 + SIGTERM, what a process ended by SIGTERM conventionally reports).

A second SIGTERM, or a SIGINT (Ctrl-C), while a stop is pending ends the process at once with
128 + the signal's number; the newest complete checkpoint stays valid (checkpoints are renamed into
place only when complete). A SIGTERM that comes within :data:`DUPLICATE_WINDOW_S` of the first counts
as the same request: torchrun forwards the SIGTERM it gets to every rank, and SLURM signals every
process of a job step, so a rank under ``srun accelerate launch`` receives two at once. Without a
pending stop, SIGINT does what it did before (a ``KeyboardInterrupt``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

__all__ = ["DUPLICATE_WINDOW_S", "STOP_EXIT_CODE", "StopRequest", "TrainingStopped"]

STOP_EXIT_CODE = 128 + signal.SIGTERM  # 143
DUPLICATE_WINDOW_S = 3.0


class TrainingStopped(Exception):
    """The run stopped early on SIGTERM at `step`; `checkpoint` is the newest complete checkpoint (None:
    none was written yet). The message says how to resume. `announce`: whether this process prints it
    (the main one), so a multi-process run says it once."""

    def __init__(self, step: int, total: int, out: Path, checkpoint: Path | None, announce: bool = True) -> None:
        self.step, self.total, self.out, self.checkpoint, self.announce = step, total, out, checkpoint, announce
        if checkpoint is not None:
            how = (
                f"the newest checkpoint is {checkpoint}. To resume, run the same command with "
                f"--resume_from_checkpoint latest (it continues in {out})"
            )
        else:
            how = (
                f"no checkpoint had been written in {out}; run the same command again "
                "(with --resume_from_checkpoint latest it starts from step 0)"
            )
        super().__init__(f"stopped by SIGTERM at step {step} of {total}; {how}")


def _say(text: str) -> None:
    """Write to stderr from a signal handler (os.write: print could re-enter a buffered write)."""
    try:
        os.write(2, text.encode("utf-8", errors="replace"))
    except OSError:
        pass


class StopRequest:
    """SIGTERM asks for a stop (``requested``) instead of ending the process, while this is active::

        with StopRequest() as stop:
            ...  # check stop.requested between steps

    Installs handlers for SIGTERM and SIGINT on entry and puts the previous ones back on exit. Only
    the main thread can install handlers: elsewhere this does nothing (SIGTERM keeps its old effect).
    """

    def __init__(self) -> None:
        self.requested = False
        self.first_at: float | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc_info: object) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and not self.requested:
            # Set before any call: Python may run this handler again, for a copy of the signal arriving
            # now, at any call (time.monotonic, _say). That run must see the request already made.
            self.requested = True
            self.first_at = time.monotonic()
            _say(
                f"dreamcoeff: {name} received (pid {os.getpid()}): stopping after the current step with a "
                f"checkpoint; {name} again or Ctrl-C stops at once\n"
            )
            return
        if signum == signal.SIGTERM and (
            self.first_at is None or time.monotonic() - self.first_at < DUPLICATE_WINDOW_S
        ):
            return  # the same request again (torchrun's forwarded copy, or SLURM's to every process)
        if not self.requested:  # SIGINT with no stop pending: what it did before
            self._call_previous(signum, frame)
            return
        _say(
            f"dreamcoeff: {name} received while stopping: exiting at once (pid {os.getpid()}); the newest "
            "complete checkpoint is intact, resume with --resume_from_checkpoint latest\n"
        )
        os._exit(128 + signum)

    def _call_previous(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # the default action: end the process as the signal would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # SIG_IGN (or None: installed outside Python): ignore
