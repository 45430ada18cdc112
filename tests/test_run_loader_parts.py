"""The run loader's parts one by one (`dreamcoeff.loading`, issue 34 item 2: mutation testing).

Each part is checked against an independent reading of the files it was given: hashlib and `os.stat`
for the records, safetensors' own `load_file` / `safe_open` for the tensors and metadata, the saved
state dict for a full UNet. Fast: tiny pipelines, files written into `tmp_path`, no training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamcoeff import coeff_modules, coeff_parameters, remove_coeff, save_coeff_weights
from dreamcoeff.loading import (
    LoadedRun,
    RunFiles,
    RunLoadError,
    check_alpha_mix,
    embeddings_record,
    initialize_parts,
    install_lora_adapter,
    install_tokens,
    load_checkpoint_parts,
    load_run,
    lora_record,
    read_full_unet,
    read_run,
    remove_tokens,
    unload_run,
)
from dreamcoeff.methods import get_method
from dreamcoeff.testing.tiny import build_tiny_pipeline
from dreamcoeff.tokens import LearnedTokens, TokenError, TokenPlan
from tests.helpers import assert_pipeline_unchanged, pipeline_fingerprint, random_alpha


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _lora_file(folder: Path, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA file written by `save_lora` from a pipeline of its own (random B, so it is no identity)."""
    from dreamcoeff.lora import add_lora, save_lora

    maker = build_tiny_pipeline(seed=0)
    add_lora(maker.unet, rank=rank, lora_alpha=rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in maker.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    folder.mkdir(parents=True, exist_ok=True)
    return save_lora(folder, maker.unet)


def _peft_name(key: str, adapter: str = "default", prefix: str = "unet") -> str:
    """The PEFT parameter name of a diffusers-format LoRA key (``unet.x.lora.down.weight`` ->
    ``x.lora_A.<adapter>.weight``), written out here rather than taken from diffusers' converters."""
    name = key[len(prefix) + 1 :]
    for old, new in ((".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."), (".lora_linear_layer.down.", ".lora_A."),
                     (".lora_linear_layer.up.", ".lora_B.")):  # fmt: skip
        name = name.replace(old, new)
    return name.replace(".lora_A.weight", f".lora_A.{adapter}.weight").replace(
        ".lora_B.weight", f".lora_B.{adapter}.weight"
    )


def _embeddings_file(path: Path, abstractions: str = "TOK", per: int = 2) -> Path:
    maker = build_tiny_pipeline(seed=0)
    tokens = LearnedTokens(
        TokenPlan.make(abstractions, per),
        [maker.tokenizer, maker.tokenizer_2],
        [maker.text_encoder, maker.text_encoder_2],
        seed=3,
    )
    return tokens.save(path)


# ---- lora_record -------------------------------------------------------------------------------------


def test_lora_record_against_the_file(tiny_pipe, tmp_path):
    path = _lora_file(tmp_path / "run")
    reference = load_file(str(path))
    record = lora_record(tiny_pipe, path)
    assert record == {
        "path": str(path.resolve()),
        "sha256": _sha(path),
        "bytes": path.stat().st_size,
        "tensors": len(reference),
        "modules": len({k.split(".lora", 1)[0] for k in reference}),
        "rank": 4,
    }
    assert record["modules"] > 1 and record["tensors"] == 2 * record["modules"]  # A and B per module
    assert not tiny_pipe.get_list_adapters()  # read and checked, nothing installed


def test_lora_record_lists_every_rank_of_a_mixed_file(tiny_pipe, tmp_path):
    path = _lora_file(tmp_path / "run")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    state = load_file(str(path))
    down = sorted(k for k in state if "lora.down" in k)[0]  # one module at rank 2, the rest at 4
    up = down.replace("lora.down", "lora.up")
    state[down], state[up] = state[down][:2].clone(), state[up][:, :2].clone()
    mixed = tmp_path / "mixed.safetensors"
    save_file(state, str(mixed), metadata=metadata)
    assert lora_record(tiny_pipe, mixed)["rank"] == [2, 4]


def test_lora_record_refuses_what_it_cannot_load_and_names_the_file(tiny_pipe, tmp_path):
    pickled = tmp_path / "pytorch_lora_weights.bin"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(RunLoadError) as err:
        lora_record(tiny_pipe, pickled)
    assert str(err.value) == f"{pickled} is not a .safetensors file (pickle files are not loaded)"

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(RunLoadError, match=rf"^{garbage} is not a LoRA file diffusers can read: "):
        lora_record(tiny_pipe, garbage)

    other = tmp_path / "other.safetensors"
    save_file({"vae.something.lora_A.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(RunLoadError) as err:
        lora_record(tiny_pipe, other)
    assert str(err.value) == f"{other} holds no LoRA weights for the UNet or text encoders"

    clean = load_file(str(_lora_file(tmp_path / "run")))
    keys = sorted(clean)
    bad = tmp_path / "bad.safetensors"
    # ten problems are listed, then how many more: 12 and 11 (the boundary) say so, exactly ten has no such line
    for count, more in ((12, ["... and 2 more"]), (11, ["... and 1 more"]), (10, [])):
        state = {k: torch.full_like(v, float("nan")) if k in keys[:count] else v for k, v in clean.items()}
        save_file(state, str(bad))
        with pytest.raises(RunLoadError) as err:
            lora_record(tiny_pipe, bad)
        lines = str(err.value).split("\n  ")
        assert lines[0] == (
            f"LoRA {bad} does not fit this UNet ({count} problem(s)); was it trained on another base model?"
        )
        assert lines[1:] == [f"{k}: non-finite values" for k in keys[:10]] + more

    # the finite values of another UNet's layout: named by lora_problems
    shrunk = dict(clean)
    shrunk[keys[0]] = shrunk[keys[0]][..., :1].clone() if "lora.down" in keys[0] else shrunk[keys[0]][:1].clone()
    save_file(shrunk, str(bad))
    with pytest.raises(RunLoadError, match=rf"LoRA {bad} does not fit this UNet \(1 problem\(s\)\)"):
        lora_record(tiny_pipe, bad)


def test_install_lora_adapter_loads_the_file_under_its_name(tiny_pipe, tmp_path):
    path = _lora_file(tmp_path / "run")
    install_lora_adapter(tiny_pipe, path, "dog")
    assert tiny_pipe.get_list_adapters() == {"unet": ["dog"]}
    # the adapter's weights are the file's (diffusers' key layout -> PEFT's)
    reference = load_file(str(path))
    params = dict(tiny_pipe.unet.named_parameters())
    for key, value in reference.items():
        assert torch.equal(params[_peft_name(key, "dog")].detach(), value), key


# ---- read_full_unet ----------------------------------------------------------------------------------


def _saved_unet(tiny_pipe, folder: Path) -> Path:
    """A copy of the tiny UNet with one weight changed, saved as a ``--tuning full`` run saves it."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny_pipe.unet.config)
    unet.load_state_dict(tiny_pipe.unet.state_dict())
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)
    unet.save_pretrained(folder, safe_serialization=True)
    return folder


def test_read_full_unet_gives_the_saved_weights_in_the_base_dtype(tiny_pipe, tmp_path):
    folder = _saved_unet(tiny_pipe, tmp_path / "unet")
    weights = folder / "diffusion_pytorch_model.safetensors"
    saved = load_file(str(weights))
    unet, record = read_full_unet(folder, tiny_pipe.unet)
    assert record == {
        "path": str(folder.resolve()),
        "sha256": _sha(weights),
        "bytes": weights.stat().st_size,
        "parameters": sum(v.numel() for v in saved.values()),
    }
    state = unet.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert not torch.equal(unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)
    assert unet is not tiny_pipe.unet

    half = build_tiny_pipeline(seed=0).unet.to(torch.float16)
    unet16, _ = read_full_unet(folder, half)
    assert {p.dtype for p in unet16.parameters()} == {torch.float16}
    assert torch.equal(unet16.conv_in.weight, saved["conv_in.weight"].half())


def test_read_full_unet_errors_name_the_folder(tiny_pipe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunLoadError) as err:
        read_full_unet(empty, tiny_pipe.unet)
    assert str(err.value) == f"{empty} has no diffusion_pytorch_model.safetensors"

    folder = _saved_unet(tiny_pipe, tmp_path / "unet")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(RunLoadError, match=rf"^{folder / 'config.json'} is unreadable: "):
        read_full_unet(folder, tiny_pipe.unet)
    (folder / "config.json").unlink()
    with pytest.raises(RunLoadError, match=rf"^{folder / 'config.json'} is unreadable: "):
        read_full_unet(folder, tiny_pipe.unet)

    changed = dict(config, cross_attention_dim=config["cross_attention_dim"] * 2, norm_num_groups=4)
    (folder / "config.json").write_text(json.dumps(changed))
    with pytest.raises(RunLoadError) as err:
        read_full_unet(folder, tiny_pipe.unet)
    assert str(err.value) == (
        f"the UNet in {folder} has another architecture than the base model's "
        "(cross_attention_dim, norm_num_groups differ); was it trained on another base model?"
    )
    many = dict(config)
    for key in ("cross_attention_dim", "norm_num_groups", "in_channels", "out_channels", "sample_size",
                "layers_per_block"):  # fmt: skip
        many[key] = 3 if not isinstance(config[key], int) else config[key] + 1
    (folder / "config.json").write_text(json.dumps(many))
    with pytest.raises(RunLoadError, match=r"\((\w+, ){4}\w+ differ\)"):  # the first five named
        read_full_unet(folder, tiny_pipe.unet)

    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RunLoadError, match=rf"^the UNet in {folder} could not be loaded: "):
        read_full_unet(folder, tiny_pipe.unet)


# ---- tokens ------------------------------------------------------------------------------------------


def test_embeddings_record_and_the_learned_tokens(tiny_pipe, tmp_path):
    path = _embeddings_file(tmp_path / "dog_emb.safetensors", "TOK,HAT", 2)
    reference = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    vocab = [dict(t.get_vocab()) for t in (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2)]
    record = embeddings_record(tiny_pipe, path)
    assert record == {
        "path": str(path.resolve()),
        "sha256": _sha(path),
        "bytes": path.stat().st_size,
        "tokens": json.loads(metadata["tokens"]),
        "dims": {"clip_l": reference["clip_l"].shape[1], "clip_g": reference["clip_g"].shape[1]},
    }
    assert record["tokens"] == ["<s0>", "<s1>", "<s2>", "<s3>"]
    assert [t.get_vocab() for t in (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2)] == vocab  # nothing loaded

    assert RunFiles(embeddings=path).learned_tokens() == (
        ["<s0>", "<s1>", "<s2>", "<s3>"],
        {k: "".join(v) for k, v in json.loads(metadata["token_abstractions"]).items()},
    )
    assert RunFiles().learned_tokens() == ([], {})

    assert install_tokens(tiny_pipe, path) == record["tokens"]
    for key, (encoder, tokenizer) in zip(
        ("clip_l", "clip_g"),
        ((tiny_pipe.text_encoder, tiny_pipe.tokenizer), (tiny_pipe.text_encoder_2, tiny_pipe.tokenizer_2)),
    ):
        ids = tokenizer.convert_tokens_to_ids(record["tokens"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), reference[key])
    # loaded now: a second record refuses the same tokens, naming the file
    with pytest.raises(TokenError) as err:
        embeddings_record(tiny_pipe, path)
    assert str(err.value) == f"{path}: the tokens {record['tokens']} are already in the base tokenizers"
    remove_tokens(tiny_pipe, record["tokens"])
    assert [t.get_vocab() for t in (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2)] == vocab


@pytest.mark.parametrize("key", ["clip_l", "clip_g"])
def test_embeddings_record_refuses_rows_of_another_width(tiny_pipe, tmp_path, key):
    path = _embeddings_file(tmp_path / "dog_emb.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    state = load_file(str(path))
    width = state[key].shape[1]
    state[key] = torch.zeros(state[key].shape[0], width + 3)
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(TokenError) as err:
        embeddings_record(tiny_pipe, path)
    assert str(err.value) == (
        f"{path}: {key} rows have {width + 3} numbers, this pipeline's encoder has {width}; "
        "were the tokens trained on another base model?"
    )


def test_loaded_run_prompt_and_token():
    run = LoadedRun(Path("r"), tokens=["<s0>", "<s1>"], abstractions={"TOK": "<s0><s1>", "HAT": "<s2>"})
    assert run.prompt("a TOK dog, TOKEN, in a HAT") == "a <s0><s1> dog, TOKEN, in a <s2>"
    assert run.token == "<s0><s1>"
    assert LoadedRun(Path("r"), tokens=["<s0>", "<s1>"]).token == "<s0><s1>"
    assert LoadedRun(Path("r")).token is None
    assert LoadedRun(Path("r")).prompt("a TOK dog") == "a TOK dog"


# ---- RunFiles.training_args --------------------------------------------------------------------------


def test_training_args_are_read_from_the_folder_or_beside_the_files(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    assert RunFiles(source=run).training_args() is None  # no args.json
    (run / "args.json").write_text(json.dumps({"seed": 5, "tuning": "coeff"}), encoding="utf-8")
    assert RunFiles(source=run).training_args() == {"seed": 5, "tuning": "coeff"}
    # a single file: the folder it lies in
    assert RunFiles(alpha=run / "a.safetensors").training_args() == {"seed": 5, "tuning": "coeff"}
    assert RunFiles(lora=run / "l.safetensors").training_args() == {"seed": 5, "tuning": "coeff"}
    assert RunFiles(embeddings=run / "t_emb.safetensors").training_args() == {"seed": 5, "tuning": "coeff"}
    # a unet/ folder: the run folder above it
    assert RunFiles(unet=run / "unet").training_args() == {"seed": 5, "tuning": "coeff"}
    # the source wins over the files' folders
    (elsewhere / "args.json").write_text(json.dumps({"seed": 9}), encoding="utf-8")
    assert RunFiles(alpha=run / "a.safetensors", source=elsewhere).training_args() == {"seed": 9}
    # an unreadable args.json is skipped for the next folder; none readable: None
    (elsewhere / "args.json").write_text("{broken", encoding="utf-8")
    assert RunFiles(alpha=elsewhere / "a.safetensors", lora=run / "l.safetensors").training_args() == {
        "seed": 5,
        "tuning": "coeff",
    }
    assert RunFiles(alpha=elsewhere / "a.safetensors").training_args() is None
    assert RunFiles(source=elsewhere).training_args() is None
    # UTF-8 whatever the locale
    (run / "args.json").write_bytes(json.dumps({"name": "chien é"}, ensure_ascii=False).encode("utf-8"))
    assert RunFiles(source=run).training_args() == {"name": "chien é"}


# ---- alpha combinations --------------------------------------------------------------------------------


def test_check_alpha_mix_returns_every_layer_covered_and_leaves_no_alpha(tiny_pipe, tmp_path):
    from dreamcoeff.weights import CoeffWeightsError

    random_alpha(tiny_pipe.unet, seed=1, targets=("attn2",))
    cross = save_coeff_weights(tmp_path / "cross.safetensors", tiny_pipe.unet)
    remove_coeff(tiny_pipe)
    random_alpha(tiny_pipe.unet, seed=2, targets=("attn1",))
    own = save_coeff_weights(tmp_path / "self.safetensors", tiny_pipe.unet)
    remove_coeff(tiny_pipe)
    want = sorted(k.removeprefix("unet.").removesuffix(".alpha") for f in (cross, own) for k in load_file(str(f)))
    assert sorted(check_alpha_mix(tiny_pipe, [(cross, 1.0), (own, 0.5)])) == want
    assert not coeff_modules(tiny_pipe)

    other = build_tiny_pipeline(seed=0)
    state = load_file(str(cross))
    key = sorted(state)[0]
    with safe_open(str(cross), framework="pt") as fh:
        metadata = fh.metadata()
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[0] + 1)
    misfit = tmp_path / "misfit.safetensors"
    save_file(state, str(misfit), metadata=metadata)
    with pytest.raises(CoeffWeightsError, match="misfit"):
        check_alpha_mix(other, [(own, 1.0), (misfit, 1.0)])
    assert not coeff_modules(other)  # removed again after the failure too


# ---- training: checkpoint parts and --init_*_weights -----------------------------------------------------


class _Settings:
    rank, lora_alpha, lora_dropout, use_dora = 4, 4, 0.0, False
    coeff_targets, coeff_dropout, coeff_chunk_size = "both", 0.0, None


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_load_checkpoint_parts_copies_alpha_lora_and_tokens_in_place(tmp_path):
    method = get_method("coeff+lora", tokens=True)
    saver = build_tiny_pipeline(seed=0)
    method.install(saver.unet, _Settings)
    tokens = LearnedTokens(TokenPlan.make("TOK", 2), [saver.tokenizer, saver.tokenizer_2],
                           [saver.text_encoder, saver.text_encoder_2])  # fmt: skip
    _perturb(saver.unet, 1)
    _perturb(tokens, 2)
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    method.save(saver.unet, folder, tokens=tokens, tokens_name="run_emb.safetensors")

    resumer = build_tiny_pipeline(seed=0)
    method.install(resumer.unet, _Settings)
    fresh = LearnedTokens(TokenPlan.make("TOK", 2), [resumer.tokenizer, resumer.tokenizer_2],
                          [resumer.text_encoder, resumer.text_encoder_2], seed=7)  # fmt: skip
    for p in coeff_parameters(resumer.unet):
        p.requires_grad_(False)
    before = {id(p) for p in resumer.unet.parameters()} | {id(p) for p in fresh.parameters()}
    load_checkpoint_parts(method, resumer.unet, folder, fresh)
    # the same parameter objects (the optimizer's), holding the files' values
    assert {id(p) for p in resumer.unet.parameters()} | {id(p) for p in fresh.parameters()} == before
    alpha = load_file(str(folder / "coeff_weights.safetensors"))
    for path, module in coeff_modules(resumer.unet).items():
        assert torch.equal(module.head_mix.alpha.detach(), alpha[f"unet.{path}.alpha"]), path
    assert all(p.requires_grad for p in coeff_parameters(resumer.unet))  # trainable again
    lora = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    params = dict(resumer.unet.named_parameters())
    for key, value in lora.items():
        assert torch.equal(params[_peft_name(key)].detach(), value), key
    emb = load_file(str(folder / "run_emb.safetensors"))
    assert torch.equal(fresh.rows[0].detach(), emb["clip_l"]) and torch.equal(fresh.rows[1].detach(), emb["clip_g"])

    # without a tokens object the embeddings are not looked for; with one, a folder without them is named
    (folder / "run_emb.safetensors").unlink()
    load_checkpoint_parts(method, resumer.unet, folder, None)
    with pytest.raises(ValueError) as err:
        load_checkpoint_parts(method, resumer.unet, folder, fresh)
    assert str(err.value) == f"{folder}: no *_emb.safetensors (a checkpoint of a run without learned tokens?)"
    # a method without tokens ignores the tokens object
    load_checkpoint_parts(get_method("coeff"), resumer.unet, folder, fresh)


def test_load_checkpoint_parts_text_encoder_lora_and_full_unet(tmp_path):
    from dreamcoeff.lora import add_text_encoder_lora

    method = get_method("lora")
    saver = build_tiny_pipeline(seed=0)
    method.install(saver.unet, _Settings)
    encoders = [saver.text_encoder, saver.text_encoder_2]
    for encoder in encoders:
        add_text_encoder_lora(encoder, rank=4)
        _perturb(encoder, 3)
    _perturb(saver.unet, 4)
    method.save(saver.unet, tmp_path, text_encoders=encoders)
    state = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))

    resumer = build_tiny_pipeline(seed=0)
    method.install(resumer.unet, _Settings)
    theirs = [resumer.text_encoder, resumer.text_encoder_2]
    for encoder in theirs:
        add_text_encoder_lora(encoder, rank=4)
    load_checkpoint_parts(method, resumer.unet, tmp_path, text_encoders=theirs)
    for prefix, encoder in zip(("text_encoder", "text_encoder_2"), theirs):
        params = dict(encoder.named_parameters())
        keys = [k for k in state if k.startswith(prefix + ".")]
        assert keys
        for key in keys:
            assert torch.equal(params[_peft_name(key, prefix=prefix)].detach(), state[key]), key
    # without text encoders their LoRA stays as it was
    untouched = build_tiny_pipeline(seed=0)
    method.install(untouched.unet, _Settings)
    add_text_encoder_lora(untouched.text_encoder, rank=4)
    rows = {n: p.detach().clone() for n, p in untouched.text_encoder.named_parameters()}
    load_checkpoint_parts(method, untouched.unet, tmp_path)
    for n, p in untouched.text_encoder.named_parameters():
        assert torch.equal(p.detach(), rows[n]), n

    full = get_method("full")
    unet = build_tiny_pipeline(seed=0).unet
    _perturb(unet.requires_grad_(True), 5)
    full.save(unet, tmp_path / "full")
    target = build_tiny_pipeline(seed=0).unet
    load_checkpoint_parts(full, target, tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"))
    now = target.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())


def test_initialize_parts_reads_only_the_methods_files(tmp_path):
    method = get_method("coeff+lora")
    saver = build_tiny_pipeline(seed=0)
    method.install(saver.unet, _Settings)
    _perturb(saver.unet, 6)
    coeff_file, lora_file = method.save(saver.unet, tmp_path)
    alpha, lora = load_file(str(coeff_file)), load_file(str(lora_file))

    target = build_tiny_pipeline(seed=0)
    method.install(target.unet, _Settings)
    assert initialize_parts(method, target.unet, coeff_file, lora_file) == [coeff_file, lora_file]
    for path, module in coeff_modules(target.unet).items():
        assert torch.equal(module.head_mix.alpha.detach(), alpha[f"unet.{path}.alpha"]), path
    params = dict(target.unet.named_parameters())
    for key, value in lora.items():
        assert torch.equal(params[_peft_name(key)].detach(), value), key

    coeff_only = get_method("coeff")
    other = build_tiny_pipeline(seed=0)
    coeff_only.install(other.unet, _Settings)
    assert initialize_parts(coeff_only, other.unet, coeff_file, lora_file) == [coeff_file]
    assert initialize_parts(coeff_only, other.unet, None, lora_file) == []
    lora_only = get_method("lora")
    third = build_tiny_pipeline(seed=0)
    lora_only.install(third.unet, _Settings)
    assert initialize_parts(lora_only, third.unet, coeff_file, lora_file) == [lora_file]
    assert initialize_parts(lora_only, third.unet, coeff_file, None) == []
    assert not coeff_modules(third.unet)


# ---- load_run with every part --------------------------------------------------------------------------


def _image(pipe, prompt="a photo of a dog"):
    import numpy as np

    out = pipe(prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np",
               height=32, width=32)  # fmt: skip
    return np.asarray(out.images[0])


def _full_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run folder with learned tokens, alpha and a UNet + both text encoders' LoRA (lora_alpha 8 at
    rank 4, so a lost lora_alpha shows); returns (folder, lora file, embeddings file)."""
    from dreamcoeff.lora import add_lora, add_text_encoder_lora, save_lora

    folder = tmp_path / "run"
    folder.mkdir()
    maker = build_tiny_pipeline(seed=0)
    random_alpha(maker.unet, seed=11)
    save_coeff_weights(folder / "coeff_weights.safetensors", maker.unet)
    remove_coeff(maker.unet)
    add_lora(maker.unet, rank=4, lora_alpha=8)
    encoders = [maker.text_encoder, maker.text_encoder_2]
    for encoder in encoders:
        add_text_encoder_lora(encoder, rank=4, lora_alpha=8)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for module in [maker.unet, *encoders]:
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    lora = save_lora(folder, maker.unet, encoders)
    emb = _embeddings_file(folder / "run_emb.safetensors")
    return folder, lora, emb


def test_load_run_loads_every_part_and_unload_run_gives_the_base_back(tmp_path):
    folder, lora, emb = _full_run(tmp_path)
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.final_layer_norm.weight.requires_grad_(True)  # a flag PEFT would lose
    before, base_unet = pipeline_fingerprint(pipe), pipe.unet
    loaded = load_run(pipe, folder, lora_scale=0.5)
    assert loaded.folder == folder and loaded.parts == ["alpha", "lora", "embeddings"]
    assert loaded.tokens == ["<s0>", "<s1>"] and loaded.abstractions == {"TOK": "<s0><s1>"}
    assert loaded.token == "<s0><s1>" and pipe.unet is base_unet
    # alpha at its default strength 1, with the file's values
    alpha = load_file(str(folder / "coeff_weights.safetensors"))
    modules = coeff_modules(pipe)
    assert {f"unet.{k}.alpha" for k in modules} == set(alpha)
    assert {m.head_mix.strength for m in modules.values()} == {1.0}
    # the LoRA in the UNet and both text encoders, at weight 0.5 (scaling = 0.5 * lora_alpha / rank)
    state = load_file(str(lora))
    assert pipe.get_list_adapters() == {k: ["dreamcoeff_run"] for k in ("unet", "text_encoder", "text_encoder_2")}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        params = dict(getattr(pipe, prefix).named_parameters())
        keys = [k for k in state if k.split(".", 1)[0] == prefix]
        assert keys, prefix
        for key in keys:
            assert torch.equal(params[_peft_name(key, "dreamcoeff_run", prefix)].detach(), state[key]), key
    for prefix in ("unet", "text_encoder", "text_encoder_2"):  # lora_alpha from the file's metadata
        scaled = {m.scaling["dreamcoeff_run"] for m in getattr(pipe, prefix).modules() if hasattr(m, "scaling")}
        assert scaled == {0.5 * 8 / 4}, prefix
    # the tokens: rows of the file in both encoders
    rows = load_file(str(emb))
    ids = pipe.tokenizer_2.convert_tokens_to_ids(loaded.tokens)
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids].detach(), rows["clip_g"])

    unload_run(pipe, loaded)
    assert loaded.parts == [] and pipe.unet is base_unet
    assert_pipeline_unchanged(pipe, before)
    assert not coeff_modules(pipe)


def test_load_run_of_a_full_unet_run_and_of_files_without_a_folder(tiny_pipe, tmp_path):
    run = tmp_path / "full"
    _saved_unet(tiny_pipe, run / "unet")
    saved = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    base = tiny_pipe.unet
    loaded = load_run(tiny_pipe, run)
    assert loaded.parts == ["unet"] and loaded.base_unet is base and tiny_pipe.unet is not base
    assert torch.equal(tiny_pipe.unet.conv_in.weight, saved["conv_in.weight"])
    assert tiny_pipe.unet.device == base.device
    unload_run(tiny_pipe, loaded)
    assert tiny_pipe.unet is base and loaded.base_unet is None and loaded.parts == []

    alpha = tmp_path / "a.safetensors"
    random_alpha(tiny_pipe.unet, seed=3)
    save_coeff_weights(alpha, tiny_pipe.unet)
    remove_coeff(tiny_pipe)
    loaded = load_run(tiny_pipe, RunFiles(alpha=alpha), coeff_scale=0.25)
    assert loaded.folder == Path(".") and loaded.parts == ["alpha"]
    assert {m.head_mix.strength for m in coeff_modules(tiny_pipe).values()} == {0.25}
    unload_run(tiny_pipe, loaded)
    assert not coeff_modules(tiny_pipe)
    assert load_run(tiny_pipe, RunFiles(alpha=alpha, source=tmp_path)).folder == tmp_path
    remove_coeff(tiny_pipe)

    with pytest.raises(RunLoadError) as err:  # a file is no run folder
        load_run(tiny_pipe, alpha)
    assert str(err.value).startswith(f"{alpha} holds no trained files (it holds neither coeff_weights")
    with pytest.raises(RunLoadError, match=r"^\. holds no trained files"):
        load_run(tiny_pipe, RunFiles())


def test_a_lora_that_fails_to_load_leaves_the_pipeline_as_it_was(tmp_path, monkeypatch):
    folder, lora, _ = _full_run(tmp_path)
    pipe = build_tiny_pipeline(seed=0)
    before = pipeline_fingerprint(pipe)
    real = type(pipe).load_lora_into_unet

    def half_then_fail(*args, **kwargs):  # the adapter is in the UNet when the error comes
        real(*args, **kwargs)
        raise ValueError("boom")

    monkeypatch.setattr(pipe, "load_lora_into_unet", half_then_fail)
    with pytest.raises(RunLoadError) as err:
        load_run(pipe, folder)
    assert str(err.value) == f"{lora} could not be loaded: boom"
    assert_pipeline_unchanged(pipe, before)  # adapter, alpha and tokens all taken out again
    assert not coeff_modules(pipe) and not any("lora" in n for n, _ in pipe.unet.named_parameters())

    def fail_at_once(*args, **kwargs):
        raise ValueError("early")

    monkeypatch.setattr(pipe, "load_lora_into_unet", fail_at_once)
    with pytest.raises(RunLoadError, match="could not be loaded: early"):
        load_run(pipe, folder)
    assert_pipeline_unchanged(pipe, before)


def test_read_run_names_each_file_kind_and_the_folder(tiny_pipe, tmp_path):
    folder, lora, emb = _full_run(tmp_path)
    alpha = folder / "coeff_weights.safetensors"
    assert read_run(folder) == RunFiles(alpha=alpha, lora=lora, embeddings=emb, source=folder)
    assert read_run(emb) == RunFiles(embeddings=emb)
    assert read_run(lora) == RunFiles(lora=lora)
    assert read_run(alpha) == RunFiles(alpha=alpha)
    keys = [f"w{i}" for i in range(4)]
    save_file({k: torch.zeros(1) for k in keys}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RunLoadError) as err:
        read_run(tmp_path / "other.safetensors")
    assert str(err.value) == (
        f"{tmp_path / 'other.safetensors'} is neither a dreamcoeff alpha file nor a LoRA file nor learned "
        "token embeddings (clip_l/clip_g) (keys such as ['w0', 'w1'])"
    )


@pytest.mark.parametrize("encoder", ["text_encoder", "text_encoder_2"])
def test_lora_record_takes_a_text_encoder_only_file(tiny_pipe, tmp_path, encoder):
    # PEFT's key format (lora_A / lora_B), one module of one encoder: accepted, its rank read from lora_A
    module = next(n for n, _ in getattr(tiny_pipe, encoder).named_modules() if n.endswith("self_attn.q_proj"))
    width = getattr(tiny_pipe, encoder).get_submodule(module).weight.shape[1]
    state = {f"{encoder}.{module}.lora_A.weight": torch.randn(3, width),
             f"{encoder}.{module}.lora_B.weight": torch.randn(width, 3)}  # fmt: skip
    path = tmp_path / f"{encoder}.safetensors"
    save_file(state, str(path))
    record = lora_record(tiny_pipe, path)
    assert (record["tensors"], record["modules"], record["rank"]) == (2, 1, 3)
