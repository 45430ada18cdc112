"""Learned identifier tokens (pivotal tuning): only the new rows train, files load with diffusers'
own loader, every mode trains / saves / reloads, load_run and its inverse, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreamcoeff import load_coeff_weights, load_run, unload_run
from dreamcoeff.models import encode_prompt_batch
from dreamcoeff.tokens import LearnedTokens, TokenError, TokenPlan, load_embeddings_into, read_embeddings_file
from dreamcoeff.train import list_checkpoints, main
from tests.helpers import assert_same_tensors, make_images, snapshot_tensors, validation_pipeline

PROMPT = "a photo of TOK dog"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def _args(model_dir, inst, out, *extra):
    base = ["--pretrained_model_name_or_path", model_dir, "--instance_dir", inst, "--instance_prompt", PROMPT,
            "--output_dir", out, "--resolution", 64, "--report_to", "none", "--checkpointing_steps", 0, "--seed", 0,
            "--train_text_encoder_ti"]  # fmt: skip
    return [str(a) for a in base + list(extra)]


def _image(pipe, prompt: str) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0))
    return np.asarray(out.images[0]).astype(np.int16)


# ------------------------------------------------------------------------------------------------ units


def test_token_plan_names_and_replaces_whole_words():
    plan = TokenPlan.make("TOK,HAT", 2)
    assert plan.tokens == {"TOK": ("<s0>", "<s1>"), "HAT": ("<s2>", "<s3>")}
    assert plan.replace("a TOK dog in a HAT, TOKEN") == "a <s0><s1> dog in a <s2><s3>, TOKEN"
    assert plan.missing_from("a TOK dog") == ["HAT"]
    with pytest.raises(TokenError, match="empty"):
        TokenPlan.make(" , ", 2)
    with pytest.raises(TokenError, match=">= 1"):
        TokenPlan.make("TOK", 0)


def test_only_the_new_rows_train_in_both_encoders(tiny_pipe):
    """AdamW with weight decay over the learned rows: every other row of both embedding matrices, and
    every other encoder weight, stays bit-identical; the new rows move; the hook and the written-in
    rows give the same encoding."""
    tok, tok2, enc, enc2 = tiny_pipe.tokenizer, tiny_pipe.tokenizer_2, tiny_pipe.text_encoder, tiny_pipe.text_encoder_2
    before = [snapshot_tensors(e) for e in (enc, enc2)]
    plan = TokenPlan.make("TOK", 2)
    tokens = LearnedTokens(plan, [tok, tok2], [enc, enc2], initializer_concept="dog", seed=0)
    start = [r.detach().clone() for r in tokens.rows]
    # initialised from the concept's embedding, in both encoders
    dog = tok.encode("dog", add_special_tokens=False)[0]
    assert torch.equal(start[0][0], before[0]["embeddings.token_embedding.weight"][dog])
    opt = torch.optim.AdamW(tokens.parameters(), lr=1e-2, weight_decay=0.1)
    prompts = [plan.replace(PROMPT), "a photo of a dog"]
    for _ in range(3):
        embeds, pooled = encode_prompt_batch(prompts, [tok, tok2], [enc, enc2], torch.device("cpu"))
        (embeds.square().mean() + pooled.square().mean()).backward()
        opt.step()
        opt.zero_grad()
    for e, b, ids, key in zip((enc, enc2), before, tokens.token_ids, ("clip_l", "clip_g")):
        state = e.state_dict()
        for name, value in b.items():
            now = state[name]
            if now.shape != value.shape:  # the embedding matrix: grown by the new rows
                assert torch.equal(now[: value.shape[0]], value), (key, name)
                assert now.shape[0] == value.shape[0] + len(ids)
            else:
                assert torch.equal(now, value), (key, name)
    assert all(not torch.equal(r, s) for r, s in zip(tokens.rows, start))
    live = encode_prompt_batch(prompts, [tok, tok2], [enc, enc2], torch.device("cpu"))
    tokens.freeze()  # rows written into the matrices, hooks off
    frozen = encode_prompt_batch(prompts, [tok, tok2], [enc, enc2], torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(live, frozen))


def test_new_token_already_in_vocabulary_is_refused(tiny_pipe):
    tiny_pipe.tokenizer_2.add_tokens(["<s1>"])
    with pytest.raises(TokenError, match=r"already in the clip_g tokenizer's vocabulary"):
        LearnedTokens(TokenPlan.make("TOK", 2), [tiny_pipe.tokenizer, tiny_pipe.tokenizer_2],
                      [tiny_pipe.text_encoder, tiny_pipe.text_encoder_2])  # fmt: skip


def test_unknown_initializer_concept_is_refused(tiny_pipe):
    with pytest.raises(TokenError, match="'zzqx' is not a word the tokenizer knows"):
        LearnedTokens(TokenPlan.make("TOK", 2), [tiny_pipe.tokenizer, tiny_pipe.tokenizer_2],
                      [tiny_pipe.text_encoder, tiny_pipe.text_encoder_2], initializer_concept="zzqx")  # fmt: skip


def test_embeddings_of_another_size_are_refused_before_loading(tiny_pipe, tmp_path):
    path = tmp_path / "other_emb.safetensors"
    save_file({"clip_l": torch.zeros(2, 16), "clip_g": torch.zeros(2, 64)}, str(path))
    vocab = len(tiny_pipe.tokenizer)
    with pytest.raises(TokenError, match="clip_l rows have 16 numbers, this pipeline's encoder has 32"):
        load_embeddings_into(tiny_pipe, path)
    assert len(tiny_pipe.tokenizer) == vocab  # nothing was added
    bad = tmp_path / "bad_emb.safetensors"
    save_file({"clip_l": torch.zeros(2, 32)}, str(bad))
    with pytest.raises(TokenError, match="no clip_g"):
        read_embeddings_file(bad)


def test_missing_abstraction_and_none_without_tokens_are_usage_errors(tiny_pipeline_dir, tmp_path, capsys):
    inst = make_images(tmp_path / "inst", ((64, 64),) * 2, 0)
    argv = _args(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1)
    argv[argv.index(PROMPT)] = "a photo of sks dog"
    assert main(argv) == 2
    assert "does not contain the token abstraction 'TOK'" in capsys.readouterr().err
    argv = [
        a
        for a in _args(tiny_pipeline_dir, inst, tmp_path / "out", "--tuning", "none")
        if a != "--train_text_encoder_ti"
    ]
    assert main(argv) == 2
    assert "--tuning none trains nothing by itself" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["none", "coeff", "lora", "coeff+lora", "full"])
def test_each_mode_with_tokens_trains_saves_and_reloads(tiny_pipeline_dir, tmp_path, tuning):
    """3 steps, tokens trained for the first 2 (frozen after step 2, then cached). The final validation
    image is the in-memory model's; load_run into a fresh pipeline and diffusers' own loaders give the
    same image; unload_run gives the base model back (every UNet tensor, exactly)."""
    inst = make_images(tmp_path / "inst", ((64, 64),) * 3, 0)
    out = tmp_path / "run"
    argv = _args(tiny_pipeline_dir, inst, out, "--tuning", tuning, "--max_train_steps", 3, "--coeff_lr", "5e-2",
                 "--checkpointing_steps", 1,
                 "--learning_rate", "5e-3" if tuning == "full" else "5e-2", "--text_encoder_lr", "5e-2",
                 "--validation_prompt", "a TOK dog on the beach", "--num_validation_images", 1,
                 "--validation_steps", 100, "--validation_inference_steps", 2)  # fmt: skip
    assert main(argv) == 0
    emb = out / "run_emb.safetensors"
    state = load_file(str(emb))
    assert tuple(state["clip_l"].shape) == (2, 32) and tuple(state["clip_g"].shape) == (2, 64)
    # the rows trained after step 1 (tokens train on steps 1-2 here, on every step with --tuning none)
    after_1 = load_file(str(out / "checkpoint-1" / "run_emb.safetensors"))
    assert all(not torch.equal(after_1[k], state[k]) for k in ("clip_l", "clip_g"))
    if tuning != "none":  # frozen after step 2: step 3 left them alone
        assert torch.equal(load_file(str(out / "checkpoint-2" / "run_emb.safetensors"))["clip_l"], state["clip_l"])
    card = (out / "README.md").read_text()
    assert (
        "pipe.load_textual_inversion(state[\"clip_l\"], token=['<s0>', '<s1>'], text_encoder=pipe.text_encoder" in card
    )
    assert "<s0><s1>" in card and "learned tokens" in card
    assert ("every step" in card) == (tuning == "none") and "tokens 0.05" in card
    trained = np.asarray(Image.open(out / "validation" / "step_00003" / "prompt00_seed0.png")).astype(np.int16)

    pipe = validation_pipeline(tiny_pipeline_dir)
    base = _image(pipe, "a <s0><s1> dog on the beach")  # the base model reads the new tokens' letters
    base_unet = snapshot_tensors(pipe.unet)
    base_grad = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    loaded = load_run(pipe, out)
    assert loaded.tokens == ["<s0>", "<s1>"] and loaded.token == "<s0><s1>"
    expected = {"none": [], "coeff": ["alpha"], "lora": ["lora"], "coeff+lora": ["alpha", "lora"], "full": ["unet"]}
    assert loaded.parts == expected[tuning] + ["embeddings"]
    prompt = loaded.prompt("a TOK dog on the beach")
    via_load_run = _image(pipe, prompt)
    assert np.abs(via_load_run - trained).max() <= 1  # the in-memory model's image (8-bit PNG)
    unload_run(pipe, loaded)
    # the base UNet again: the same module tree (PEFT's wrappers gone with the LoRA) and every tensor
    assert_same_tensors(pipe.unet, base_unet)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == base_grad
    again = _image(pipe, "a <s0><s1> dog on the beach")
    # bit for bit: unload_run also gives back the requires_grad flags PEFT took (see loading.py)
    assert np.array_equal(again, base)

    # the same with diffusers' own loaders, as the model card says
    pipe = validation_pipeline(tiny_pipeline_dir)
    for key, enc, tok in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        pipe.load_textual_inversion(state[key], token=["<s0>", "<s1>"], text_encoder=enc, tokenizer=tok)
    if "coeff" in tuning:
        load_coeff_weights(pipe, out)
    if "lora" in tuning:
        pipe.load_lora_weights(out)
    if tuning == "full":
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert np.array_equal(_image(pipe, prompt), via_load_run)
    assert np.abs(via_load_run - base).max() > 0  # and training changed what the model draws


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [1, 3])
def test_resume_with_tokens_matches_uninterrupted(tiny_pipeline_dir, tmp_path, monkeypatch, kill_step):
    """Killed after checkpoint 1 (tokens still training: their optimizer state must come back) or 3
    (tokens frozen at step 2: the resumed run must freeze them again), then resumed: the same alpha,
    LoRA and token rows as an uninterrupted run."""
    from tests.trainer_runs import final_adapter_weights, run_killed_after_checkpoint

    inst = make_images(tmp_path / "inst", ((64, 64),) * 3, 0)
    common = ("--tuning", "coeff+lora", "--max_train_steps", 4, "--checkpointing_steps", 1, "--coeff_lr", "1e-2",
              "--learning_rate", "1e-2", "--text_encoder_lr", "1e-2", "--lr_scheduler", "linear")  # fmt: skip
    ref = tmp_path / "ref"
    assert main(_args(tiny_pipeline_dir, inst, ref, *common)) == 0
    run = tmp_path / "run"
    run_killed_after_checkpoint(monkeypatch, kill_step, _args(tiny_pipeline_dir, inst, run, *common))
    assert [s for s, _ in list_checkpoints(run)][-1] == kill_step
    assert list((run / f"checkpoint-{kill_step}").glob("*_emb.safetensors"))
    assert main(_args(tiny_pipeline_dir, inst, run, *common, "--resume_from_checkpoint", "latest")) == 0
    reference, resumed = final_adapter_weights(ref), final_adapter_weights(run)
    reference.update({f"emb.{k}": v for k, v in load_file(str(ref / "ref_emb.safetensors")).items()})
    resumed.update({f"emb.{k}": v for k, v in load_file(str(run / "run_emb.safetensors")).items()})
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key
    start = load_file(str(run / f"checkpoint-{kill_step}" / "run_emb.safetensors"))
    assert not torch.equal(start["clip_l"], reference["emb.clip_l"]) or kill_step == 3


def test_load_run_refuses_an_empty_folder_and_leaves_the_pipeline(tiny_pipe, tmp_path):
    from dreamcoeff.loading import RunLoadError

    with pytest.raises(RunLoadError, match="holds no trained files"):
        load_run(tiny_pipe, tmp_path)
    (tmp_path / "x_emb.safetensors").write_bytes(b"not a safetensors file")
    vocab = len(tiny_pipe.tokenizer)
    with pytest.raises(TokenError, match="not a readable safetensors file"):
        load_run(tiny_pipe, tmp_path)
    assert len(tiny_pipe.tokenizer) == vocab and len(tiny_pipe.tokenizer_2) == vocab
    from dreamcoeff import coeff_modules

    assert not coeff_modules(tiny_pipe.unet)  # nothing was loaded


def test_loaded_run_prompt_replaces_whole_words_as_training_does():
    from dreamcoeff.loading import LoadedRun

    loaded = LoadedRun(Path("run"), tokens=["<s0>", "<s1>"], abstractions={"TOK": "<s0><s1>"})
    assert loaded.prompt("a TOK dog in TOKYO") == "a <s0><s1> dog in TOKYO"
    assert loaded.prompt("a TOK dog") == TokenPlan.make("TOK", 2).replace("a TOK dog")


@pytest.mark.slow
def test_caption_without_the_abstraction_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    inst = make_images(tmp_path / "inst", ((64, 64),) * 2, 0)
    first = sorted(inst.iterdir())[0]
    first.with_suffix(".txt").write_text("a photo of a dog on the grass")
    argv = _args(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1, "--caption_ext", ".txt")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert first.name in err and "does not contain the token abstraction 'TOK'" in err


@pytest.mark.slow
def test_overwriting_a_token_run_with_another_method_leaves_no_stale_files(tiny_pipeline_dir, tmp_path, capsys):
    """A replaced run's trained files go: load_run must never mix two runs' parts. Resuming its
    checkpoint without the token flags is refused before the model is loaded."""
    from dreamcoeff.methods import artifacts_in

    inst = make_images(tmp_path / "inst", ((64, 64),) * 2, 0)
    out = tmp_path / "run"
    assert main(_args(tiny_pipeline_dir, inst, out, "--tuning", "coeff", "--max_train_steps", 1,
                      "--checkpointing_steps", 1)) == 0  # fmt: skip
    assert {k for k, _ in artifacts_in(out)} == {"alpha", "embeddings"}
    plain = [a for a in _args(tiny_pipeline_dir, inst, out, "--tuning", "coeff", "--max_train_steps", 2)
             if a != "--train_text_encoder_ti"]  # fmt: skip
    plain[plain.index(PROMPT)] = "a photo of sks dog"
    assert main([*plain, "--resume_from_checkpoint", "latest"]) == 2
    assert "--train_text_encoder_ti True in the checkpoint, False now" in capsys.readouterr().err
    lora = [*plain[:-2], "--tuning", "lora", "--max_train_steps", "1", "--overwrite_output_dir"]
    assert main(lora) == 0
    assert {k for k, _ in artifacts_in(out)} == {"lora"}
    assert not list(out.glob("*_emb.safetensors")) and not (out / "coeff_weights.safetensors").exists()
