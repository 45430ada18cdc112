"""dreamcoeff: DreamBooth-style SDXL customization with Coeff-Tuning (and LoRA).

Coeff-Tuning (Miao, Chen and Qiu, CVPR 2025) learns one H x H matrix per attention layer that
remixes the heads' attention maps: O^h = sum_i (I + c*alpha)[h, i] softmax(Q^i K^i^T s + M) V^h.

The public API is re-exported here; the layout (attention/, processor, weights, methods, train/,
sample/, testing/) is described in docs/DESIGN.md section 5.
"""

from .attention import coefficient_matrix, mixed_attention
from .loading import LoadedRun, RunFiles, RunLoadError, load_run, read_run, unload_run
from .methods import METHODS, TuningMethod, get_method
from .processor import (
    CoeffAttnProcessor,
    apply_coeff,
    coeff_modules,
    coeff_parameters,
    coeff_state_dict,
    remove_coeff,
    set_coeff_attention_impl,
    set_coeff_scale,
    set_coeff_target_scales,
    set_plain_attention_backend,
)
from .weights import COEFF_WEIGHTS_NAME, CoeffWeightsError, load_coeff_weights, read_coeff_file, save_coeff_weights

__version__ = "0.1.0"

__all__ = [
    "CoeffAttnProcessor",
    "apply_coeff",
    "remove_coeff",
    "coeff_modules",
    "coeff_parameters",
    "coeff_state_dict",
    "set_coeff_scale",
    "set_coeff_attention_impl",
    "set_coeff_target_scales",
    "set_plain_attention_backend",
    "save_coeff_weights",
    "load_coeff_weights",
    "read_coeff_file",
    "CoeffWeightsError",
    "COEFF_WEIGHTS_NAME",
    "coefficient_matrix",
    "mixed_attention",
    "METHODS",
    "TuningMethod",
    "get_method",
    "load_run",
    "unload_run",
    "read_run",
    "LoadedRun",
    "RunFiles",
    "RunLoadError",
]
