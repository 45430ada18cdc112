"""Training configuration: one dataclass that is also the command line.

Each field of `TrainConfig` carries its flag's help text, group and choices in its metadata, so the
argparse parser, `--config FILE` (YAML or TOML) and `args.json` all come from one definition.
Flag names follow diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py` where it has one.
Booleans are `store_true` switches, or `--x / --no-x` where on by default (never `type=bool`, where
"False" would parse as True).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..methods import METHODS
from ..processor import COEFF_STRUCTURES
from .coeff_options import validate_coeff_options
from .errors import UsageError  # defined below this module; importers keep `from .config import UsageError`
from .text_encoder_lora import validate_text_side


def _f(default, help, group, choices=None, aliases=(), nargs=None, action=None):
    return field(
        default=default,
        metadata=dict(help=help, group=group, choices=choices, aliases=aliases, nargs=nargs, action=action),
    )


MODEL, DATA, METHOD, TOKENS, TRAIN, OPTIM, PRIOR, CKPT, VALID, SYSTEM = (
    "model",
    "data",
    "method (Coeff-Tuning / LoRA)",
    "learned tokens (pivotal tuning)",
    "training",
    "optimizer",
    "prior preservation",
    "checkpoints and output",
    "validation and logging",
    "speed and memory",
)


@dataclass
class TrainConfig:
    """Every setting of a dreamcoeff training run (see `--help` for each flag)."""

    # model
    pretrained_model_name_or_path: str | None = _f(
        None,
        "SDXL base: a hub id, a local diffusers folder, or one original-layout .safetensors checkpoint "
        "(with --base_config_dir) (required)",
        MODEL,
    )
    pretrained_vae_model_name_or_path: str | None = _f(
        None,
        "a better VAE (e.g. an fp16-safe one): a folder, hub id or one .safetensors file; by default the model's "
        "own VAE, kept in float32",
        MODEL,
    )
    base_config_dir: str | None = _f(
        None,
        "with a single-file base: a local SDXL diffusers folder whose configs and tokenizers describe it (no "
        "weights needed; never downloaded)",
        MODEL,
    )
    revision: str | None = _f(None, "hub revision of the model", MODEL)
    variant: str | None = _f(None, "weight variant to load, e.g. fp16", MODEL)

    # data
    instance_data_dir: str | None = _f(
        None, "folder of instance images (jpg/png/webp) of the subject (required)", DATA, aliases=("--instance_dir",)
    )
    instance_prompt: str | None = _f(
        None,
        "prompt with the identifier, e.g. 'a photo of sks dog' (required unless every image has a caption file)",
        DATA,
    )
    caption_ext: str | None = _f(
        None, "read per-image captions from sidecar files with this extension, e.g. .txt (name.jpg -> name.txt)", DATA
    )
    dataset_name: str | None = _f(
        None,
        "instead of --instance_data_dir: a local Hugging Face dataset (an image folder with metadata.jsonl; with the "
        "`datasets` extra parquet files, metadata.csv, save_to_disk), one row per image with its caption; offline",
        DATA,
    )
    dataset_config: str | None = _f(
        None,
        "instead of --instance_data_dir: a TOML file of several image folders in kohya sd-scripts' layout "
        "([general], [[datasets]], [[datasets.subsets]] with image_dir, num_repeats, caption_extension, is_reg, "
        "class_tokens, caption_dropout_rate, shuffle_caption, keep_tokens); see docs/training.md",
        DATA,
    )
    image_column: str = _f("image", "--dataset_name: the column of images (bytes or paths; else 'file_name')", DATA)
    caption_column: str = _f("text", "--dataset_name: the column holding each caption", DATA)
    caption_dropout: float = _f(
        0.0, "probability of training an instance image with the empty prompt (kohya's caption_dropout_rate)", DATA
    )
    trigger_word: str | None = _f(
        None, "replaces [trigger] in captions, the instance prompt and validation prompts (e.g. sks)", DATA
    )
    resolution: int = _f(1024, "training resolution (pixels of the square, or the area of each aspect bucket)", DATA)
    square_crop: bool = _f(False, "square crops like diffusers' script instead of aspect-ratio buckets", DATA)
    center_crop: bool = _f(False, "center crops instead of random crops", DATA)
    random_flip: bool = _f(False, "random horizontal flips", DATA)
    repeats: int = _f(1, "repeat the instance images this many times per epoch", DATA)
    skip_bad_images: bool = _f(False, "skip unreadable images with a warning instead of stopping", DATA)
    masked_loss: bool = _f(
        False,
        "weight the loss by a per-image mask: name.mask.png beside the image, else its alpha channel (white / opaque "
        "= learn, black / transparent = ignore), cropped, flipped and resized with its image",
        DATA,
    )
    dataloader_num_workers: int = _f(0, "data loading worker processes", DATA)

    # method
    tuning: str = _f(
        "coeff",
        "what to train: Coeff-Tuning alpha, LoRA, both, every UNet weight (full fine-tuning, the DreamBooth paper's "
        "baseline), or none of the UNet (with --train_text_encoder_ti: learned tokens only)",
        METHOD,
        choices=tuple(METHODS),
    )
    coeff_targets: str = _f(
        "both",
        "attention modules that get alpha: self- (attn1), cross- (attn2) or both",
        METHOD,
        choices=("attn1", "attn2", "both"),
    )
    coeff_dropout: float = _f(
        0.1, "coefficient dropout on alpha's elements (the paper's ablation found 0.1-0.2 best)", METHOD
    )
    coeff_lr: float = _f(1e-3, "learning rate of alpha (its own param group)", METHOD)
    coeff_zero_row_sum: bool = _f(
        False,
        "after every step, make each row of alpha sum to zero, so A only redistributes between the heads' maps and "
        "never scales a head's output (not in the paper; see benchmarks/micro/puzzle)",
        METHOD,
    )
    coeff_structure: str = _f(
        "full",
        "which entries of alpha train: the paper's full H x H matrix, the diagonal only (a gain per head, no "
        "mixing) or the off-diagonal only (mixing, no own-map gain); the rest is held at exactly 0",
        METHOD,
        choices=COEFF_STRUCTURES,
    )
    rank: int = _f(4, "LoRA rank", METHOD)
    lora_alpha: int | None = _f(None, "LoRA scaling numerator (default: = rank)", METHOD)
    lora_dropout: float = _f(0.0, "dropout in the LoRA layers", METHOD)
    use_dora: bool = _f(False, "DoRA (weight-decomposed LoRA, PEFT's use_dora) for the LoRA modes", METHOD)
    train_text_encoder: bool = _f(
        False,
        "also train LoRA on both CLIP text encoders' attention projections (same rank and alpha; needs a LoRA "
        "--tuning); saved in both LoRA files (text_encoder. / lora_te1_, lora_te2_ keys)",
        METHOD,
    )
    train_text_encoder_frac: float = _f(
        1.0, "--train_text_encoder: share of the steps the text encoders' LoRA trains; then it freezes", METHOD
    )
    text_encoder_lora_lr: float | None = _f(
        None,
        "learning rate of the text encoders' LoRA (default: --learning_rate; --text_encoder_lr is the tokens' own)",
        METHOD,
    )
    init_coeff_weights: str | None = _f(
        None,
        "start alpha from this coeff_weights.safetensors (or a run folder holding one): a new run, not a resume",
        METHOD,
    )
    init_lora_weights: str | None = _f(
        None,
        "start LoRA from this run folder's (or file's) pytorch_lora_weights.safetensors: a new run, not a resume",
        METHOD,
    )

    # learned tokens (pivotal tuning), named as in diffusers' train_dreambooth_lora_sdxl_advanced.py
    train_text_encoder_ti: bool = _f(
        False, "also learn new identifier tokens in both text encoders (textual inversion / pivotal tuning)", TOKENS
    )
    token_abstraction: str = _f(
        "TOK",
        "the word(s) in the instance prompt, captions and validation prompts that stand for the new tokens "
        "(comma-separated for several)",
        TOKENS,
    )
    num_new_tokens_per_abstraction: int = _f(2, "new tokens per abstraction (TOK -> <s0><s1>)", TOKENS)
    train_text_encoder_ti_frac: float = _f(
        0.5, "share of the steps during which the tokens train; then they freeze and prompts are cached again", TOKENS
    )
    text_encoder_lr: float = _f(
        5e-3, "learning rate of the token embeddings (chosen on the micro world, see benchmarks/README.md)", TOKENS
    )
    initializer_concept: str | None = _f(
        None, "start the new tokens from this word's embedding (e.g. the class word); default: random", TOKENS
    )

    # training
    train_batch_size: int = _f(1, "batch size per device", TRAIN)
    max_train_steps: int | None = _f(None, "total optimizer steps (overrides --num_train_epochs)", TRAIN)
    num_train_epochs: int = _f(1, "epochs, used when --max_train_steps is not given", TRAIN)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", TRAIN)
    max_grad_norm: float = _f(1.0, "gradient clipping norm", TRAIN)
    snr_gamma: float | None = _f(
        None, "Min-SNR loss weighting gamma (5.0 is the paper's choice); off by default", TRAIN
    )
    noise_offset: float = _f(0.0, "noise offset (0.0357 is common for SDXL)", TRAIN)
    prediction_type: str | None = _f(
        None,
        "what the UNet predicts: epsilon or v_prediction (default: the model's scheduler's; given, it wins over "
        "the scheduler's, with a warning where they differ, for training and the validation images)",
        TRAIN,
        choices=("epsilon", "v_prediction"),
    )
    rescale_betas_zero_snr: bool = _f(
        False,
        "rescale the noise schedule to zero terminal SNR (Lin et al. 2023; use with v_prediction); validation "
        "samples with trailing timesteps then",
        TRAIN,
    )
    loss_type: str = _f(
        "l2",
        "per-element loss: l2 (MSE), huber (pseudo-Huber 2c(sqrt(d^2 + c^2) - c)) or smooth_l1 "
        "(2(sqrt(d^2 + c^2) - c)), as kohya's with a constant --huber_c",
        TRAIN,
        choices=("l2", "huber", "smooth_l1"),
    )
    huber_c: float = _f(0.1, "the c of --loss_type huber / smooth_l1", TRAIN)
    debiased_estimation_loss: bool = _f(
        False,
        "weight each example's loss by 1 / sqrt(SNR) (1 / (SNR + 1) with v_prediction), SNR capped at 1000, as "
        "kohya's; composes with --snr_gamma (the weights multiply)",
        TRAIN,
    )
    min_timestep: int = _f(0, "smallest training timestep drawn (inclusive)", TRAIN)
    max_timestep: int | None = _f(
        None, "training timesteps are drawn below this (exclusive; default: the scheduler's 1000)", TRAIN
    )
    clip_skip: int | None = _f(
        None,
        "read the text encoders this many layers before SDXL's usual penultimate one (the pipeline's clip_skip: "
        "hidden_states[-(N + 2)]); pass the same to the sampler",
        TRAIN,
    )
    seed: int = _f(0, "seed for data order, augmentation, noise and validation", TRAIN)
    max_bad_steps: int = _f(10, "stop after this many consecutive steps with a non-finite loss or gradient", TRAIN)
    use_ema: bool = _f(
        False,
        "keep an exponential moving average of the trainable UNet weights (alpha, LoRA, or the UNet) and save it "
        "as the final weights (diffusers' EMAModel; part of checkpoints; learned tokens are not averaged)",
        TRAIN,
    )
    ema_decay: float = _f(
        0.999, "EMA decay, reached after a warm-up of (1 + n) / (10 + n) (diffusers' EMAModel)", TRAIN
    )

    # optimizer
    learning_rate: float = _f(
        1e-4,
        "learning rate of the LoRA weights (of the whole UNet with --tuning full; 5e-6 is the usual DreamBooth value there)",
        OPTIM,
    )
    lr_scheduler: str = _f(
        "constant",
        "learning-rate schedule",
        OPTIM,
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = _f(0, "warm-up steps of the schedule", OPTIM)
    lr_num_cycles: int = _f(1, "hard restarts of cosine_with_restarts (diffusers' get_scheduler num_cycles)", OPTIM)
    lr_power: float = _f(1.0, "power of the polynomial schedule", OPTIM)
    optimizer: str = _f(
        "adamw",
        "AdamW, or Prodigy (pip install prodigyopt; learning rates are then multipliers of the rate it finds: use 1.0)",
        OPTIM,
        choices=("adamw", "prodigy"),
    )
    use_8bit_adam: bool = _f(False, "bitsandbytes' 8-bit AdamW (pip install bitsandbytes)", OPTIM)
    prodigy_beta3: float | None = _f(
        None, "Prodigy's beta3 for its step-size estimate (default: the square root of beta2)", OPTIM
    )
    prodigy_decouple: bool = _f(True, "Prodigy: AdamW-style decoupled weight decay", OPTIM)
    prodigy_use_bias_correction: bool = _f(True, "Prodigy: Adam's bias correction", OPTIM)
    prodigy_safeguard_warmup: bool = _f(
        True, "Prodigy: remove the learning rate from the denominator during warm-up", OPTIM
    )
    adam_beta1: float = _f(0.9, "AdamW beta1", OPTIM)
    adam_beta2: float = _f(0.999, "AdamW beta2", OPTIM)
    adam_weight_decay: float = _f(
        1e-4, "AdamW weight decay of LoRA weights (alpha gets none: decay pulls it to the base model)", OPTIM
    )
    adam_epsilon: float = _f(1e-8, "AdamW epsilon", OPTIM)

    # prior preservation
    with_prior_preservation: bool = _f(False, "add the prior-preservation loss on class images (square crops)", PRIOR)
    class_data_dir: str | None = _f(
        None, "folder of class images; missing ones are generated with the base model", PRIOR
    )
    class_prompt: str | None = _f(None, "prompt of the class images, e.g. 'a photo of a dog'", PRIOR)
    num_class_images: int = _f(100, "class images wanted; missing ones are generated", PRIOR)
    prior_loss_weight: float = _f(1.0, "weight of the prior-preservation loss", PRIOR)
    sample_batch_size: int = _f(4, "batch size when generating class images", PRIOR)
    class_generation_steps: int = _f(25, "inference steps when generating class images", PRIOR)

    # checkpoints and output
    output_dir: str = _f("dreamcoeff-output", "where weights, checkpoints, model card and validation images go", CKPT)
    overwrite_output_dir: bool = _f(False, "allow writing into an output dir that holds a previous run", CKPT)
    checkpointing_steps: int = _f(500, "save a resumable checkpoint every N optimizer steps (0: never)", CKPT)
    checkpoints_total_limit: int | None = _f(None, "keep at most this many checkpoints", CKPT)
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder to continue from", CKPT)
    output_kohya_format: bool | None = _f(
        None,
        "the UI-ready LoRA: <output_dir>/<run name>.safetensors in kohya's key layout with kohya's ss_* metadata "
        "and modelspec tags (A1111 and ComfyUI load it as an SDXL LoRA). Written by default by every LoRA mode "
        "but DoRA; --no-ui_lora skips it; given explicitly, a mode without LoRA (or DoRA) is refused. Alpha has "
        "no such form",
        CKPT,
        aliases=("--ui_lora",),
        action=argparse.BooleanOptionalAction,
    )
    save_precision: str = _f(
        "fp16",
        "dtype of the UI-ready LoRA file's tensors (the diffusers-format file stays float32)",
        CKPT,
        choices=("fp16", "bf16", "float"),
    )

    # validation and logging
    validation_prompt: list[str] | None = _f(None, "prompt for validation images (repeatable)", VALID, action="append")
    validation_prompts: str | None = _f(
        None,
        "text file of validation prompts, one per line (blank lines and # comments skipped), with kohya's inline "
        "options: --n negative prompt, --w width, --h height, --d seed, --l guidance scale, --s steps; "
        "rendered after the --validation_prompt ones",
        VALID,
    )
    validation_negative_prompt: str | None = _f(None, "negative prompt of the validation images", VALID)
    validation_guidance_scale: float = _f(
        5.0, "classifier-free guidance scale of the validation images (SDXL pipeline's default)", VALID
    )
    validation_height: int | None = _f(None, "height of the validation images (default: --resolution)", VALID)
    validation_width: int | None = _f(None, "width of the validation images (default: --resolution)", VALID)
    validation_at_start: bool = _f(
        False, "also render the validation images at step 0, before training (not again on a resume)", VALID
    )
    num_validation_images: int = _f(4, "images per validation prompt", VALID)
    validation_steps: int = _f(100, "run validation every N optimizer steps (and at the end)", VALID)
    validation_inference_steps: int = _f(25, "inference steps of validation images", VALID)
    validation_coeff_scales: list[float] | None = _f(
        None,
        "also render every validation prompt at each of these alpha strengths (0 = the base model), same seeds, "
        "into one labelled strip per validation step (strengths.png)",
        VALID,
        nargs="+",
    )
    report_to: str = _f(
        "tensorboard",
        "tracker for logs: tensorboard, wandb, all or none (skipped with a note when not installed)",
        VALID,
    )
    logging_dir: str = _f("logs", "tracker folder, relative to --output_dir", VALID)

    # speed and memory
    mixed_precision: str | None = _f(
        None,
        "fp16 / bf16 activations and frozen weights (trainable ones stay float32)",
        SYSTEM,
        choices=("no", "fp16", "bf16"),
    )
    allow_tf32: bool = _f(False, "allow TF32 matmuls on Ampere+ GPUs", SYSTEM)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (UNet, TE LoRA)", SYSTEM)
    enable_xformers_memory_efficient_attention: bool = _f(
        False, "xformers for plain attention (layers without alpha; alpha layers keep exact mixing)", SYSTEM
    )
    cache_latents: bool = _f(False, "encode each augmentation variant with the VAE once and reuse it", SYSTEM)
    cache_latents_to_disk: bool = _f(
        False,
        "keep the VAE latents of every augmentation variant on disk and reuse them across runs (keyed by the image's "
        "bytes, its bucket, crop and flip, and the VAE's weights: never a stale entry)",
        SYSTEM,
    )
    latent_cache_dir: str | None = _f(
        None, "where --cache_latents_to_disk keeps them (default: ~/.cache/dreamcoeff/latents)", SYSTEM
    )
    coeff_chunk_size: int | None = _f(
        None, "query rows per chunk in the exact mixed attention (default: from a memory budget)", SYSTEM
    )
    coeff_attention_impl: str = _f(
        "auto",
        "how alpha layers compute the exact mixed attention: auto (the fused C++ kernel on the CPU, chunked PyTorch on GPUs), chunked, cpu_fused (the fused C++ kernel, built on first use; needs a C++ compiler), or triton (fused Triton kernels: CUDA, `pip install triton`; untimed on a GPU so far, see benchmarks/README.md)",
        SYSTEM,
        choices=("auto", "chunked", "cpu_fused", "triton"),
    )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_dreambooth_coeff.py",
        description="DreamBooth for SDXL with Coeff-Tuning (alpha), LoRA, or both, on accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML or TOML file supplying any flag; the command line wins")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        names = [f"--{f.name}", *meta["aliases"]]
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"], "default": f.default}
        if f.type in ("bool", bool):
            # a switch that is on by default gets its --no-<name> form (never type=bool: "False" is truthy)
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif meta["action"]:
            kwargs["action"] = meta["action"]
        else:
            kwargs["type"] = _scalar_type(f.type)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["nargs"]:
                kwargs["nargs"] = meta["nargs"]
        group.add_argument(*names, **kwargs)
    return parser


def _scalar_type(annotation: str):
    text = str(annotation).removeprefix("list[")  # a list flag (nargs) parses each value as its element type
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or TOML config; keys are flag names without dashes."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: file not found")
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        else:
            import yaml

            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except Exception as exc:
        raise UsageError(f"--config {path}: cannot parse it ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    data = {k.replace("-", "_").lstrip("_"): v for k, v in data.items()}
    data.pop("dataset_config_sha256", None)  # args.json's digest of the --dataset_config file, not a flag
    unknown = sorted(k for k in data if k not in FIELDS)
    if unknown:
        raise UsageError(f"--config {path}: unknown setting(s) {unknown}; see --help for the flag names")
    if data.get("validation_prompt") is not None and isinstance(data["validation_prompt"], str):
        data["validation_prompt"] = [data["validation_prompt"]]
    return data


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line (and optional --config file) -> validated `TrainConfig`."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    ns = vars(parser.parse_args(argv))
    ns.pop("config")
    cfg = TrainConfig(**ns)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Refuse missing or contradicting settings with a message that says what to do."""
    if not cfg.pretrained_model_name_or_path:
        raise UsageError("--pretrained_model_name_or_path is required (e.g. stabilityai/stable-diffusion-xl-base-1.0)")
    sources = [f"--{n}" for n in ("instance_data_dir", "dataset_name", "dataset_config") if getattr(cfg, n)]
    if not sources:
        raise UsageError(
            "--instance_data_dir (or --instance_dir) is required: the folder with photos of your subject "
            "(or --dataset_name: an image folder with metadata.jsonl captions, or --dataset_config: a TOML file "
            "of several folders)"
        )
    if len(sources) > 1:
        raise UsageError(f"give one of {' / '.join(sources)}, not both")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise UsageError(f"--caption_dropout must be in [0, 1), got {cfg.caption_dropout}")
    if not cfg.instance_prompt and not cfg.caption_ext and not cfg.dataset_name and not cfg.dataset_config:
        raise UsageError(
            "--instance_prompt is required (e.g. 'a photo of sks dog'), unless --caption_ext gives per-image captions"
        )
    reg = validate_dataset_config(cfg) if cfg.dataset_config else False
    if cfg.with_prior_preservation and reg:
        if cfg.class_data_dir:
            raise UsageError(
                "--dataset_config has is_reg subsets, which are the class images: drop --class_data_dir "
                "(or the is_reg subsets)"
            )
    elif cfg.with_prior_preservation:
        if not cfg.class_prompt:
            raise UsageError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
        if not cfg.class_data_dir:
            raise UsageError("--with_prior_preservation needs --class_data_dir (generated images are stored there)")
    elif cfg.class_data_dir or cfg.class_prompt:
        raise UsageError(
            "--class_data_dir / --class_prompt are only used with --with_prior_preservation; add it or drop them"
        )
    positive = [
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "rank",
        "repeats",
        "num_validation_images",
        "validation_steps",
        "max_bad_steps",
    ]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        raise UsageError(f"--max_train_steps must be >= 1, got {cfg.max_train_steps}")
    if cfg.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {cfg.resolution}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise UsageError("--checkpoints_total_limit must be >= 1")
    if cfg.checkpointing_steps < 0:
        raise UsageError("--checkpointing_steps must be >= 0 (0 disables checkpoints)")
    if cfg.learning_rate <= 0 or cfg.coeff_lr <= 0:
        raise UsageError("--learning_rate and --coeff_lr must be > 0")
    validate_text_side(cfg)  # learned tokens, the text encoders' LoRA, --clip_skip
    validate_method_options(cfg)
    validate_loss_options(cfg)
    validate_validation(cfg)


