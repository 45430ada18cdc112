"""The DreamBooth training loop for SDXL, in phases: preflight, build, data, optimizer, steps, finalize.

`train(cfg)` runs one training of any tuning method (`methods.get_method(cfg.tuning, tokens)` says what is
trained, saved and loaded) through one code path. Every random draw of a step (noise, timesteps,
VAE sampling, dropout) is seeded from (seed, micro-step, rank), and data order and augmentation from
(seed, epoch): a resumed run sees exactly what an uninterrupted one would, with the same weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write
from ..kohya import kohya_file_name
from ..loading import initialize_parts
from ..locking import FolderBusyError, FolderLock
from ..methods import get_method
from ..models import base_model_flags, check_base_model, load_components
from ..processor import set_plain_attention_backend
from ..tokens import LearnedTokens, TokenPlan, embeddings_file_name
from . import coeff_options, data, optim, ranks
from .card import TrainResult, print_summary, write_model_card
from .checkpoints import (
    STATE_NAME,
    TrainingError,
    check_resume_args,
    clean_output_dir,
    completed_run,
    has_previous_run,
    list_checkpoints,
    recorded_result,
    register_hooks,
    resolve_resume,
    run_args_json,
    save_checkpoint,
    stage_final_files,
    write_completion_record,
    write_failed_message,
)
from .config import TrainConfig, UsageError, dataset_config_of, writes_ui_lora
from .dataset_source import read_dataset, substitute_trigger
from .latent_cache import DiskLatentCache, LatentCache, MemoryLatentCache, default_cache_dir, vae_fingerprint
from .runtime import check_ranks_agree, peak_memory, select_attention_impl, usable_trackers
from .step import denoising_loss, encode_latents, training_scheduler, with_class_batch
from .stopping import StopRequest, TrainingStopped
from .text import TextConditioning
from .text_encoder_lora import TextEncoderLora
from .validation import ensure_class_images, log_alpha, run_validation
from .validation_prompts import validation_prompts

logger = logging.getLogger("dreamcoeff")


class Trainer:
    """One run's state, built phase by phase; `train()` calls the phases in order."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.method = get_method(cfg.tuning, tokens=cfg.train_text_encoder_ti)
        self.plan = (
            TokenPlan.make(cfg.token_abstraction, cfg.num_new_tokens_per_abstraction) if self.method.tokens else None
        )
        self.tokens: LearnedTokens | None = None
        self.out = Path(cfg.output_dir)
        self.tokens_name = embeddings_file_name(self.out)
        self.started = time.time()
        self.global_step = 0
        self.validation_paths: list[Path] = []  # the newest validation's images (main process)
        self.validated_step: int | None = None  # the step of this process's newest validation (every rank)
        self.step_times: list[float] = []
        self.last_loss: float | None = None
        self.stop_signal: StopRequest | None = None  # set by train(): SIGTERM asks for a stop

    @property
    def text_side_params(self) -> list[torch.nn.Parameter]:
        """The learned tokens' rows and the text encoders' LoRA weights (both encoders), or none."""
        return (list(self.tokens.rows) if self.tokens is not None else []) + self.te_lora.params

    # ---- the output folder: one run at a time --------------------------------------------------------

    @contextlib.contextmanager
    def lock_output(self) -> Iterator[None]:
        """Hold the exclusive lock on --output_dir (`dreamcoeff.locking`) for the body's duration. The
        main process takes it, before anything reads the folder for a decision or cleans it; the others
        wait for its verdict, so a run on a folder in use stops on every rank with the same UsageError."""
        accelerator, out = self.accelerator, self.out
        lock, verdict = None, None
        if accelerator.is_main_process:
            try:
                lock = FolderLock(out, flag="--output_dir").acquire()
            except FolderBusyError as exc:
                verdict = str(exc)
            except OSError as exc:
                verdict = f"--output_dir {out}: cannot take its lock ({exc.strerror or exc})"
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            verdict = broadcast_object_list([verdict], from_process=0)[0]
        if verdict is not None:
            if lock is not None:
                lock.release()
            raise UsageError(verdict)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    # ---- preflight: cheap checks before loading gigabytes of model ---------------------------------

    def preflight(self) -> TrainResult | None:
        """Refuse a folder holding another run; a completed identical run returns its result (nothing
        to do); check the data and the checkpoint to resume."""
        cfg, out = self.cfg, self.out
        check_base_model(*base_model_flags(cfg))  # headers and configs only: a wrong base file stops here
        resuming = bool(cfg.resume_from_checkpoint)
        if has_previous_run(out) and not (cfg.overwrite_output_dir or resuming):
            raise UsageError(
                f"--output_dir {out} holds a previous run; pass --overwrite_output_dir to replace it, "
                "--resume_from_checkpoint latest to continue it, or choose another --output_dir"
            )
        if resuming and cfg.resume_from_checkpoint == "latest":
            record = completed_run(cfg, out)
            if record is not None:
                logger.info(
                    "%s holds a completed run with these arguments (%d steps): nothing to do",
                    out,
                    record["global_step"],
                )
                print(
                    f"dreamcoeff: {out} is already complete ({record['global_step']} steps); nothing to do", flush=True
                )
                return recorded_result(out, record, time.time() - self.started)
        self.dataset_captions: dict[Path, str] = {}
        self.dataset_config = dataset_config_of(cfg) if cfg.dataset_config else None  # several folders (TOML)
        if self.dataset_config is not None:
            self.instance_paths = [p for s in self.dataset_config.instance_subsets for p in s.images]
        elif cfg.dataset_name:  # a local dataset (metadata.jsonl, parquet, ...): images and their captions
            rows = read_dataset(cfg.dataset_name, cfg.image_column, cfg.caption_column)
            self.instance_paths = [path for path, _ in rows]
            self.dataset_captions = dict(rows)
        else:
            self.instance_paths = data.list_images(cfg.instance_data_dir, what="instance")
        self.resume_path = self.decided_on_main_process(lambda: resolve_resume(cfg, out))
        if self.resume_path is not None:
            check_resume_args(cfg, self.resume_path)
        return None

    # ---- build: processes, models, trainable parts --------------------------------------------------

    def build_accelerator(self) -> None:
        """accelerate's Accelerator (gloo on CPU-only multi-process launches). It touches no file: it
        comes first so that the processes can agree on the output folder's lock."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg, out = self.cfg, self.out
        # `accelerate launch --multi_gpu` without CUDA: gloo on the CPU, not N independent copies
        cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            cpu=cpu_distributed,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=usable_trackers(cfg.report_to),
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        )
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(cfg.seed)

    def prepare_output_dir(self) -> None:
        """Create the output folder; clean what interrupted runs left (and, with --overwrite_output_dir
        without resuming, the replaced run's checkpoints). Runs under the folder's lock, after preflight."""
        cfg, out = self.cfg, self.out
        if self.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            clean_output_dir(out, drop_checkpoints=cfg.overwrite_output_dir and self.resume_path is None)

    def build_models(self) -> None:
        """Load SDXL, freeze it in the mixed-precision dtype, install the method's trainable parts."""
        cfg, accelerator = self.cfg, self.accelerator
        components = load_components(*base_model_flags(cfg))
        # --prediction_type / --rescale_betas_zero_snr: training and validation both use the result
        components.noise_scheduler = training_scheduler(components.noise_scheduler, cfg, logger.warning)
        self.components = components
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )
        self.device = accelerator.device
        unet, vae = components.unet, components.vae
        for model in (unet, vae, components.text_encoder, components.text_encoder_2):
            model.requires_grad_(False)
        # The SDXL VAE overflows in fp16 (NaN latents): keep it in float32 unless a fixed VAE is given.
        vae.to(self.device, dtype=torch.float32 if cfg.pretrained_vae_model_name_or_path is None else self.weight_dtype)
        unet.to(self.device, dtype=self.method.unet_dtype(self.weight_dtype))
        components.text_encoder.to(self.device, dtype=self.weight_dtype)
        components.text_encoder_2.to(self.device, dtype=self.weight_dtype)

        self.class_paths: list[Path] = []
        if cfg.with_prior_preservation and not (self.dataset_config and self.dataset_config.reg_subsets):
            self.class_paths = ensure_class_images(cfg, components, accelerator)  # else: the is_reg subsets

        self.method.install(unet, cfg)
        self.te_lora = TextEncoderLora.install(components, cfg)  # --train_text_encoder: both CLIP encoders
        for flag, coeff_file, lora_file in (
            ("--init_coeff_weights", cfg.init_coeff_weights, None),
            ("--init_lora_weights", None, cfg.init_lora_weights),
        ):
            try:
                for path in initialize_parts(self.method, unet, coeff_file, lora_file):
                    logger.info("%s: starting from %s (a new run: step 0, fresh optimizer)", flag, path)
            except ValueError as exc:  # CoeffWeightsError, or a LoRA file that does not fit the model
                raise UsageError(f"{flag}: {exc}") from None
        if cfg.enable_xformers_memory_efficient_attention:
            set_plain_attention_backend(unet, "xformers")
        select_attention_impl(cfg.coeff_attention_impl, accelerator.device, unet)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet, self.vae = unet, vae
        self.coeff_params, self.weight_params = self.method.trainable_parameters(unet)
        coeff_options.start_constrained(self.coeff_params, cfg)  # before EMA's copy and the first step
        if self.method.tokens:
            c = components
            self.tokens = LearnedTokens(self.plan, [c.tokenizer, c.tokenizer_2], [c.text_encoder, c.text_encoder_2],
                                        cfg.initializer_concept, seed=cfg.seed).to(self.device)  # fmt: skip
        free_alpha = coeff_options.free_alpha_entries(self.coeff_params, cfg.coeff_structure, cfg.coeff_zero_row_sum)
        self.trainable = free_alpha + sum(p.numel() for p in self.weight_params + self.text_side_params)
        self.unet_total = sum(p.numel() for p in unet.parameters())

    def build_data(self) -> None:
        """Dataset, bucketed batch sampler and loader; every caption encoded once (frozen encoders)."""
        cfg = self.cfg
        # Prior preservation uses square crops so instance and class images share a batch.
        use_buckets = not (cfg.square_crop or cfg.with_prior_preservation)
        # --dataset_config's subsets (with the class images generated into --class_data_dir), else the flags'
        subsets = self.dataset_config.with_classes(self.class_paths, cfg.class_prompt) if self.dataset_config else None
        self.dataset = data.DreamBoothDataset(
            self.instance_paths,
            cfg.instance_prompt or "",
            resolution=cfg.resolution,
            class_images=self.class_paths,
            class_prompt=cfg.class_prompt,
            caption_ext=cfg.caption_ext,
            center_crop=cfg.center_crop,
            random_flip=cfg.random_flip,
            use_buckets=use_buckets,
            repeats=cfg.repeats,
            seed=cfg.seed,
            skip_bad_images=cfg.skip_bad_images,
            warn=logger.warning,
            masked_loss=cfg.masked_loss,
            captions=self.dataset_captions,
            subsets=subsets,
        )
        self.sampler = data.BucketBatchSampler(
            self.dataset, cfg.train_batch_size, seed=cfg.seed, indices=self.dataset.instance_indices
        )
        self.dataloader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=data.collate_examples,
            num_workers=cfg.dataloader_num_workers,
        )
        for ex in self.dataset.examples:  # [trigger] -> --trigger_word, before the learned tokens see it
            if not ex.is_class:
                ex.caption = substitute_trigger(ex.caption, cfg.trigger_word, f"{ex.image_path}: its caption")
        if self.plan is not None:  # instance prompt and captions name the subject by its new tokens
            for ex in self.dataset.examples:
                if ex.is_class:
                    continue
                missing = self.plan.missing_from(ex.caption)
                if missing:  # the tokens would learn nothing from this image (and --tuning none could not step)
                    raise UsageError(
                        f"{ex.image_path}: its caption {ex.caption!r} does not contain the token abstraction "
                        f"{missing[0]!r}; write it where the subject's name goes in every caption"
                    )
                ex.caption = self.plan.replace(ex.caption)
        captions = [ex.caption for ex in self.dataset.examples] + [""]  # "": a dropped caption (cheap to encode)
        self.text = TextConditioning(self.components, self.device, self.weight_dtype, captions, self.tokens,
                                     self.te_lora, cfg.clip_skip)  # fmt: skip
        # --validation_prompt and --validation_prompts FILE, as the model reads them (learned tokens in place)
        plan = self.plan

        def rename(text: str) -> str:  # [trigger] first, then the learned tokens, as for the captions
            text = substitute_trigger(text, cfg.trigger_word, "a validation prompt")
            return plan.replace(text) if plan else text

        self.validation_prompts = validation_prompts(cfg, rename)

    def build_optimizer(self) -> None:
        """AdamW (bitsandbytes' 8-bit AdamW, or Prodigy) over the method's parameter groups; the schedule."""
        from diffusers.optimization import get_scheduler

        cfg, accelerator = self.cfg, self.accelerator
        groups = self.method.parameter_groups(self.unet, cfg, self.tokens)
        self.optimizer = optim.build_optimizer(groups + self.te_lora.parameter_groups(cfg), cfg)
        self.batches_per_epoch = math.ceil(len(self.sampler) / accelerator.num_processes)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * self.updates_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.updates_per_epoch)
        # with --tuning none the tokens are all there is to train: they train on every step
        self.text.set_schedule(self.max_steps, cfg.train_text_encoder_ti_frac if self.method.trains_unet else 1.0)
        self.te_lora.set_schedule(self.max_steps, cfg.train_text_encoder_frac)
        self.ema = None
        if cfg.use_ema:  # the average of what the optimizer steps (tokens excluded)
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.coeff_params + self.weight_params, decay=cfg.ema_decay)
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.max_steps * accelerator.num_processes,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )

    def prepare(self) -> None:
        """Hand everything to accelerate, write args.json, start trackers, resume a checkpoint."""
        cfg, accelerator, out = self.cfg, self.accelerator, self.out
        register_hooks(accelerator, self.method, cfg, self.unet, self.tokens, self.tokens_name, self.te_lora.encoders)
        if self.ema is not None:  # saved and restored with every checkpoint (exact resume)
            accelerator.register_for_checkpointing(self.ema)
        if self.method.trains_unet:
            self.unet, self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(
                self.unet, self.optimizer, self.dataloader, self.lr_scheduler
            )
        else:  # learned tokens only: a UNet without trainable weights must not be wrapped in DDP
            self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(
                self.optimizer, self.dataloader, self.lr_scheduler
            )
        self.bare_unet = accelerator.unwrap_model(self.unet)
        if accelerator.is_main_process:
            atomic_write(out / "args.json", lambda tmp: Path(tmp).write_text(run_args_json(cfg), encoding="utf-8"))
            if accelerator.log_with:  # (accelerator.trackers stays empty until init_trackers)
                accelerator.init_trackers(
                    "dreamcoeff",
                    config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))},
                )
        if self.resume_path is not None:
            fresh = optim.flag_settings(self.optimizer)  # what the flags of this run ask for
            accelerator.load_state(str(self.resume_path))
            state = json.loads((self.resume_path / STATE_NAME).read_text())
            self.global_step = int(state["global_step"])
            # The load hook copies into the existing parameters, so the optimizer still holds them.
            coeff_now, _ = self.method.trainable_parameters(self.bare_unet)
            assert all(a is b for a, b in zip(self.coeff_params, coeff_now))
            self.text.freeze_if_due(self.global_step)
            for change in optim.reapply_flag_settings(self.optimizer, self.lr_scheduler, fresh):
                logger.warning("resuming at step %d: %s", self.global_step, change)
            logger.info("resumed from %s at step %d", self.resume_path, self.global_step)

    # ---- steps ----------------------------------------------------------------------------------------

    def run(self) -> None:
        """The epoch loop, resuming mid-epoch at the exact batch; checkpoints and validation."""
        from tqdm.auto import tqdm

        cfg, accelerator = self.cfg, self.accelerator
        first_epoch = self.global_step // self.updates_per_epoch
        skip_batches = (self.global_step % self.updates_per_epoch) * cfg.gradient_accumulation_steps
        self.latent_cache: LatentCache | None = None
        if cfg.cache_latents_to_disk:
            self.latent_cache = DiskLatentCache(cfg.latent_cache_dir or default_cache_dir(), vae_fingerprint(self.vae))
        elif cfg.cache_latents:
            self.latent_cache = MemoryLatentCache()
        self.bad_steps, self.step_bad = 0, False
        self.bar = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            desc="steps",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        try:  # closed on every way out, so an error message starts on a line of its own
            self.run_epochs(first_epoch, skip_batches)
        finally:
            self.bar.close()

    def run_epochs(self, first_epoch: int, skip_batches: int) -> None:
        """`run`'s loop over epochs and batches, from where a resumed run stands."""
        cfg, accelerator = self.cfg, self.accelerator
        if self.global_step < self.max_steps and self.stop_requested():  # SIGTERM while loading
            self.stop_now(None)
        # --validation_at_start: the model before any step (a resume starts later and does not redo it)
        if cfg.validation_at_start and self.global_step == 0 and self.validation_prompts:
            self.validate(0)
        for epoch in range(first_epoch, self.num_epochs):
            if self.global_step >= self.max_steps:
                break
            loader = self.dataloader
            if epoch == first_epoch and skip_batches:
                loader = accelerator.skip_first_batches(self.dataloader, skip_batches)
            # accelerate sets the epoch of the sampler / dataset from its own counter when iteration
            # starts; give it ours, so resuming in a later epoch reproduces that epoch's order.
            for obj in (loader, self.dataloader, self.sampler, self.dataset):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            micro = epoch * self.batches_per_epoch + (skip_batches if epoch == first_epoch else 0)
            for batch in loader:
                t0 = time.perf_counter()
                micro += 1
                if not self.micro_step(batch, micro):
                    continue
                self.after_update(t0)
                if self.global_step >= self.max_steps:
                    break

    def dropped_captions(self, batch: dict[str, Any], micro: int) -> list[str]:
        """The batch's captions, each instance one replaced by the empty prompt with probability
        --caption_dropout (or its subset's caption_dropout_rate), drawn from (seed, micro-step, rank,
        position) so a resume draws the same."""
        rates = [self.dataset.dropout_rate(i, self.cfg.caption_dropout) for i in batch["indices"]]
        return data.drop_captions(batch["captions"], rates, self.cfg.seed, micro, self.accelerator.process_index)

    def micro_step(self, batch: dict[str, Any], micro: int) -> bool:
        """Forward and backward of one micro-batch; at the end of an accumulation, the optimizer step
        (skipped, and counted, where the loss or a gradient is not finite). True after an update."""
        cfg, accelerator = self.cfg, self.accelerator
        step_seed = data.seed_of(cfg.seed, micro - 1, accelerator.process_index)
        torch.manual_seed(step_seed)  # coefficient / LoRA dropout
        gen = torch.Generator(self.device).manual_seed(step_seed)
        if cfg.with_prior_preservation:
            batch = with_class_batch(batch, self.dataset, cfg, micro, accelerator)
        with accelerator.accumulate(self.unet):
            latents = encode_latents(self.vae, batch, self.dataset, self.latent_cache, gen, self.device)
            scaling = self.vae.config.scaling_factor
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * scaling).to(self.weight_dtype)
            text = self.text(self.dropped_captions(batch, micro))
            loss = denoising_loss(
                self.unet, self.components.noise_scheduler, latents, batch, text, cfg, gen, self.weight_dtype
            )
            finite = accelerator.reduce(torch.isfinite(loss).float().reshape(1), reduction="sum").item()
            if finite == accelerator.num_processes:
                accelerator.backward(loss)
            else:
                self.step_bad = True
            if accelerator.sync_gradients:
                self.optimizer_step()
        self.loss = loss
        return accelerator.sync_gradients

    def optimizer_step(self) -> None:
        """Clip and step, or skip a non-finite step; stop the run after --max_bad_steps in a row."""
        cfg, accelerator = self.cfg, self.accelerator
        self.text.sync_gradients(accelerator)
        params = self.coeff_params + self.weight_params + self.text.trainable()
        norm = (
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if not self.step_bad else torch.tensor(float("nan"))
        )
        if self.step_bad or not torch.isfinite(torch.as_tensor(norm)):
            self.bad_steps += 1
            if getattr(accelerator, "scaler", None) is not None and not self.step_bad:
                # fp16: clipping unscaled the gradients; without a step the scaler must still lower
                # its scale and reset, or the next step's unscale fails ("unscale_() has already been called")
                accelerator.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            logger.warning(
                "step %d: non-finite loss or gradient, step skipped (%d in a row)", self.global_step + 1, self.bad_steps
            )
            if self.bad_steps >= cfg.max_bad_steps:
                self.bar.close()
                kept = list_checkpoints(self.out)
                kept_text = (
                    f"the last good checkpoint, {kept[-1][1]}, is kept"
                    if kept
                    else "no checkpoint had been written (see --checkpointing_steps)"
                )
                raise TrainingError(
                    f"{self.bad_steps} consecutive steps had a non-finite loss or gradient: the run diverged. "
                    f"Lower the learning rate (--coeff_lr {cfg.coeff_lr}, --learning_rate {cfg.learning_rate}), "
                    f"or use --mixed_precision bf16 instead of fp16; {kept_text}, "
                    "and no final weights were written"
                )
        else:
            self.bad_steps = 0
            self.optimizer.step()
            coeff_options.constrain_alpha_(self.coeff_params, cfg.coeff_structure, cfg.coeff_zero_row_sum)  # projected
            if self.ema is not None:
                self.ema.step(self.coeff_params + self.weight_params)
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_bad = False

    def after_update(self, t0: float) -> None:
        """Count the step, log it, and checkpoint / validate when due."""
        cfg, accelerator = self.cfg, self.accelerator
        self.global_step += 1
        step = self.global_step
        self.step_times.append(time.perf_counter() - t0)
        self.last_loss = float(self.loss.detach().item()) if torch.isfinite(self.loss) else float("nan")
        logs = {"loss": self.last_loss, "lr": self.lr_scheduler.get_last_lr()[0]}
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{logs['lr']:.2e}")
        self.bar.update(1)
        accelerator.log(logs, step=step)
        stopping = self.stop_requested()  # SIGTERM: a checkpoint of this step, then stop
        written = None
        if stopping or (cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0):
            if self.bad_steps:  # the same on every rank: the loss check is reduced, the gradients synced
                logger.warning("step %d was skipped: no checkpoint saved, the last good one is kept", step)
            else:
                updates = optim.update_count(self.optimizer)
                written = save_checkpoint(accelerator, self.out, step, cfg.checkpoints_total_limit, updates)
        if stopping:
            self.stop_now(written)
        if step % cfg.validation_steps == 0:
            self.validate(step, with_alpha=True)
        self.text.freeze_if_due(step)

    def validate(self, step: int, with_alpha: bool = False) -> None:
        """Validation images (and with `with_alpha`, alpha's scalars and picture), on the main process;
        every rank calls this at the same steps (`on_main_process`)."""
        cfg, accelerator = self.cfg, self.accelerator
        self.validated_step = step

        def work() -> None:
            if self.validation_prompts:
                self.validation_paths = run_validation(
                    cfg, self.components, self.bare_unet, accelerator, step, self.out, self.validation_prompts
                )
            if with_alpha and self.method.coeff and accelerator.trackers:  # alpha per block, and its picture
                log_alpha(accelerator, self.bare_unet, step)

        self.on_main_process(f"validation at step {step}", work)

    def on_main_process(self, what: str, work: Callable[[], None]) -> None:
        """`ranks.on_main_process` on this run's processes."""
        ranks.on_main_process(self.accelerator, what, work)

    def decided_on_main_process(self, decide: Callable[[], Any]) -> Any:
        """`ranks.decided_on_main_process` on this run's processes."""
        return ranks.decided_on_main_process(self.accelerator, decide)

    def stop_requested(self) -> bool:
        """Whether any process got SIGTERM (`stopping.StopRequest`). A collective (a sum over the
        ranks) that every rank makes at the same points, so all of them stop after the same step."""
        return self.any_rank(self.stop_signal is not None and self.stop_signal.requested)

    def any_rank(self, local: bool) -> bool:
        """`ranks.any_rank` on this run's processes (every rank must call it at the same point)."""
        return ranks.any_rank(self.accelerator, local)

    def stop_now(self, checkpoint: Path | None) -> None:
        """End the run early on SIGTERM: raise `TrainingStopped` naming `checkpoint` (just written) or
        else the newest complete one; the command line prints how to resume."""
        self.bar.close()
        if checkpoint is None:
            kept = list_checkpoints(self.out)
            checkpoint = kept[-1][1] if kept else None
        logger.info(
            "process %d: stopping on SIGTERM at step %d; newest checkpoint: %s",
            self.accelerator.process_index,
            self.global_step,
            checkpoint,
        )
        raise TrainingStopped(
            self.global_step, self.max_steps, self.out, checkpoint, announce=self.accelerator.is_main_process
        )

    # ---- finalize ---------------------------------------------------------------------------------------

    def drop_ddp_wrapper(self) -> None:
        """Free the DDP wrapper while the process group is registered (`ranks.free_ddp_wrapper` says
        why: otherwise the end of a multi-process run can hang). Idempotent; a no-op for one process."""
        if isinstance(self.unet, torch.nn.parallel.DistributedDataParallel):
            holder = [self.unet]  # its last reference, once self.unet is the bare model
            self.unet = self.bare_unet
            ranks.free_ddp_wrapper(self.accelerator, holder)

    def finalize(self) -> TrainResult:
        """Final weight files (all or none), last validation, model card, completion record, summary."""
        cfg, accelerator, out = self.cfg, self.accelerator, self.out
        accelerator.wait_for_everyone()
        check_ranks_agree(accelerator, self.coeff_params + self.weight_params + self.text_side_params)
        if self.ema is not None:  # the final files (and the last validation) hold the average
            self.ema.copy_to(self.coeff_params + self.weight_params)
        files: list[Path] = []

        def write_final_files() -> None:
            meta = {"base_model": cfg.pretrained_model_name_or_path, "training_args": asdict(cfg)}
            meta["prediction_type"] = self.components.noise_scheduler.config.prediction_type
            kohya_name = kohya_file_name(out) if writes_ui_lora(cfg) else None
            files.extend(stage_final_files(self.method, self.bare_unet, out, meta, self.tokens, self.tokens_name,
                                           kohya_name, self.te_lora.encoders))  # fmt: skip

        self.on_main_process("writing the final weights", write_final_files)
        if self.validation_prompts and self.validated_step != self.global_step:  # unless the last step made it
            self.validate(self.global_step)
        self.drop_ddp_wrapper()
        accelerator.end_training()
        result = TrainResult(
            out,
            self.global_step,
            self.trainable,
            self.unet_total,
            time.time() - self.started,
            peak_memory(self.device),
            files,
            self.last_loss,
        )
        if accelerator.is_main_process:
            try:
                files.append(write_model_card(cfg, out, result, self.validation_paths, self.plan))
                files.append(out / "args.json")
                write_completion_record(cfg, result)  # last: the run is complete once every file is in place
            except OSError as exc:
                raise TrainingError(write_failed_message(out, exc)) from exc
            print_summary(result, self.step_times)
        return result


def train(cfg: TrainConfig) -> TrainResult:
    """Run one DreamBooth training described by `cfg`; returns where everything went.

    The output folder is locked for the whole run: on a folder another live run holds, this raises a
    `UsageError` naming it before anything there is touched. While it runs, SIGTERM stops it after the
    current optimizer step with a checkpoint and raises `TrainingStopped` (`stopping`); the signal
    handlers are installed for this call only and the previous ones put back on return.
    """
    trainer = Trainer(cfg)
    with StopRequest() as stop:
        trainer.stop_signal = stop
        trainer.build_accelerator()
        with trainer.lock_output():
            done = trainer.preflight()
            if done is not None:
                return done
            trainer.prepare_output_dir()
            trainer.build_models()
            trainer.build_data()
            trainer.build_optimizer()
            try:
                trainer.prepare()
                trainer.run()
                return trainer.finalize()
            finally:  # also on errors and SIGTERM, before the traceback keeps the wrapper alive
                trainer.drop_ddp_wrapper()
