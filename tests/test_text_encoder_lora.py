"""LoRA on both text encoders (``--train_text_encoder``) and ``--clip_skip`` (issue 33 part 3).

The references are independent of the trainer's code: diffusers' own ``encode_prompt`` for the
prompt encoding, diffusers' own ``load_lora_weights`` for both LoRA files, the untouched base
encoders for what must not change, and an uninterrupted run for a resumed one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamcoeff import load_coeff_weights, load_run, unload_run
from dreamcoeff.kohya import kohya_key
from dreamcoeff.models import encode_prompt_batch
from dreamcoeff.train import list_checkpoints, main
from dreamcoeff.train.config import UsageError, parse_args
from dreamcoeff.train.text import TextConditioning
from dreamcoeff.train.text_encoder_lora import TextEncoderLora
from tests.helpers import assert_same_tensors, make_images, snapshot_tensors, validation_pipeline
from tests.trainer_runs import LORA, run_killed_after_checkpoint, trainer_argv

PROMPTS = ["a photo of sks dog", "a red cube on a table"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def _encoders(pipe):
    return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]


def _base_weights(encoder) -> dict[str, torch.Tensor]:
    """An encoder's own weights (PEFT's wrapper names folded back), without any LoRA matrix."""
    state = snapshot_tensors(encoder)
    return {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}


# ------------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize("clip_skip", [None, 0, 1])  # the tiny encoders have 2 layers
def test_trainer_encoding_is_the_pipelines_encode_prompt(tiny_pipe, clip_skip):
    """The trainer's prompt embeddings (live and cached) are exactly diffusers' encode_prompt(clip_skip=N)."""
    tokenizers, encoders = _encoders(tiny_pipe)
    parts = SimpleNamespace(tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], text_encoder=encoders[0],
                            text_encoder_2=encoders[1])  # fmt: skip
    text = TextConditioning(parts, torch.device("cpu"), torch.float32, PROMPTS, clip_skip=clip_skip)
    cached_embeds, cached_pooled = text(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            theirs, _, pooled, _ = tiny_pipe.encode_prompt(
                prompt, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip
            )
            live, live_pooled = encode_prompt_batch([prompt], tokenizers, encoders, "cpu", clip_skip)
        assert torch.equal(live, theirs) and torch.equal(live_pooled, pooled)
        assert torch.equal(cached_embeds[i : i + 1], theirs) and torch.equal(cached_pooled[i : i + 1], pooled)
    with torch.no_grad():  # and the setting is read: another layer gives other embeddings
        default, _ = encode_prompt_batch(PROMPTS[:1], tokenizers, encoders, "cpu")
        skipped, _ = encode_prompt_batch(PROMPTS[:1], tokenizers, encoders, "cpu", 1)
    assert not torch.equal(default, skipped)


def test_clip_skip_beyond_the_encoders_is_refused(tiny_pipe):
    parts = SimpleNamespace(tokenizer=tiny_pipe.tokenizer, tokenizer_2=tiny_pipe.tokenizer_2,
                            text_encoder=tiny_pipe.text_encoder, text_encoder_2=tiny_pipe.text_encoder_2)  # fmt: skip
    layers = tiny_pipe.text_encoder.config.num_hidden_layers
    with pytest.raises(UsageError, match="skips more layers than the text encoders have"):
        TextConditioning(parts, torch.device("cpu"), torch.float32, PROMPTS, clip_skip=layers)


def test_text_encoder_lora_trains_only_its_own_weights_and_freezes_on_time(tiny_pipe):
    """AdamW with weight decay over the adapters of both encoders: every base weight stays bit-identical,
    the LoRA moves (so the encoding does); without the flag the part is empty and the encoders untouched."""
    tokenizers, encoders = _encoders(tiny_pipe)
    base = [_base_weights(e) for e in encoders]
    with torch.no_grad():
        before, _ = encode_prompt_batch(PROMPTS, tokenizers, encoders, "cpu")
    off = TextEncoderLora.install(tiny_pipe, SimpleNamespace(train_text_encoder=False))
    assert off.params == [] and off.frozen and off.parameter_groups(None) == []
    assert all(not any(".lora_" in n for n, _ in e.named_parameters()) for e in encoders)

    cfg = SimpleNamespace(train_text_encoder=True, rank=2, lora_alpha=4, text_encoder_lora_lr=5e-2,
                          learning_rate=1e-4, adam_weight_decay=1e-2, gradient_checkpointing=False)  # fmt: skip
    lora = TextEncoderLora.install(tiny_pipe, cfg)
    assert len(lora.params) == 2 * 4 * 2 * 2  # 2 encoders x 2 layers x q/k/v/out x A/B
    assert {p.dtype for p in lora.params} == {torch.float32} and all(p.requires_grad for p in lora.params)
    (group,) = lora.parameter_groups(cfg)
    assert group["lr"] == 5e-2 and group["rate_flag"] == "--text_encoder_lora_lr"
    opt = torch.optim.AdamW([group])
    for _ in range(3):
        embeds, pooled = encode_prompt_batch(PROMPTS, tokenizers, encoders, "cpu")
        (embeds.square().mean() + pooled.square().mean()).backward()
        opt.step()
        opt.zero_grad()
    for encoder, weights in zip(encoders, base):
        assert_same_tensors(_base_weights(encoder), weights)
    with torch.no_grad():
        after, _ = encode_prompt_batch(PROMPTS, tokenizers, encoders, "cpu")
    assert (after - before).abs().max() > 1e-4

    lora.set_schedule(max_steps=4, fraction=0.5)  # trains steps 1-2
    assert not lora.freeze_if_due(1) and not lora.frozen
    assert lora.freeze_if_due(2) and lora.frozen and not any(p.requires_grad for p in lora.params)
    lora.set_schedule(max_steps=4, fraction=1.0)
    assert lora.steps is None  # every step: no freeze after the last one


def test_gradient_checkpointing_reaches_the_text_encoders_lora_with_the_same_gradients(tiny_pipe):
    """--gradient_checkpointing with --train_text_encoder: the encoders keep fewer activations for the
    backward pass (they recompute them) and their LoRA gets the gradients it gets without (float64)."""
    import copy

    def lora_grads(checkpointing: bool):
        pipe = copy.deepcopy(tiny_pipe)
        for e in (pipe.text_encoder, pipe.text_encoder_2):
            e.double()
        cfg = SimpleNamespace(train_text_encoder=True, rank=2, lora_alpha=4, gradient_checkpointing=checkpointing)
        lora = TextEncoderLora.install(pipe, cfg)
        tokenizers, encoders = _encoders(pipe)
        for p in lora.params:  # B starts at 0: move it so that A gets a gradient too
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
        saved = []  # every tensor autograd keeps for the backward pass: checkpointing keeps fewer

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            embeds, pooled = encode_prompt_batch(PROMPTS, tokenizers, encoders, "cpu")
        (embeds.square().mean() + pooled.square().mean()).backward()
        kept = sum(saved)
        return [None if p.grad is None else p.grad.clone() for p in lora.params], kept

    plain, kept_plain = lora_grads(False)
    checkpointed, kept_ckpt = lora_grads(True)
    assert kept_ckpt < 0.7 * kept_plain, (kept_ckpt, kept_plain)  # the layers' activations are recomputed
    assert [g is None for g in checkpointed] == [g is None for g in plain]
    assert sum(g is not None and g.abs().max() > 0 for g in plain) >= len(plain) * 3 // 4
    for a, b in zip(plain, checkpointed):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--tuning", "coeff", "--train_text_encoder"), "needs --tuning lora or coeff\\+lora"),
        (("--tuning", "full", "--train_text_encoder"), "needs --tuning lora or coeff\\+lora"),
        (("--tuning", "none", "--train_text_encoder_ti", "--instance_prompt", "a TOK", "--train_text_encoder"),
         "needs --tuning lora"),
        (("--tuning", "lora", "--train_text_encoder", "--use_dora"), "--use_dora is not supported"),
        (("--tuning", "lora", "--train_text_encoder", "--train_text_encoder_frac", "0"), "must be in \\(0, 1\\]"),
        (("--tuning", "lora", "--train_text_encoder", "--train_text_encoder_frac", "1.5"), "must be in \\(0, 1\\]"),
        (("--tuning", "lora", "--text_encoder_lora_lr", "1e-4"), "add --train_text_encoder"),
        (("--tuning", "lora", "--train_text_encoder", "--text_encoder_lora_lr", "0"), "must be > 0"),
        (("--clip_skip", "-1"), "--clip_skip must be >= 0"),
    ],
)  # fmt: skip
def test_combinations_that_cannot_work_are_refused(extra, message):
    argv = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "p", *extra]
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_flags_parse():
    argv = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "p", "--tuning", "lora"]
    cfg = parse_args([*argv, "--train_text_encoder", "--train_text_encoder_frac", "0.5", "--clip_skip", "1"])
    assert (cfg.train_text_encoder, cfg.train_text_encoder_frac, cfg.clip_skip) == (True, 0.5, 1)
    assert (cfg.text_encoder_lora_lr, parse_args(argv).train_text_encoder, parse_args(argv).clip_skip) == (
        None,
        False,
        None,
    )


# ------------------------------------------------------------------------------------------------ runs


def _image(pipe, prompt="a photo of sks dog on the beach", clip_skip=None) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0),
               clip_skip=clip_skip)  # fmt: skip
    return np.asarray(out.images[0]).astype(np.int16)


def _layer_names(model_dir) -> set[str]:
    """The kohya name of every Linear of the UNet's attention blocks and of both encoders (from the
    module tree of an untouched pipeline, so a key that names no module is caught)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    lpb = pipe.unet.config.layers_per_block
    names = {
        kohya_key(p, lpb)
        for p, m in pipe.unet.named_modules()
        if isinstance(m, torch.nn.Linear) and ".attentions." in p
    }
    for prefix, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        names |= {kohya_key(f"{prefix}.{p}", lpb) for p, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    return names


def _part(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


@pytest.mark.slow
def test_text_encoder_lora_run_with_alpha_saves_both_files_and_loads_back(tiny_pipeline_dir, tmp_path):
    """coeff+lora with --train_text_encoder (first half of 3 steps): both LoRA files carry both encoders'
    LoRA, the adapters stop after step 2, and load_run / diffusers' own loader (with either file) draw
    what the in-training model drew."""
    inst = make_images(tmp_path / "inst", ((64, 64),) * 3, 0)
    out = tmp_path / "run"
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--tuning", "coeff+lora", "--max_train_steps", 3,
                        "--checkpointing_steps", 1, "--coeff_lr", "5e-2", "--learning_rate", "5e-2",
                        "--train_text_encoder", "--train_text_encoder_frac", "0.5", "--text_encoder_lora_lr", "5e-2",
                        "--validation_prompt", "a photo of sks dog on the beach",
                        "--num_validation_images", 1, "--validation_steps", 100, "--validation_inference_steps", 2)  # fmt: skip
    assert main(argv) == 0
    final = load_file(str(out / LORA))
    assert {k.split(".", 1)[0] for k in final} == {"unet", "text_encoder", "text_encoder_2"}
    # trained (up matrices start at zero). Not every layer: SDXL reads the first encoder's penultimate
    # layer, so its last layer's LoRA gets no gradient (as in diffusers' script; more with --clip_skip)
    for prefix in ("text_encoder", "text_encoder_2"):
        assert any(v.abs().max() > 0 for k, v in _part(final, prefix).items() if ".up." in k), prefix
    ckpt = [load_file(str(out / f"checkpoint-{s}" / LORA)) for s in (1, 2)]
    # --train_text_encoder_frac 0.5 of 3 steps: the adapters train on steps 1 and 2, not on step 3
    assert_same_tensors(_part(final, "text_encoder"), _part(ckpt[1], "text_encoder"))
    assert_same_tensors(_part(final, "text_encoder_2"), _part(ckpt[1], "text_encoder_2"))
    assert any(not torch.equal(ckpt[0][k], ckpt[1][k]) for k in _part(final, "text_encoder"))
    assert any(not torch.equal(ckpt[1][k], final[k]) for k in _part(final, "unet"))  # the UNet's LoRA still trained

    ui = load_file(str(out / "run.safetensors"))
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in ui}
    assert {k.split("_", 2)[1] for k in layers} == {"unet", "te1", "te2"}
    assert layers <= _layer_names(tiny_pipeline_dir), sorted(layers - _layer_names(tiny_pipeline_dir))[:3]
    assert len(layers) * 2 == len(final) and {v.dtype for v in ui.values()} == {torch.float16}
    with safe_open(str(out / "run.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_train_unet_only"], meta["ss_text_encoder_lr"], meta["ss_clip_skip"]) == (
        "False",
        "0.05",
        "None",
    )
    card = (out / "README.md").read_text()
    assert "LoRA rank 4 on both CLIP encoders" in card and "text encoders' LoRA 0.05" in card

    trained = np.asarray(Image.open(out / "validation" / "step_00003" / "prompt00_seed0.png")).astype(np.int16)
    pipe = validation_pipeline(tiny_pipeline_dir)
    base = _image(pipe)
    base_te = [snapshot_tensors(pipe.text_encoder), snapshot_tensors(pipe.text_encoder_2)]
    loaded = load_run(pipe, out)
    assert loaded.parts == ["alpha", "lora"]
    assert "lora_A" in "".join(n for n, _ in pipe.text_encoder_2.named_parameters())
    via_load_run = _image(pipe)
    assert np.abs(via_load_run - trained).max() <= 1  # the in-training model's image (8-bit PNG)
    assert np.abs(via_load_run - base).max() > 0
    unload_run(pipe, loaded)
    assert_same_tensors(pipe.text_encoder, base_te[0])  # the base encoders again: module tree and tensors
    assert_same_tensors(pipe.text_encoder_2, base_te[1])
    assert np.array_equal(_image(pipe), base)

    # diffusers' own loader, on each file: the same images; without the encoders' part, other ones
    images = {}
    for name, weight in (("diffusers", LORA), ("ui", "run.safetensors"), ("unet only", "unet_only.safetensors")):
        if name == "unet only":
            save_file(_part(final, "unet"), str(out / weight))
        pipe = validation_pipeline(tiny_pipeline_dir)
        pipe.load_lora_weights(str(out), weight_name=weight)
        load_coeff_weights(pipe, out)
        images[name] = _image(pipe)
    assert np.array_equal(images["diffusers"], via_load_run)
    assert np.abs(images["ui"] - images["diffusers"]).max() <= 2  # fp16 rounding of the UI file
    assert np.abs(images["unet only"] - images["diffusers"]).max() > 2  # the te1 / te2 weights were read


