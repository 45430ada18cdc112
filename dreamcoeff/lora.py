"""The files of the methods that change UNet weights: PEFT LoRA (diffusers' format) and the full UNet.

LoRA is PEFT's, installed on the attention projections as diffusers' SDXL LoRA script does, and
saved in the layout `pipe.load_lora_weights` reads; a `--tuning full` run saves the whole UNet with
`save_pretrained`. `methods` says which tuning method uses which of these files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .io import atomic_write
from .processor import unwrap_unet

__all__ = [
    "FULL_UNET_DIR",
    "LORA_TARGET_MODULES",
    "LORA_WEIGHTS_NAME",
    "TEXT_ENCODER_LORA_TARGETS",
    "TEXT_ENCODER_PREFIXES",
    "add_lora",
    "add_text_encoder_lora",
    "init_lora_from",
    "load_full_unet_weights",
    "load_lora_into_text_encoders",
    "load_lora_into_unet",
    "lora_file_of",
    "lora_problems",
    "lora_state_dict",
    "save_lora",
    "tensor_value_problems",
    "text_encoder_lora_state_dict",
    "text_encoders_lora_state",
    "unet_architecture_differences",
]

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: CLIP's attention projections, where diffusers' train_dreambooth_lora_sdxl.py puts the text encoders' LoRA
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: The key prefixes of the two SDXL text encoders in diffusers' LoRA file (CLIP ViT-L, then OpenCLIP bigG)
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoder_2")
#: Subfolder of a ``--tuning full`` output (and checkpoint) holding the whole fine-tuned UNet.
FULL_UNET_DIR = "unet"


def add_lora(
    unet: torch.nn.Module, rank: int, lora_alpha: int | None = None, dropout: float = 0.0, use_dora: bool = False
) -> None:
    """PEFT LoRA on the attention projections (to_q/k/v/out.0), as diffusers' SDXL LoRA script does;
    DoRA (`use_dora`) adds PEFT's per-output magnitude vectors, which diffusers saves and loads too."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=lora_alpha or rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
            use_dora=use_dora,
        )
    )


def add_text_encoder_lora(
    encoder: torch.nn.Module, rank: int, lora_alpha: int | None = None, dropout: float = 0.0
) -> list[torch.nn.Parameter]:
    """PEFT LoRA on a CLIP text encoder's attention projections (q/k/v/out_proj), as diffusers' SDXL
    LoRA script does; its A/B matrices in float32 on a frozen encoder. Returns them (trainable).

    PEFT's `inject_adapter_in_model` rather than transformers' `add_adapter`, which wants a newer PEFT
    than diffusers does."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha or rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=TEXT_ENCODER_LORA_TARGETS,
    )
    inject_adapter_in_model(config, encoder)
    params = [p for n, p in encoder.named_parameters() if ".lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def text_encoder_lora_state_dict(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder's LoRA weights in diffusers' format, without the encoder's prefix."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))


def text_encoders_lora_state(text_encoders) -> dict[str, torch.Tensor]:
    """Both encoders' LoRA weights behind their ``text_encoder.`` / ``text_encoder_2.`` prefixes."""
    return {
        f"{prefix}.{k}": v
        for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, text_encoders)
        for k, v in text_encoder_lora_state_dict(encoder).items()
    }


