"""What the processes of a multi-process run decide together: whether something holds on any rank,
work done by the main process alone whose failure every rank must learn of, and choices about the
output folder made once and shared. With one process each is the plain local answer, no collective."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .checkpoints import TrainingError
from .errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["any_rank", "decided_on_main_process", "free_ddp_wrapper", "on_main_process"]


def any_rank(accelerator: Accelerator, local: bool) -> bool:
    """Whether `local` holds on any process: a sum over the ranks, so every rank must call it at the
    same point (one process: `local` itself, no collective)."""
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def on_main_process(accelerator: Accelerator, what: str, work: Callable[[], None]) -> None:
    """Run `work` on the main process alone, at a point every rank reaches: the main process then
    tells the others whether it failed (a full disk, an out-of-memory while sampling), and all of
    them stop here. Otherwise the others would only find out at their next collective, hanging
    there until torchrun kills them or the process group's timeout (30 minutes by default) ends."""
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as exc:  # noqa: BLE001  (re-raised below, once the other ranks know)
            failure = exc
    if any_rank(accelerator, failure is not None) and failure is None:
        raise TrainingError(
            f"process {accelerator.process_index}: stopping because the main process failed in {what} "
            "(its error is above)"
        )
    if failure is not None:
        raise failure


def decided_on_main_process(accelerator: Accelerator, decide: Callable[[], Any]) -> Any:
    """`decide()` on the main process, its answer (or its usage / training error) shared with every
    rank: for choices that touch the output folder (which checkpoint to resume, moving a broken one
    aside), which the other ranks must neither race nor make differently."""
    answer, failure = None, None
    if accelerator.is_main_process:
        try:
            answer = decide()
        except (UsageError, TrainingError) as exc:
            failure = exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        answer, failure = broadcast_object_list([answer, failure], from_process=0)
    if failure is not None:
        raise failure
    return answer


def free_ddp_wrapper(accelerator: Accelerator, holder: list[torch.nn.Module]) -> None:
    """Free the DistributedDataParallel wrapper in `holder` (its last reference, with accelerate's),
    while the process group is still registered, so that destroying the group later is what frees it.

    Why: DDP's C++ Reducer holds the gloo process group. Were the Reducer the last holder (as after
    `accelerator.end_training()` has unregistered the group), freeing it runs gloo's destructor with
    the GIL held; that destructor joins gloo's worker threads, and a worker still releasing the
    tensors of the last collective needs the GIL: the process hangs for ever after "training
    finished" (seen with py-spy: the main thread in ~ProcessGroupGloo under Reducer's dealloc, a gloo
    worker in gil_scoped_acquire), or aborts (SIGABRT) at interpreter shutdown. Freed here, the
    Reducer only drops one reference; `destroy_process_group` then frees the group through torch's
    binding, which releases the GIL first (torch's own fix for the same deadlock, pytorch#154976)."""
    import gc

    ddp = holder.pop()
    accelerator._models = [m for m in accelerator._models if m is not ddp]
    del ddp
    gc.collect()  # DDP's hooks form reference cycles: collect them now, not at a later GIL-held moment