def dataset_config_of(cfg: TrainConfig):
    """The parsed --dataset_config (`dataset_config.DatasetConfig`), the flags supplying its defaults;
    raises `UsageError` naming the line and key of what is wrong."""
    from .dataset_config import read_dataset_config

    defaults = {"num_repeats": cfg.repeats, "caption_dropout_rate": cfg.caption_dropout}
    if cfg.caption_ext:
        defaults["caption_extension"] = cfg.caption_ext
    buckets = not (cfg.square_crop or cfg.with_prior_preservation)
    flags = {"resolution": cfg.resolution, "batch_size": cfg.train_batch_size, "enable_bucket": buckets}
    return read_dataset_config(
        cfg.dataset_config,
        defaults=defaults,
        flags=flags,
        instance_prompt=cfg.instance_prompt,
        class_prompt=cfg.class_prompt,
    )


def validate_dataset_config(cfg: TrainConfig) -> bool:
    """Parse --dataset_config now, before any model loads; True where it has is_reg (class) subsets."""
    parsed = dataset_config_of(cfg)
    if parsed.reg_subsets and not cfg.with_prior_preservation:
        raise UsageError(
            f"{parsed.reg_subsets[0].name}: is_reg subsets are prior preservation's class images: add "
            "--with_prior_preservation (--prior_loss_weight weighs them), or drop is_reg"
        )
    return bool(parsed.reg_subsets)