@pytest.mark.slow
def test_resume_with_text_encoder_lora_and_tokens_matches_uninterrupted(tiny_pipeline_dir, tmp_path, monkeypatch):
    """LoRA on the UNet and both encoders with learned tokens, killed after checkpoint 1 (both text parts
    still training: their optimizer state must come back) and resumed: the same weights as an
    uninterrupted run; resuming without --train_text_encoder is refused."""
    inst = make_images(tmp_path / "inst", ((64, 64),) * 3, 0)

    def argv(out, *extra):
        args = trainer_argv(tiny_pipeline_dir, inst, out, "--tuning", "lora", "--max_train_steps", 3,
                            "--checkpointing_steps", 1, "--learning_rate", "1e-2", "--lr_scheduler", "linear",
                            "--train_text_encoder", "--train_text_encoder_frac", "0.6", "--train_text_encoder_ti",
                            "--text_encoder_lr", "1e-2", "--clip_skip", 1, *extra)  # fmt: skip
        return [a.replace("sks", "TOK") for a in args]

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(argv(ref)) == 0
    run_killed_after_checkpoint(monkeypatch, 1, argv(run))
    assert [s for s, _ in list_checkpoints(run)] == [1]
    assert main(argv(run, "--resume_from_checkpoint", "latest")) == 0
    for name in (LORA, "_emb.safetensors"):
        want = load_file(str(ref / (name if name == LORA else "ref" + name)))
        got = load_file(str(run / (name if name == LORA else "run" + name)))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key
    start, end = load_file(str(run / "checkpoint-1" / LORA)), load_file(str(ref / LORA))
    assert any(not torch.equal(start[k], end[k]) for k in _part(start, "text_encoder_2"))  # it trained after 1

    card = (run / "README.md").read_text()
    assert "clip_skip=1" in card and "learned tokens" in card and "LoRA rank 4 on both CLIP encoders" in card
    without = [a for a in argv(run, "--resume_from_checkpoint", "latest") if a != "--train_text_encoder"]
    assert main(without) == 2  # a usage error: the checkpoint's LoRA files hold the encoders' adapters


def test_sampler_renders_with_the_pipelines_clip_skip(tiny_pipe):
    """The sampler's --clip_skip reaches the pipeline: its base row is diffusers' own pipe(clip_skip=1)."""
    from dreamcoeff import sample as S

    def rendered(clip_skip):
        result = S.sample_runs(tiny_pipe, [], ["a dog"], [0], include_base=True, num_inference_steps=2, height=64,
                               width=64, progress=False, clip_skip=clip_skip)  # fmt: skip
        assert result.settings["clip_skip"] == clip_skip
        return np.asarray(result.image(result.find("base", 0, 0))).astype(np.int16)

    theirs = tiny_pipe("a dog", num_inference_steps=2, height=64, width=64, clip_skip=1,
                       generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    ours = rendered(1)
    assert np.array_equal(ours, np.asarray(theirs).astype(np.int16))
    assert np.abs(ours - rendered(None)).max() > 0
    with pytest.raises(S.SamplingError, match="--clip_skip must be >= 0"):
        rendered(-1)
    flag = next(a for a in S.build_parser()._actions if "--clip_skip" in a.option_strings)
    assert flag.type is int and flag.default is None
