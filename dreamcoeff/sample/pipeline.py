"""Loading the base SDXL pipeline for sampling: dtype, scheduler, eval mode, frozen weights.

Sampling needs no gradients, and :func:`freeze` is not only tidy: PyTorch's CPU matmul picks a
different kernel for ``F.linear`` when the weight requires grad, so a frozen pipeline is what keeps
rows bit-identical whatever adapters were loaded before them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..processor import coeff_parameters
from .errors import SamplingError
from .quiet import quiet_diffusers_noise

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, SchedulerMixin, StableDiffusionXLPipeline

__all__ = ["SCHEDULERS", "resolve_scheduler", "set_scheduler", "resolve_dtype", "freeze", "load_base_pipeline"]

#: Short scheduler names for ``set_scheduler`` (any diffusers scheduler class name works too).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def resolve_scheduler(name: str) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    """The diffusers scheduler class and config overrides for ``name`` (a key of :data:`SCHEDULERS`
    or a diffusers class name such as ``DPMSolverMultistepScheduler``)."""
    import diffusers

    cls_name, overrides = SCHEDULERS.get(name.lower(), (name, {}))
    cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Scheduler") else None
    if cls is None:
        raise SamplingError(
            f"unknown --scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name"
        )
    return cls, overrides


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (see :func:`resolve_scheduler`), keeping the
    model's noise schedule config (betas, timestep spacing, prediction type)."""
    cls, overrides = resolve_scheduler(name)
    try:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    except ImportError as exc:
        raise SamplingError(f"--scheduler {name}: {exc}") from None


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """ "auto" is float16 on CUDA and float32 elsewhere; else fp32 / fp16 / bf16."""
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise SamplingError(f"unknown --dtype {name!r}; use auto, fp32, fp16 or bf16")
    return _DTYPES[name]


def freeze(pipe: DiffusionPipeline) -> None:
    """requires_grad=False on every model of the pipeline (and on loaded alpha).

    Not only tidy: PyTorch's CPU matmul picks a different kernel for ``F.linear`` when the weight
    requires grad (measured: 7e-7 differences on non-contiguous inputs), and PEFT freezes the base
    model when it injects a LoRA. Freezing everything before the first row keeps the base row after
    a LoRA row bit-identical to the one before it.
    """
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)
    for p in coeff_parameters(pipe):
        p.requires_grad_(False)


def _from_pretrained(
    name_or_path: str,
    dtype: torch.dtype,
    vae: str | None,
    revision: str | None,
    variant: str | None,
    config_dir: str | None = None,
) -> StableDiffusionXLPipeline:
    """The pipeline's files loaded (with another VAE if given): a folder or hub id, or one
    original-layout .safetensors file with the configs of `config_dir`; :class:`SamplingError` if they
    cannot be."""
    from diffusers import StableDiffusionXLPipeline

    from ..models import ModelError, check_base_model, is_single_file, load_single_file_pipeline, load_vae

    single = is_single_file(name_or_path)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    try:
        check_base_model(name_or_path, vae, revision, variant, config_dir)
        if vae:
            with quiet_diffusers_noise():
                kwargs["vae"] = load_vae(vae, str(config_dir) if config_dir or single else name_or_path, revision)
                kwargs["vae"].to(dtype)
        # No invisible watermark: it would perturb exactly the pixels the comparison is about.
        with quiet_diffusers_noise():
            if single:
                return load_single_file_pipeline(name_or_path, config_dir, add_watermarker=False, **kwargs)
            return StableDiffusionXLPipeline.from_pretrained(
                name_or_path, add_watermarker=False, revision=revision, variant=variant, **kwargs
            )
    except ModelError as exc:
        raise SamplingError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise SamplingError(f"could not load the base model {name_or_path}: {exc}") from None


def load_base_pipeline(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cpu_offload: bool = False,
    scheduler: str | None = None,
    config_dir: str | None = None,
) -> StableDiffusionXLPipeline:
    """Load an SDXL pipeline (hub id, local folder, or one original-layout .safetensors checkpoint whose
    configs and tokenizers are the local folder ``config_dir``) for sampling: eval mode, frozen, no
    watermark.

    ``cpu_offload`` keeps each model on the CPU until it runs (``enable_model_cpu_offload``; CUDA),
    else the whole pipeline moves to ``device``. Raises :class:`SamplingError` with the reason when
    the model cannot be loaded or is not SDXL.
    """
    pipe = _from_pretrained(name_or_path, dtype, vae, revision, variant, config_dir)
    if getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        raise SamplingError(f"{name_or_path}: the UNet has no text_time conditioning, so it is not SDXL")
    if scheduler:
        set_scheduler(pipe, scheduler)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).eval()
    freeze(pipe)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe
