"""SDXL base's real sizes (its published UNet config, both text encoders' widths), built nowhere.

For counting parameters on the meta device (the README's table, a test of the layout) and for the
GPU benchmarks at SDXL's shapes; nothing here downloads anything.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SDXL_BASE_UNET_CONFIG", "SDXL_TEXT_ENCODER_WIDTHS", "sdxl_unet_config"]

#: The published config of stabilityai/stable-diffusion-xl-base-1.0's UNet.
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

#: Token-embedding widths of SDXL's two text encoders: CLIP ViT-L (clip_l) and OpenCLIP ViT-bigG (clip_g).
SDXL_TEXT_ENCODER_WIDTHS = (768, 1280)


def sdxl_unet_config() -> dict[str, Any]:
    """A fresh copy of SDXL base's UNet config (lists copied, so callers may edit it)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in SDXL_BASE_UNET_CONFIG.items()}
