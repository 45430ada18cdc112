"""Single-file SDXL bases: one original-layout .safetensors checkpoint (as shared on Civitai) for the
trainer, the sampler and the run loader, offline, its configs from a local folder.

The checkpoint is written by tests/original_layout.py, whose key mapping is independent of diffusers'
converter: loading it back through the product code must give the folder's tensors bit for bit, and
training from it the folder's alpha and images.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from dreamcoeff import load_run
from dreamcoeff import sample as S
from dreamcoeff.models import ModelError, check_base_model, load_components
from dreamcoeff.train import main
from tests.helpers import make_images
from tests.original_layout import original_state_dict, save_original_checkpoint, vae_to_original
from tests.trainer_runs import final_adapter_weights, sample_images, trainer_argv

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def configs_only(folder: Path, dest: Path) -> Path:
    """A copy of a diffusers folder without any weight file: what --base_config_dir needs (and proof
    that the weights come from the single file, since there are no others)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


@pytest.fixture(scope="module")
def single(tiny_pipeline_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny pipeline as one original-layout checkpoint, a configs-only folder describing it)."""
    root = tmp_path_factory.mktemp("single")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    path = save_original_checkpoint(pipe, root / "tiny-sdxl.safetensors")
    return path, configs_only(tiny_pipeline_dir, root / "configs")


def test_the_helper_writes_the_original_layout(tiny_pipeline_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    state = original_state_dict(pipe)
    n_weights = sum(len([k for k in getattr(pipe, p).state_dict() if not k.endswith("position_ids")]) for p in PARTS)
    # every diffusers tensor has one place (text_encoder_2's q, k, v weights and biases stacked into one
    # weight and one bias: 4 fewer per layer; plus OpenCLIP's logit_scale)
    assert len(state) == n_weights - 4 * pipe.text_encoder_2.config.num_hidden_layers + 1
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
    ):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions, as in ldm


def test_single_file_loads_the_folders_tensors_bit_for_bit(tiny_pipeline_dir, single):
    path, configs = single
    want = load_components(str(tiny_pipeline_dir))
    got = load_components(str(path), config_dir=str(configs))
    for part in PARTS:
        a, b = getattr(want, part).state_dict(), getattr(got, part).state_dict()
        assert a.keys() == b.keys(), (part, sorted(set(a) ^ set(b))[:4])
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (part, differ[:4])
    assert got.tokenizer("a sks dog").input_ids == want.tokenizer("a sks dog").input_ids
    assert type(got.noise_scheduler) is type(want.noise_scheduler)
    assert got.noise_scheduler.config == want.noise_scheduler.config


def test_single_file_vae(tiny_pipeline_dir, single, tmp_path):
    """--pretrained_vae_model_name_or_path as one file (original names, no prefix, as sdxl_vae.safetensors),
    beside a folder base and beside a single-file base without its own VAE."""
    path, configs = single
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    torch.manual_seed(0)
    other = type(pipe.vae).from_config(pipe.vae.config)  # a different VAE, to see which one is used
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_original(other).items()}, str(vae_file))
    no_vae = save_original_checkpoint(pipe, tmp_path / "no-vae.safetensors", vae=False)
    want = other.state_dict()
    for got in (
        load_components(str(tiny_pipeline_dir), str(vae_file)).vae,
        load_components(str(no_vae), str(vae_file), config_dir=str(configs)).vae,
    ):
        assert all(torch.equal(got.state_dict()[k], want[k]) for k in want)
    with pytest.raises(ModelError, match=r"without vae \(or give --pretrained_vae_model_name_or_path\)"):
        check_base_model(str(no_vae), config_dir=str(configs))


def _train(model, inst, out, *extra):
    argv = trainer_argv(model, inst, out, "--tuning", "coeff+lora", "--max_train_steps", 3, "--coeff_lr", "5e-2",
                        "--learning_rate", "5e-2", "--validation_prompt", "a sks dog", "--num_validation_images", 1,
                        "--validation_steps", 3, "--validation_inference_steps", 2, *extra)  # fmt: skip
    assert main(argv) == 0


@pytest.mark.slow
def test_training_from_the_single_file_equals_training_from_the_folder(tiny_pipeline_dir, single, tmp_path):
    path, configs = single
    inst = make_images(tmp_path / "inst")
    _train(tiny_pipeline_dir, inst, tmp_path / "folder")
    _train(path, inst, tmp_path / "file", "--base_config_dir", configs)
    want, got = final_adapter_weights(tmp_path / "folder"), final_adapter_weights(tmp_path / "file")
    assert want.keys() == got.keys() and any(k.endswith(".alpha") for k in want)
    assert any(v.abs().max() > 1e-3 for k, v in want.items() if k.endswith(".alpha"))  # alpha did train
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, worst
    images = [
        np.asarray(Image.open(tmp_path / r / "validation/step_00003/prompt00_seed0.png")) for r in ("folder", "file")
    ]
    assert np.array_equal(*images)
    card = (tmp_path / "file" / "README.md").read_text()  # the card's snippet loads the base the way it was given
    assert f'from_single_file("{path}", config="{configs}", local_files_only=True' in card
    assert f'from_pretrained("{tiny_pipeline_dir}"' in (tmp_path / "folder" / "README.md").read_text()

    # the run loader and the sampler's loader on the single-file base give the folder's images
    folder_pipe = S.load_base_pipeline(str(tiny_pipeline_dir))
    file_pipe = S.load_base_pipeline(str(path), config_dir=str(configs))
    base = sample_images(folder_pipe)
    assert np.array_equal(sample_images(file_pipe), base)
    load_run(folder_pipe, tmp_path / "folder")
    loaded = load_run(file_pipe, tmp_path / "file")
    assert loaded.parts == ["alpha", "lora"]
    trained = sample_images(folder_pipe)
    assert np.abs(trained - base).max() > 1e-4  # the run changes the images...
    assert np.abs(sample_images(file_pipe) - trained).max() <= 1e-5  # ...the same way from either base


@pytest.mark.slow
def test_sampler_cli_with_a_single_file_base(tiny_pipeline_dir, single, tmp_path, capsys):
    path, configs = single
    inst = make_images(tmp_path / "inst")
    _train(tiny_pipeline_dir, inst, tmp_path / "run")
    common = ["--num_inference_steps", "2", "--no_progress", "--prompt", "a sks dog", "--include_base",
              "--run", f"mine={tmp_path / 'run'}"]  # fmt: skip
    folder = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir)]
    file = ["--pretrained_model_name_or_path", str(path), "--base_config_dir", str(configs)]
    assert S.main(common + folder + ["--output", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert S.main(common + file + ["--output", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == ["base_p00_s0.png", "mine_p00_s0.png"]
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / o / "images" / name)) for o in "ab")
        assert np.array_equal(a, b), name
    # without the config folder: refused, saying which flag to add
    assert S.main(common + file[:2] + ["--output", str(tmp_path / "c")]) == 2
    assert "--base_config_dir" in capsys.readouterr().err


# ---- bad input: one clear line naming the file and what it looks like, before any model is loaded ---


def _tensors(*keys: str) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(2, 2) for k in keys}


def _not_sdxl(tmp_path: Path, single_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file, what the error must say it looks like)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, str]] = {}

    def write(name: str, state: dict[str, torch.Tensor], says: str) -> None:
        save_file(state, str(tmp_path / name))
        files[name] = (tmp_path / name, says)

    write(
        "sd15.safetensors",
        _tensors(
            "model.diffusion_model.input_blocks.0.0.weight",
            "model.diffusion_model.out.2.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
            "first_stage_model.encoder.conv_in.weight",
        ),  # fmt: skip
        "Stable Diffusion 1.x checkpoint",
    )
    write(
        "sd21.safetensors",
        _tensors("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"),
        "Stable Diffusion 2.x checkpoint",
    )
    write(
        "sd3.safetensors",
        _tensors(
            "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
            "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight",
        ),  # fmt: skip
        "Stable Diffusion 3 checkpoint",
    )
    write(
        "flux.safetensors",
        _tensors("double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"),
        "Flux-style transformer checkpoint",
    )
    write(
        "refiner.safetensors",
        _tensors(
            "model.diffusion_model.label_emb.0.0.weight",
            "model.diffusion_model.input_blocks.0.0.weight",
            "conditioner.embedders.0.model.text_projection",
        ),  # fmt: skip
        "SDXL refiner checkpoint",
    )
    write(
        "lora.safetensors",
        _tensors("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"),
        "a LoRA file, not a base model",
    )
    # a real SDXL file with one text encoder dropped
    state = {k: v for k, v in load_file(str(single_path[0])).items() if not k.startswith("conditioner.embedders.1.")}
    write("no-te2.safetensors", state, "an SDXL checkpoint without text_encoder_2")
    truncated = tmp_path / "truncated.safetensors"
    data = single_path[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    files["truncated.safetensors"] = (truncated, "is truncated: its header describes")
    (tmp_path / "noise.safetensors").write_bytes(b"\x00\x01\x02\x03" * 100)
    files["noise.safetensors"] = (tmp_path / "noise.safetensors", "is not a safetensors file, or it is truncated")
    torch.save(_tensors("model.diffusion_model.input_blocks.0.0.weight"), tmp_path / "model.ckpt")
    files["model.ckpt"] = (tmp_path / "model.ckpt", "is a pickle checkpoint (.ckpt)")
    torch.save(_tensors("model.diffusion_model.input_blocks.0.0.weight"), tmp_path / "renamed.safetensors")
    files["renamed.safetensors"] = (tmp_path / "renamed.safetensors", "is a PyTorch pickle file")
    files["missing.safetensors"] = (tmp_path / "missing.safetensors", "no such file")
    return files


def test_files_that_are_not_sdxl_are_refused_by_name(single, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the base file was checked")

    monkeypatch.setattr("dreamcoeff.train.loop.load_components", no_loading)
    inst = make_images(tmp_path / "inst")
    for name, (path, says) in _not_sdxl(tmp_path / "files", single).items():
        capsys.readouterr()
        argv = trainer_argv(path, inst, tmp_path / "out", "--base_config_dir", single[1])
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: "), (name, err)
        line = err[-1]
        assert str(path) in line and says in line, (name, line)
        assert "Traceback" not in "\n".join(err)
    # the pickle is refused for what it is, with what to do instead
    with pytest.raises(ModelError, match=r"can run code hidden in the file.*\.safetensors release"):
        check_base_model(str(tmp_path / "files" / "model.ckpt"), config_dir=str(single[1]))


def test_config_folder_problems(single, tiny_pipeline_dir, tmp_path):
    path, configs = single
    with pytest.raises(ModelError, match=r"single-file checkpoint.*Pass --base_config_dir"):
        check_base_model(str(path))
    with pytest.raises(ModelError, match=r"--base_config_dir .*: no such folder"):
        check_base_model(str(path), config_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match=r"--base_config_dir: .*\(no model_index.json\)"):
        check_base_model(str(path), config_dir=str(tmp_path))
    with pytest.raises(ModelError, match=r"drop --base_config_dir"):
        check_base_model(str(tiny_pipeline_dir), config_dir=str(configs))
    with pytest.raises(ModelError, match=r"--variant fp16: applies to diffusers folders"):
        check_base_model(str(path), variant="fp16", config_dir=str(configs))
    # configs of another architecture: an error naming both, never a half-loaded model
    other = configs_only(configs, tmp_path / "other")
    unet_config = other / "unet" / "config.json"
    unet_config.write_text(unet_config.read_text().replace('"layers_per_block": 2', '"layers_per_block": 3'))
    with pytest.raises(ModelError, match=rf"{path.name}.*(--base_config_dir|architecture)"):
        load_components(str(path), config_dir=str(other))
    # configs with fewer layers than the file: diffusers would only warn and drop the rest
    smaller = configs_only(configs, tmp_path / "smaller")
    te2_config = smaller / "text_encoder_2" / "config.json"
    te2_config.write_text(te2_config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    with pytest.raises(
        ModelError, match=r"text_encoder_2: 2 layers in the file, 1 in the config.*smaller architecture"
    ):
        load_components(str(path), config_dir=str(smaller))
