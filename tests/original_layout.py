"""Write a diffusers SDXL pipeline as one original-layout checkpoint (the ``.safetensors`` files shared on
Civitai: ``model.diffusion_model.*``, ``conditioner.embedders.{0,1}.*``, ``first_stage_model.*``).

Support module for tests/test_single_file.py, not a test file. The key mapping is written out here
from the original (Stability's ``sgm`` / ``ldm``, OpenCLIP) module names, independently of diffusers'
converter, so that loading the file back through ``from_single_file`` is a real check of the product
code's loading path rather than a round trip through one piece of code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."
VAE = "first_stage_model."

_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _rename(state: dict[str, torch.Tensor], old: str, new: str, out: dict[str, torch.Tensor], renames=None) -> None:
    """Move every key under `old.` to `new.` (with the leaf-module renames given), popping it from `state`."""
    for key in [k for k in state if k.startswith(old + ".")]:
        rest = key[len(old) + 1 :]
        head, _, tail = rest.partition(".")
        if renames and head in renames:
            rest = f"{renames[head]}.{tail}"
        out[f"{new}.{rest}"] = state.pop(key)


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under SDXL's original names (``input_blocks`` / ``middle_block`` / ``output_blocks``)."""
    state = dict(unet.state_dict())
    cfg = unet.config
    levels, per = len(cfg.block_out_channels), cfg.layers_per_block
    out: dict[str, torch.Tensor] = {}
    _rename(state, "conv_in", "input_blocks.0.0", out)
    _rename(state, "time_embedding.linear_1", "time_embed.0", out)
    _rename(state, "time_embedding.linear_2", "time_embed.2", out)
    _rename(state, "add_embedding.linear_1", "label_emb.0.0", out)
    _rename(state, "add_embedding.linear_2", "label_emb.0.2", out)
    for i in range(levels):
        for j in range(per):
            block = 1 + i * (per + 1) + j
            _rename(state, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0", out, _RESNET_UNET)
            _rename(state, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1", out)
        if i < levels - 1:
            _rename(state, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (per + 1) + per}.0.op", out)
    _rename(state, "mid_block.resnets.0", "middle_block.0", out, _RESNET_UNET)
    _rename(state, "mid_block.attentions.0", "middle_block.1", out)
    _rename(state, "mid_block.resnets.1", "middle_block.2", out, _RESNET_UNET)
    for i in range(levels):
        has_attention = "CrossAttn" in cfg.up_block_types[i]
        for j in range(per + 1):
            block = i * (per + 1) + j
            _rename(state, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", out, _RESNET_UNET)
            _rename(state, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{block}.1", out)
        if i < levels - 1:
            block, slot = i * (per + 1) + per, 2 if has_attention else 1
            _rename(state, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{block}.{slot}.conv", out)
    _rename(state, "conv_norm_out", "out.0", out)
    _rename(state, "conv_out", "out.2", out)
    assert not state, f"UNet keys the original layout has no place for: {sorted(state)[:5]}"
    return {UNET + k: v for k, v in out.items()}


_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTENTION_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_mid(state: dict[str, torch.Tensor], side: str, out: dict[str, torch.Tensor]) -> None:
    _rename(state, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", out, _RESNET_VAE)
    _rename(state, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", out, _RESNET_VAE)
    prefix = f"{side}.mid_block.attentions.0."
    for key in [k for k in state if k.startswith(prefix)]:
        head, _, leaf = key[len(prefix) :].partition(".")
        leaf = leaf.removeprefix("0.")  # to_out.0.weight -> proj_out.weight
        value = state.pop(key)
        if head != "group_norm" and value.ndim == 2:  # the original attention is 1x1 convolutions
            value = value[:, :, None, None]
        out[f"{side}.mid.attn_1.{_ATTENTION_VAE[head]}.{leaf}"] = value


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under the original ``encoder.down.N.block.M`` / ``decoder.up.N`` names (the
    decoder's levels numbered from the lowest resolution up, the reverse of diffusers' order)."""
    state = dict(vae.state_dict())
    cfg = vae.config
    levels, per = len(cfg.block_out_channels), cfg.layers_per_block
    out: dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        _rename(state, f"{side}.conv_in", f"{side}.conv_in", out)
        _rename(state, f"{side}.conv_norm_out", f"{side}.norm_out", out)
        _rename(state, f"{side}.conv_out", f"{side}.conv_out", out)
        _vae_mid(state, side, out)
    for i in range(levels):
        for j in range(per):
            _rename(state, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", out, _RESNET_VAE)
        _rename(state, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", out)
        level = levels - 1 - i
        for j in range(per + 1):
            _rename(state, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", out, _RESNET_VAE)
        _rename(state, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", out)
    for name in ("quant_conv", "post_quant_conv"):
        _rename(state, name, name, out)
    assert not state, f"VAE keys the original layout has no place for: {sorted(state)[:5]}"
    return out


def clip_l_to_original(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP ViT-L keeps transformers' names in the original file, under ``text_model.``."""
    state = text_encoder.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        out[CLIP_L + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    return out


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_g_to_original(text_encoder_2) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG's names: ``transformer.resblocks.N`` with q, k, v stacked into ``in_proj``, and
    ``text_projection`` stored transposed (width x projection)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
        "logit_scale": torch.tensor(4.6052),  # in every OpenCLIP checkpoint; not part of the text model
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for old, new in _OPENCLIP_LAYER.items():
                out[f"{dst}{new}.{kind}"] = state.pop(f"{src}{old}.{kind}")
    assert not state, f"text_encoder_2 keys the original layout has no place for: {sorted(state)[:5]}"
    return {CLIP_G + k: v for k, v in out.items()}


def original_state_dict(pipe, *, vae: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of an SDXL pipeline under the original checkpoint's names (the VAE optional)."""
    state = {**unet_to_original(pipe.unet), **clip_l_to_original(pipe.text_encoder)}
    state.update(clip_g_to_original(pipe.text_encoder_2))
    if vae:
        state.update({VAE + k: v for k, v in vae_to_original(pipe.vae).items()})
    return state


def save_original_checkpoint(pipe, path: Path, *, vae: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` as one original-layout ``.safetensors`` file at `path` (optionally cast to `dtype`)."""
    state = original_state_dict(pipe, vae=vae)
    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return Path(path)