def validate_validation(cfg: TrainConfig) -> None:
    """The validation flags: sizes the VAE can decode, a prompt file that parses, something to render."""
    from .validation_prompts import read_prompt_file

    for name in ("validation_height", "validation_width"):
        value = getattr(cfg, name)
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"--{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if cfg.validation_guidance_scale < 0:
        raise UsageError(f"--validation_guidance_scale must be >= 0, got {cfg.validation_guidance_scale}")
    if cfg.validation_prompts:
        read_prompt_file(cfg.validation_prompts)  # a bad line stops the run here, not at the first validation
    if cfg.validation_coeff_scales and not (cfg.validation_prompt or cfg.validation_prompts):
        raise UsageError(
            "--validation_coeff_scales needs --validation_prompt or --validation_prompts (the prompts to render)"
        )


def validate_method_options(cfg: TrainConfig) -> None:
    """DoRA, the kohya file, the init weights and the optimizer must fit the chosen --tuning."""
    method = METHODS[cfg.tuning]
    for flag, wanted in (("use_dora", "LoRA"), ("output_kohya_format", "LoRA"), ("init_lora_weights", "LoRA")):
        if getattr(cfg, flag) and not method.lora:
            raise UsageError(f"--{flag} needs a {wanted} mode (--tuning lora or coeff+lora), not --tuning {cfg.tuning}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise UsageError(f"--ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.use_ema and not method.trains_unet:
        raise UsageError("--use_ema averages the UNet's trainable weights; --tuning none has none")
    validate_coeff_options(cfg)  # alpha's flags: dropout, constraints, init file, strength sweep
    if cfg.output_kohya_format and cfg.use_dora:
        raise UsageError(
            "--output_kohya_format does not write DoRA (A1111 and ComfyUI read DoRA magnitudes differently); "
            "drop one of the two flags: the diffusers-format file holds the DoRA weights"
        )
    if (cfg.init_coeff_weights or cfg.init_lora_weights) and cfg.resume_from_checkpoint:
        raise UsageError(
            "--init_coeff_weights / --init_lora_weights start a new run; --resume_from_checkpoint continues one: "
            "use one of them"
        )
    if cfg.optimizer == "prodigy" and cfg.use_8bit_adam:
        raise UsageError("--use_8bit_adam is AdamW's; with --optimizer prodigy drop it")
    if cfg.prodigy_beta3 is not None and not 0.0 < cfg.prodigy_beta3 < 1.0:
        raise UsageError(f"--prodigy_beta3 must be in (0, 1), got {cfg.prodigy_beta3}")


def validate_loss_options(cfg: TrainConfig) -> None:
    """The schedule and loss flags: values their formulas accept, a timestep range that is not empty."""
    if cfg.lr_num_cycles < 1:
        raise UsageError(f"--lr_num_cycles must be >= 1, got {cfg.lr_num_cycles}")
    if cfg.lr_power <= 0:
        raise UsageError(f"--lr_power must be > 0, got {cfg.lr_power}")
    if cfg.huber_c <= 0:
        raise UsageError(f"--huber_c must be > 0, got {cfg.huber_c}")
    if cfg.min_timestep < 0:
        raise UsageError(f"--min_timestep must be >= 0, got {cfg.min_timestep}")
    if cfg.max_timestep is not None and cfg.max_timestep <= cfg.min_timestep:
        raise UsageError(
            f"--max_timestep ({cfg.max_timestep}) must be above --min_timestep ({cfg.min_timestep}): timesteps "
            "are drawn from min_timestep up to, not including, max_timestep"
        )


def writes_ui_lora(cfg: TrainConfig) -> bool:
    """Whether the run writes the UI-ready LoRA file: every LoRA mode but DoRA, unless --no-ui_lora."""
    return cfg.output_kohya_format is not False and METHODS[cfg.tuning].lora and not cfg.use_dora


def defaults() -> dict[str, Any]:
    return {name: (f.default if f.default is not MISSING else None) for name, f in FIELDS.items()}