def load_lora_into_text_encoders(text_encoders, path: str | os.PathLike) -> None:
    """Copy the ``text_encoder.`` / ``text_encoder_2.`` LoRA weights of a diffusers-format file into
    encoders that already carry the adapter (resume), in place; every adapter weight must be in it."""
    from diffusers.utils import convert_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, text_encoders):
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        want = set(get_peft_model_state_dict(encoder))
        peft = convert_state_dict_to_peft(part)
        if set(peft) != want:
            raise ValueError(
                f"{path}: its {prefix} LoRA does not fit the encoder ({len(want - set(peft))} weights missing, "
                f"{len(set(peft) - want)} unexpected): a checkpoint of a run without --train_text_encoder?"
            )
        set_peft_model_state_dict(encoder, peft, adapter_name="default")


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers' format (what `load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(directory: str | os.PathLike, unet: torch.nn.Module, text_encoders=()) -> Path:
    """Write `pytorch_lora_weights.safetensors` atomically (temp file + rename): the UNet's LoRA and,
    with `text_encoders` (both, each carrying an adapter), theirs under ``text_encoder.`` /
    ``text_encoder_2.``, each with its adapter config, as diffusers' own script writes them."""
    from diffusers import StableDiffusionXLPipeline

    def cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    directory = Path(directory)
    state = cpu(lora_state_dict(unet))
    adapter_config = unet.peft_config["default"].to_dict()
    extra = {}
    for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, text_encoders):
        extra[f"{prefix}_lora_layers"] = cpu(text_encoder_lora_state_dict(encoder))
        extra[f"{prefix}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    tensors = [state] + [v for k, v in extra.items() if k.endswith("_layers")]
    bad = [k for part in tensors for k, v in part.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite LoRA weights (e.g. {bad[0]}): the run diverged")

    def write(tmp: str) -> None:
        tmp_dir = Path(tmp + ".d")
        tmp_dir.mkdir()
        try:
            # The adapter's config goes into the header as diffusers' own script writes it, so that
            # load_lora_weights knows lora_alpha (scale alpha / rank) and DoRA instead of assuming rank / no.
            StableDiffusionXLPipeline.save_lora_weights(
                tmp_dir,
                unet_lora_layers=state,
                safe_serialization=True,
                unet_lora_adapter_metadata=adapter_config,
                **extra,
            )
            os.replace(tmp_dir / LORA_WEIGHTS_NAME, tmp)
        finally:
            for p in tmp_dir.glob("*"):
                p.unlink()
            tmp_dir.rmdir()

    return atomic_write(directory / LORA_WEIGHTS_NAME, write)


def load_lora_into_unet(unet: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a `pytorch_lora_weights.safetensors` into a UNet that already has the adapter (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: LoRA keys that do not fit the UNet: {unexpected[:5]}")


def lora_file_of(path: str | os.PathLike) -> Path:
    """A LoRA file given as itself or as the run folder (or checkpoint) that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no such LoRA file (give a run folder with {LORA_WEIGHTS_NAME}, or the file)")
    return path


def init_lora_from(unet: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Start an installed LoRA from an earlier run's weights (``--init_lora_weights``), after checking
    that the file holds exactly this UNet's LoRA layers with the same shapes (rank, DoRA): a file of
    another model or rank is refused with what differs, and the UNet is left untouched."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = lora_file_of(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors LoRA file ({exc})") from None
    state = {k.removeprefix("unet."): v for k, v in state.items() if not k.startswith(("text_encoder", "te_"))}
    want = {k: tuple(v.shape) for k, v in lora_state_dict(unet).items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or shapes:
        detail = "; ".join(
            part
            for part in (
                f"{len(missing)} layers missing (e.g. {missing[0]})" if missing else "",
                f"{len(extra)} keys this UNet has no LoRA for (e.g. {extra[0]})" if extra else "",
                f"{len(shapes)} shapes differ (e.g. {shapes[0]}: {have[shapes[0]]} in the file, {want[shapes[0]]} here;"
                " another --rank or --use_dora?)"
                if shapes
                else "",
            )
            if part
        )
        raise ValueError(f"{path}: this LoRA does not fit the model being trained: {detail}")
    bad = tensor_value_problems(state)
    if bad:  # a diverged run's file: starting from it would only diverge again
        raise ValueError(f"{path}: {len(bad)} LoRA tensors hold non-finite or non-float values (e.g. {bad[0]})")
    load_lora_into_unet(unet, path)
    return path


#: Config entries of a saved UNet that say where and by which version it was written, not what it is.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_diffusers_version", "_use_default_values")


def tensor_value_problems(state: Mapping[str, object]) -> list[str]:
    """``"<key>: non-finite values"`` or ``"<key>: <dtype> values"`` for every entry of a LoRA state dict
    that is not a float tensor of finite values (a diverged run's file, or a hostile one): such a file
    would load quietly and draw black images, or fail half-way through loading."""
    return [
        f"{k}: non-finite values"
        if isinstance(v, torch.Tensor) and v.is_floating_point()
        else f"{k}: {getattr(v, 'dtype', type(v).__name__)} values"
        for k, v in state.items()
        if not (isinstance(v, torch.Tensor) and v.is_floating_point() and torch.isfinite(v).all())
    ]


def unet_architecture_differences(base_config: Mapping, config: Mapping) -> list[str]:
    """The keys in which a saved full UNet's `config` (its config.json) describes another architecture
    than the base UNet's config; keys the file lacks, paths and versions do not count. Values are
    compared as JSON holds them, so a tuple in a config built in code equals the list in a file."""

    def plain(value):
        return json.loads(json.dumps(value, default=str))

    return sorted(
        k
        for k in base_config
        if k not in _VOLATILE_CONFIG_KEYS and k in config and plain(config[k]) != plain(base_config[k])
    )


def load_full_unet_weights(unet: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy the weights of a UNet saved with ``save_pretrained`` into ``unet`` in place (resume of
    ``--tuning full``: the optimizer keeps referring to the same parameters)."""
    from safetensors.torch import load_file

    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{folder}: no diffusion_pytorch_model.safetensors (not a --tuning full checkpoint)")
    state = load_file(str(path))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")


_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora[._](?:down|up|A|B)|lora_linear_layer\.(?:down|up)|lora_magnitude_vector)"
)


def _lora_key_problem(key: str, tensor: torch.Tensor, modules: Mapping[str, torch.nn.Module]) -> str | None:
    """What is wrong with one ``unet.`` LoRA key for this UNet's modules, or None."""
    match = _LORA_KEY.match(key[len("unet.") :])
    if not match:
        return f"{key}: not a LoRA key diffusers understands"
    path = match.group("module")
    module = modules.get(path)
    if module is None:
        return f"{key}: the UNet has no module '{path}'"
    base = getattr(module, "base_layer", module)  # an already-injected PEFT layer wraps the original
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim not in (2, 4):
        return f"{key}: '{path}' is a {type(base).__name__}, not a Linear or Conv2d layer"
    out_features, in_features = weight.shape[:2]
    rest = key[len("unet.") + match.end("module") :]
    is_down = any(t in rest for t in ("down", "lora_A", "lora.A"))
    is_up = any(t in rest for t in ("up", "lora_B", "lora.B"))
    if tensor.ndim >= 2 and is_down and tensor.shape[1] != in_features:
        return f"{key}: input size {tensor.shape[1]}, but '{path}' takes {in_features}"
    if tensor.ndim >= 2 and is_up and tensor.shape[0] != out_features:
        return f"{key}: output size {tensor.shape[0]}, but '{path}' gives {out_features}"
    return None


def lora_problems(unet: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Mismatches between a LoRA state dict (diffusers format, ``unet.`` prefix) and a UNet.

    Every ``unet.`` key must name a Linear or Conv2d module of the UNet, with a down (A) matrix whose
    input size and an up (B) matrix whose output size fit that module. Returns readable problems
    (empty list: it fits). Text-encoder keys are left to diffusers.
    """
    modules = dict(unwrap_unet(unet).named_modules())
    problems = (
        _lora_key_problem(key, tensor, modules) for key, tensor in state_dict.items() if key.startswith("unet.")
    )
    return [p for p in problems if p is not None]
