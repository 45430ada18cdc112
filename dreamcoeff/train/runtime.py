"""What the run's machine and processes offer: installed trackers, runnable attention kernels, peak
memory, and whether every process ended with the same weights."""

from __future__ import annotations

import logging
import resource

import torch

from ..processor import set_coeff_attention_impl
from .checkpoints import TrainingError
from .config import UsageError

__all__ = ["check_ranks_agree", "peak_memory", "select_attention_impl", "usable_trackers"]

logger = logging.getLogger("dreamcoeff")


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated CUDA memory on a GPU, the process's max RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def usable_trackers(report_to: str) -> list[str] | None:
    """The --report_to trackers that are installed (a missing one is noted, not fatal)."""
    if report_to in (None, "", "none"):
        return None
    wanted = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    usable = []
    for name in wanted:
        try:
            __import__(name)
            usable.append(name)
        except ImportError:
            logger.info("--report_to %s: %s is not installed, logging to the console only", report_to, name)
    return usable or None


def select_attention_impl(impl: str, device: torch.device, unet: torch.nn.Module) -> None:
    """--coeff_attention_impl: refused up front where the kernel cannot run on `device`, else set on
    this UNet (`set_coeff_attention_impl`) as what its coeff layers run where A != I, so validation
    pipelines built on the same UNet use it too. Call after the method's `install` (later processors
    get it from the UNet as well)."""
    if impl == "triton":
        from ..attention.triton_kernels import triton_unavailable_reason  # lazy: triton is optional

        reason = triton_unavailable_reason(torch.device(device))
        if reason is not None:
            raise UsageError(
                f"--coeff_attention_impl triton: {reason}; or drop the flag (chunked PyTorch runs everywhere)"
            )
    if impl == "cpu_fused":
        from ..attention.cpu_kernel import unavailable_reason

        reason = unavailable_reason(torch.device(device))
        if reason is not None:
            raise UsageError(f"--coeff_attention_impl cpu_fused: {reason}; or drop the flag")
    set_coeff_attention_impl(unet, impl)


def check_ranks_agree(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Every process must end with the same weights (DDP keeps them in step); say so, or fail."""
    if accelerator.num_processes == 1 or not params:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    gathered = accelerator.gather(flat.unsqueeze(0))
    spread = (gathered - gathered[0:1]).abs().max().item()
    if spread > 0:
        raise TrainingError(
            f"trainable weights differ across {accelerator.num_processes} processes (max diff {spread:g})"
        )
    logger.info("weights identical on all %d processes", accelerator.num_processes)
