"""What a `Trainer` holds, sorted by how it survives a resume: checkpointed, rebuilt, or per process.

A resume is complete when everything that changes while training is either written into the
checkpoint or rebuilt exactly from the flags and the restored step. This table says which is which
for every attribute `Trainer` (train/loop.py) sets, with where it comes back from; tests/test_layout.py
reads loop.py and fails when an attribute is missing here or listed twice, so a new piece of state
must be placed before it lands.
"""

from __future__ import annotations

#: Restored from the checkpoint folder by `accelerator.load_state` and the load hook
#: (train/checkpoints.py `register_hooks`; files listed in the checkpoint's manifest).
CHECKPOINTED: dict[str, str] = {
    "global_step": "dreamcoeff_state.json (global_step); data order and skipped batches follow from it",
    "unet": "the method's trained parts: coeff_weights / LoRA file / unet folder, copied in place",
    "bare_unet": "the same module as unet (unwrapped)",
    "coeff_params": "alpha, copied into these very tensors (the optimizer keeps them)",
    "weight_params": "LoRA or UNet weights, copied in place",
    "tokens": "the learned tokens' embeddings file",
    "te_lora": "the text encoders' LoRA (text_encoder.* keys of the LoRA file)",
    "optimizer": "optimizer.bin (moments, step counts; changed rate flags re-applied after)",
    "lr_scheduler": "scheduler.bin (its step position)",
    "ema": "accelerate's custom checkpoint (shadow weights)",
    "accelerator": "random_states_<rank>.pkl: the RNG states it saved",
}

#: Built again at every start from the flags, the base model and the restored step: equal on a
#: resume to what the interrupted run had.
REBUILT: dict[str, str] = {
    "cfg": "the flags (structural ones must match the checkpoint's args.json)",
    "method": "--tuning and --train_text_encoder_ti",
    "plan": "the token plan from the flags",
    "out": "--output_dir",
    "tokens_name": "the output folder's name",
    "resume_path": "--resume_from_checkpoint, decided on the main process",
    "components": "the base model, loaded again",
    "vae": "the base model's (or --pretrained_vae_model_name_or_path's) VAE",
    "weight_dtype": "--mixed_precision",
    "device": "accelerate's device for this rank",
    "class_paths": "the class folder (prior preservation)",
    "instance_paths": "the instance folder / --dataset_config / --dataset_name",
    "dataset_captions": "the dataset's captions",
    "dataset_config": "--dataset_config (its SHA-256 is compared on resume)",
    "dataset": "the images and captions above",
    "sampler": "bucket batches drawn from (seed, epoch)",
    "dataloader": "the dataset and sampler; resumed at the restored step's batch",
    "text": "prompt encoders and caption cache; freezes at the restored step if due",
    "validation_prompts": "--validation_prompt(s)",
    "batches_per_epoch": "the dataset size and process count",
    "updates_per_epoch": "the same and --gradient_accumulation_steps",
    "max_steps": "--max_train_steps or epochs x updates per epoch",
    "num_epochs": "the same",
    "trainable": "a count of the parameters above",
    "unet_total": "a count of the UNet's parameters",
    "latent_cache": "--cache_latents(_to_disk): pure cache, content-addressed",
}

#: This process's own run: progress, timing, the last step's values, the stop request. None of it
#: changes the weights; a resumed run starts them afresh.
PER_PROCESS: dict[str, str] = {
    "started": "wall-clock start (the summary's time)",
    "step_times": "step timing for the summary's speed",
    "last_loss": "the last step's loss for the summary",
    "loss": "the current step's loss tensor",
    "bad_steps": "consecutive non-finite steps (a resume restarts the count)",
    "step_bad": "whether the current step was non-finite",
    "bar": "the progress bar",
    "validation_paths": "the newest validation's images (model card)",
    "validated_step": "the step of this process's newest validation",
    "stop_signal": "the SIGTERM request of this process",
}


def classification() -> dict[str, str]:
    """attribute -> its group ("checkpointed", "rebuilt", "per process"); names in two groups raise."""
    groups = {"checkpointed": CHECKPOINTED, "rebuilt": REBUILT, "per process": PER_PROCESS}
    found: dict[str, str] = {}
    for group, names in groups.items():
        for name in names:
            if name in found:
                raise ValueError(f"Trainer.{name} is listed as both {found[name]} and {group}")
            found[name] = group
    return found
