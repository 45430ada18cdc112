"""alpha's own tools: dosing by target (self-/cross-attention, UNet blocks) and combining concepts."""

from __future__ import annotations

import pytest
import torch

from dreamcoeff import (
    CoeffWeightsError,
    apply_coeff,
    coeff_modules,
    coeff_parameters,
    load_coeff_weights,
    read_coeff_file,
    remove_coeff,
    save_coeff_weights,
    set_coeff_target_scales,
)
from dreamcoeff.processor import target_scale_of
from tests.helpers import random_alpha
from tests.reference import reference_attention_module


def _random_alpha_file(pipe, path, targets=("attn1", "attn2"), include=None, seed=0, std=0.3):
    """Train nothing: random alpha on the chosen layers, saved, and the pipeline back to plain attention."""
    random_alpha(pipe.unet, seed, targets, include, std)
    save_coeff_weights(path, pipe.unet)
    state = {k: m.head_mix.alpha.detach().clone() for k, m in coeff_modules(pipe.unet).items()}
    remove_coeff(pipe)
    return path, state


def _unet_out(pipe, unet_inputs, **kw):
    with torch.no_grad():
        return pipe.unet(**unet_inputs, **kw).sample


def test_target_scale_is_the_product_of_the_targets_that_name_a_layer():
    scales = {"attn1": 0.5, "up_blocks": 0.0, "mid_block": 2.0}
    assert target_scale_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1", scales) == 0.5
    assert target_scale_of("down_blocks.1.attentions.0.transformer_blocks.0.attn2", scales) == 1.0
    assert target_scale_of("mid_block.attentions.0.transformer_blocks.0.attn1", scales) == 1.0
    assert target_scale_of("mid_block.attentions.0.transformer_blocks.0.attn2", scales) == 2.0
    assert target_scale_of("up_blocks.0.attentions.0.transformer_blocks.0.attn1", scales) == 0.0


def test_strength_zero_for_a_target_gives_its_base_attention_exactly(tiny_pipe, unet_inputs, tmp_path):
    """alpha everywhere with attn2 dosed to 0 computes exactly what alpha on attn1 alone computes;
    the same through cross_attention_kwargs for one call, and the next call is back to the setting."""
    path, _ = _random_alpha_file(tiny_pipe, tmp_path / "a.safetensors")
    base = _unet_out(tiny_pipe, unet_inputs)
    load_coeff_weights(tiny_pipe, path)
    full = _unet_out(tiny_pipe, unet_inputs)
    # attn1 only: the same alpha, cross-attention plain
    load_coeff_weights(tiny_pipe, path)
    for name, module in coeff_modules(tiny_pipe.unet).items():
        if name.endswith("attn2"):
            with torch.no_grad():
                module.head_mix.alpha.zero_()
    attn1_only = _unet_out(tiny_pipe, unet_inputs)
    load_coeff_weights(tiny_pipe, path, target_scales={"attn2": 0.0})
    assert torch.equal(_unet_out(tiny_pipe, unet_inputs), attn1_only)
    set_coeff_target_scales(tiny_pipe, None)
    assert torch.equal(_unet_out(tiny_pipe, unet_inputs), full)
    per_call = _unet_out(tiny_pipe, unet_inputs, cross_attention_kwargs={"coeff_target_scales": {"attn2": 0.0}})
    assert torch.equal(per_call, attn1_only)
    assert torch.equal(_unet_out(tiny_pipe, unet_inputs), full)  # one call only
    # every target at 0: the base model, bit for bit
    set_coeff_target_scales(tiny_pipe, {"attn1": 0.0, "attn2": 0.0})
    assert torch.equal(_unet_out(tiny_pipe, unet_inputs), base)
    assert not torch.equal(full, base) and not torch.equal(attn1_only, full)


def test_unknown_targets_are_refused(tiny_pipe, unet_inputs, tmp_path):
    path, _ = _random_alpha_file(tiny_pipe, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="unknown coeff targets \\['attn3'\\]"):
        load_coeff_weights(tiny_pipe, path, target_scales={"attn3": 0.5})
    assert not coeff_modules(tiny_pipe.unet)  # refused before anything changed
    load_coeff_weights(tiny_pipe, path)
    with pytest.raises(ValueError, match="unknown coeff targets"):
        set_coeff_target_scales(tiny_pipe, {"down": 0.5})
    with pytest.raises(ValueError, match="unknown coeff targets"):
        _unet_out(tiny_pipe, unet_inputs, cross_attention_kwargs={"coeff_target_scales": {"middle": 1.0}})


def test_combined_concepts_match_the_float64_reference(tiny_pipe, tmp_path):
    """A = I + 1.0 * alpha_dog + 0.7 * alpha_hat, the files covering different layers (a layer missing
    from a file adds 0): every layer's alpha, and an attention layer's output against float64."""
    dog, a_dog = _random_alpha_file(tiny_pipe, tmp_path / "dog.safetensors", seed=1)
    hat, a_hat = _random_alpha_file(tiny_pipe, tmp_path / "hat.safetensors", targets=("attn2",), seed=2)
    loaded = load_coeff_weights(tiny_pipe, [dog, hat], scale=[1.0, 0.7])
    assert sorted(loaded) == sorted(a_dog)
    modules = coeff_modules(tiny_pipe.unet)
    for name, module in modules.items():
        expected = a_dog[name].double() + (0.7 * a_hat[name].double() if name in a_hat else 0.0)
        assert torch.allclose(module.head_mix.alpha.double(), expected, atol=1e-7, rtol=0), name
        assert module.head_mix.strength == 1.0
    name = next(n for n in modules if n.endswith("attn2"))
    attn = modules[name]
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 7, attn.to_k.in_features, generator=g)
    eye = torch.eye(attn.heads, dtype=torch.float64)
    coeff = eye + a_dog[name].double() + 0.7 * a_hat[name].double()
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context)
    ref = reference_attention_module(attn, hidden, coeff, encoder_hidden=context)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)


def test_combining_is_all_or_nothing(tiny_pipe, tmp_path):
    dog, _ = _random_alpha_file(tiny_pipe, tmp_path / "dog.safetensors", seed=1)
    with pytest.raises(CoeffWeightsError, match="alpha file not found"):
        load_coeff_weights(tiny_pipe, [dog, tmp_path / "missing.safetensors"], scale=[1.0, 1.0])
    with pytest.raises(CoeffWeightsError, match="2 alpha files but 3 scales"):
        load_coeff_weights(tiny_pipe, [dog, dog], scale=[1.0, 1.0, 1.0])
    assert not coeff_modules(tiny_pipe.unet)


def test_inspect_writes_a_legible_overview_and_a_summary(tiny_pipe, tmp_path, capsys):
    from PIL import Image

    from dreamcoeff.inspection import _colour, heatmap, main, summarize

    path, state = _random_alpha_file(tiny_pipe, tmp_path / "run", seed=4)
    key = next(iter(state))  # one entry that must come out as the largest
    tensors = {f"unet.{k}.alpha": v for k, v in state.items()}
    tensors[f"unet.{key}.alpha"][1, 0] = 5.0
    summary = {s.path: s for s in summarize(tensors)}
    assert summary[key].largest == 5.0 and summary[key].largest_at == (1, 0)
    assert {s.kind for s in summary.values()} == {"attn1", "attn2"}
    assert (
        _colour(0.0, 1.0) == (255, 255, 255) and _colour(1.0, 1.0) == (255, 0, 0) and _colour(-2.0, 1.0) == (0, 0, 255)
    )
    tile = heatmap(torch.tensor([[1.0, -1.0], [0.0, 0.5]]), vmax=1.0, cell=4)
    assert tile.getpixel((1, 1)) == (255, 0, 0) and tile.getpixel((5, 1)) == (0, 0, 255)
    assert tile.getpixel((1, 5)) == (255, 255, 255)

    assert main([str(tmp_path / "run"), "--output", str(tmp_path / "inspect")]) == 0
    text = capsys.readouterr().out
    assert "self-attention (attn1)" in text and "cross-attention (attn2)" in text and "largest entries" in text
    overview = Image.open(tmp_path / "inspect" / "overview.png")
    assert overview.width >= 760 and overview.height > 300
    page = (tmp_path / "inspect" / "index.html").read_text()
    assert "overview.png" in page and page.count("<tr>") == len(state) + 1

    (tmp_path / "not_alpha.safetensors").write_bytes(b"garbage")
    assert main([str(tmp_path / "not_alpha.safetensors"), "--output", str(tmp_path / "x")]) == 2
    assert "dreamcoeff-inspect: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_validation_sweeps_alpha_strength_with_the_same_seeds(tiny_pipeline_dir, tmp_path):
    """--validation_coeff_scales 0 1: one image per strength per prompt and seed, a labelled strip per
    validation step, and strength 0 is the base model bit for bit."""
    import numpy as np
    from accelerate.state import AcceleratorState, PartialState
    from PIL import Image

    from dreamcoeff.train import main
    from tests.helpers import make_images, validation_pipeline

    inst = make_images(tmp_path / "inst", ((64, 64),) * 2, 0)
    out = tmp_path / "run"
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--instance_dir", inst, "--instance_prompt",
            "a photo of sks dog", "--output_dir", out, "--resolution", 64, "--report_to", "none",
            "--checkpointing_steps", 0, "--max_train_steps", 2, "--coeff_lr", "5e-2", "--validation_prompt",
            "a sks dog", "--num_validation_images", 1, "--validation_steps", 2, "--validation_inference_steps", 2,
            "--validation_coeff_scales", 0, 1]  # fmt: skip
    try:
        assert main([str(a) for a in argv]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    folder = out / "validation" / "step_00002"
    assert sorted(p.name for p in folder.iterdir()) == [
        "prompt00_seed0_c0.png",
        "prompt00_seed0_c1.png",
        "strengths.png",
    ]
    at0, at1 = (np.asarray(Image.open(folder / f"prompt00_seed0_c{c}.png")) for c in (0, 1))
    pipe = validation_pipeline(tiny_pipeline_dir)
    base = pipe(
        "a sks dog", num_inference_steps=2, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0)
    )
    assert np.array_equal(at0, np.asarray(base.images[0]))
    assert not np.array_equal(at0, at1)
    strip = Image.open(folder / "strengths.png")
    assert strip.width > 2 * 64 and strip.height > 64


def test_alpha_is_logged_per_block_and_as_a_picture(tiny_pipe, tmp_path):
    """What the trainer sends its trackers at each validation step: mean |alpha| per UNet block and
    attn1 / attn2 as scalars, and the overview picture (TensorBoard's add_image, HWC uint8)."""
    import numpy as np

    from dreamcoeff.train.validation import log_alpha

    _random_alpha_file(tiny_pipe, tmp_path / "a.safetensors")
    apply_coeff(tiny_pipe.unet)
    with torch.no_grad():
        for name, module in coeff_modules(tiny_pipe.unet).items():
            module.head_mix.alpha.fill_(0.2 if name.startswith("up_blocks") else 0.0)
    logged, images = [], []

    class Writer:
        def add_image(self, tag, array, step, dataformats):
            images.append((tag, array, step, dataformats))

    class Tracker:
        name, writer = "tensorboard", Writer()

    class Accelerator:
        trackers = [Tracker()]

        def log(self, values, step):
            logged.append((values, step))

    scalars = log_alpha(Accelerator(), tiny_pipe.unet, 7)
    assert logged == [(scalars, 7)]
    assert scalars["alpha/mean_abs/up_blocks.0/attn2"] == pytest.approx(0.2)
    assert scalars["alpha/mean_abs/down_blocks.1/attn1"] == 0.0
    ((tag, array, step, fmt),) = images
    assert tag == "alpha/overview" and step == 7 and fmt == "HWC"
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


def test_a_valid_file_whose_header_length_looks_like_pickle_loads(tiny_pipe, tmp_path):
    """A safetensors header length whose low byte is 0x80 (pickle's first byte) or "PK" (zip's) is a
    valid file (found when a learned-token run's metadata happened to give one); a real torch.save
    file is still refused."""
    import struct

    apply_coeff(tiny_pipe.unet)
    found = {}
    for pad in range(600):  # metadata lengths until the header length ends in 0x80
        path = save_coeff_weights(tmp_path / f"a{pad}.safetensors", tiny_pipe.unet, {"pad": "x" * pad})
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        if length % 256 == 0x80:
            found["path"] = path
            break
    assert found, "no metadata length gave a 0x80 header length"
    assert found["path"].read_bytes()[:1] == b"\x80"
    tensors, _ = read_coeff_file(found["path"])
    assert len(tensors) == len(coeff_modules(tiny_pipe.unet))
    torch.save({"unet.x.alpha": torch.zeros(2, 2)}, tmp_path / "pickled.safetensors")
    with pytest.raises(CoeffWeightsError, match="pickle"):
        read_coeff_file(tmp_path / "pickled.safetensors")


def _install_zero_alpha(unet, targets=("attn1", "attn2"), dropout=0.0):
    """A run's own processors (its targets and dropout), alpha at zero; returns {module: processor}."""
    apply_coeff(unet, targets=targets, dropout=dropout)
    return {name: module.processor for name, module in coeff_modules(unet).items()}


def test_init_coeff_from_copies_the_file_into_the_runs_own_processors(tiny_pipe, tmp_path):
    """`--init_coeff_weights` without a training run: every layer's alpha equals the file as
    safetensors' own reader gives it (not our reader), the processors (dropout 0.25) stay the run's."""
    from safetensors.torch import load_file

    from dreamcoeff.weights import init_coeff_from

    path, _ = _random_alpha_file(tiny_pipe, tmp_path / "run" / "coeff_weights.safetensors", seed=5)
    expected = load_file(str(path))
    processors = _install_zero_alpha(tiny_pipe.unet, dropout=0.25)
    assert init_coeff_from(tiny_pipe.unet, tmp_path / "run") == path  # a run folder names its file
    modules = coeff_modules(tiny_pipe.unet)
    assert sorted(f"unet.{n}.alpha" for n in modules) == sorted(expected)
    for name, module in modules.items():
        assert module.processor is processors[name], name
        assert module.head_mix.dropout == 0.25
        alpha = module.head_mix.alpha
        assert alpha.dtype == torch.float32 and alpha.requires_grad
        assert torch.equal(alpha.detach(), expected[f"unet.{name}.alpha"]), name
        assert not torch.equal(alpha.detach(), torch.zeros_like(alpha)), name


def _alphas(unet):
    return {n: m.head_mix.alpha.detach().clone() for n, m in coeff_modules(unet).items()}


def _assert_unchanged(unet, before):
    after = _alphas(unet)
    assert sorted(after) == sorted(before)
    for name, alpha in before.items():
        assert torch.equal(after[name], alpha), name


def test_init_coeff_from_refuses_a_file_that_covers_other_layers(tiny_pipe, tmp_path):
    """Layers missing from the file, layers the run does not train, and nothing changes on a refusal."""
    from dreamcoeff.weights import init_coeff_from

    only_attn2, _ = _random_alpha_file(tiny_pipe, tmp_path / "attn2.safetensors", targets=("attn2",), seed=1)
    both, _ = _random_alpha_file(tiny_pipe, tmp_path / "both.safetensors", seed=2)
    _install_zero_alpha(tiny_pipe.unet)
    n_attn1 = sum(n.endswith("attn1") for n in coeff_modules(tiny_pipe.unet))
    first_attn1 = sorted(n for n in coeff_modules(tiny_pipe.unet) if n.endswith("attn1"))[0]
    before = _alphas(tiny_pipe.unet)
    with pytest.raises(CoeffWeightsError) as err:
        init_coeff_from(tiny_pipe.unet, only_attn2)
    msg = str(err.value)
    assert msg.startswith(f"{only_attn2} does not fit this run (")
    assert f"({n_attn1} layers that train alpha are not in the file (e.g. {first_attn1})): " in msg
    assert "do not train alpha" not in msg and "--coeff_targets" in msg
    _assert_unchanged(tiny_pipe.unet, before)

    remove_coeff(tiny_pipe)
    _install_zero_alpha(tiny_pipe.unet, targets=("attn2",))
    before = _alphas(tiny_pipe.unet)
    with pytest.raises(CoeffWeightsError) as err:
        init_coeff_from(tiny_pipe.unet, both)
    msg = str(err.value)
    assert f"({n_attn1} layers in the file do not train alpha in this run (e.g. {first_attn1})): " in msg
    assert "are not in the file" not in msg
    _assert_unchanged(tiny_pipe.unet, before)


def test_init_coeff_from_names_wrong_head_counts_and_unknown_modules(tiny_pipe, tmp_path):
    """A file written for another UNet: each defect named (at most three), nothing changes."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dreamcoeff.weights import init_coeff_from

    path, _ = _random_alpha_file(tiny_pipe, tmp_path / "ok.safetensors", seed=3)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:  # the metadata as written (format marker included)
        meta = fh.metadata()
    keys = sorted(tensors)
    heads = tensors[keys[0]].shape[0]
    wrong = dict(tensors)
    wrong[keys[0]] = torch.zeros(heads + 1, heads + 1)
    bad = tmp_path / "bad.safetensors"
    save_file(wrong, str(bad), metadata=meta)
    _install_zero_alpha(tiny_pipe.unet)
    before = _alphas(tiny_pipe.unet)
    with pytest.raises(CoeffWeightsError) as err:
        init_coeff_from(tiny_pipe, bad)  # a pipeline is unwrapped to its UNet
    assert f"bad.safetensors: {keys[0]}: {heads + 1} heads in the file, {heads} in the UNet" in str(err.value)
    _assert_unchanged(tiny_pipe.unet, before)

    renamed = dict(tensors)
    renamed["unet.no_such_block.attn1.alpha"] = renamed.pop(keys[0])
    save_file(renamed, str(bad), metadata=meta)
    with pytest.raises(CoeffWeightsError) as err:
        init_coeff_from(tiny_pipe.unet, bad)
    msg = str(err.value)
    assert (
        "bad.safetensors: unet.no_such_block.attn1.alpha: the UNet has no attention module 'no_such_block.attn1'" in msg
    )
    # the unknown key also counts as a layer the run does not train, and its own layer as missing
    assert "1 layers that train alpha are not in the file" in msg and "1 layers in the file do not train" in msg
    _assert_unchanged(tiny_pipe.unet, before)
    # four problems (two unknown modules, two missing, two extra): the first three shown, "; " apart
    renamed["unet.no_such_block.attn2.alpha"] = renamed.pop(keys[1])
    save_file(renamed, str(bad), metadata=meta)
    with pytest.raises(CoeffWeightsError) as err:
        init_coeff_from(tiny_pipe.unet, bad)
    msg = str(err.value)
    assert msg == (
        f"{bad} does not fit this run (bad.safetensors: unet.no_such_block.attn1.alpha: the UNet has no attention "
        "module 'no_such_block.attn1'; bad.safetensors: unet.no_such_block.attn2.alpha: the UNet has no attention "
        f"module 'no_such_block.attn2'; 2 layers that train alpha are not in the file (e.g. {keys[0][5:-6]})): "
        "another base model, or other --coeff_targets than the run that wrote it?"
    )
    _assert_unchanged(tiny_pipe.unet, before)
    with pytest.raises(CoeffWeightsError, match="alpha file not found"):
        init_coeff_from(tiny_pipe.unet, tmp_path / "missing.safetensors")
    _assert_unchanged(tiny_pipe.unet, before)


@pytest.mark.parametrize("n_bad", [20, 21, 23])
def test_a_misfit_is_listed_twenty_lines_at_most(tiny_pipe, tmp_path, n_bad):
    """Every entry names an attention module the UNet lacks: the message names the file and the
    count, lists the first 20 problems, then says how many more there are."""
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    tensors = {f"unet.nowhere_{i:02d}.attn1.alpha": torch.zeros(2, 2) for i in range(n_bad)}
    save_file(tensors, str(path), metadata={"format": "dreamcoeff"})
    with pytest.raises(CoeffWeightsError) as err:
        load_coeff_weights(tiny_pipe, path)
    head, *lines = str(err.value).split("\n  ")
    assert head == (
        f"{path} does not fit this UNet ({n_bad} of {n_bad} entries); was it trained on another base model?"
    )
    expected = [
        f"other.safetensors: unet.nowhere_{i:02d}.attn1.alpha: the UNet has no attention module 'nowhere_{i:02d}.attn1'"
        for i in range(min(n_bad, 20))
    ]
    assert lines == expected + ([f"... and {n_bad - 20} more"] if n_bad > 20 else [])
    assert not coeff_modules(tiny_pipe.unet)


def test_a_misfit_among_several_files_names_how_many(tiny_pipe, tmp_path):
    """Combining: the message counts the files ("2 alpha files do not fit"), every entry of both."""
    from safetensors.torch import save_file

    dog, a_dog = _random_alpha_file(tiny_pipe, tmp_path / "dog.safetensors", seed=1)
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.nowhere.attn1.alpha": torch.zeros(2, 2)}, str(bad), metadata={"format": "dreamcoeff"})
    with pytest.raises(CoeffWeightsError) as err:
        load_coeff_weights(tiny_pipe, [dog, bad], scale=[1.0, 0.5])
    assert str(err.value).split("\n  ") == [
        f"2 alpha files do not fit this UNet (1 of {len(a_dog) + 1} entries); was it trained on another base model?",
        "bad.safetensors: unet.nowhere.attn1.alpha: the UNet has no attention module 'nowhere.attn1'",
    ]
    assert not coeff_modules(tiny_pipe.unet)


def test_one_file_at_a_strength_keeps_the_files_alpha(tiny_pipe, tmp_path):
    """One file at scale 0.5: alpha is the file's (safetensors' own reader), the strength 0.5 (not
    alpha * 0.5 at strength 0.5); layers with alpha that the file lacks go back to plain attention."""
    from safetensors.torch import load_file

    path, _ = _random_alpha_file(tiny_pipe, tmp_path / "cross.safetensors", targets=("attn2",), seed=4)
    expected = load_file(str(path))
    apply_coeff(tiny_pipe.unet, targets=("attn1", "attn2"))  # alpha on attn1 too, which the file lacks
    loaded = load_coeff_weights(tiny_pipe, path, scale=0.5)
    modules = coeff_modules(tiny_pipe.unet)
    assert sorted(modules) == sorted(loaded) == sorted(k[len("unet.") : -len(".alpha")] for k in expected)
    assert all(name.endswith("attn2") for name in modules)
    for name, module in modules.items():
        assert torch.equal(module.head_mix.alpha.detach(), expected[f"unet.{name}.alpha"]), name
        assert module.head_mix.strength == 0.5


def test_combined_files_run_at_strength_one_whatever_the_first_scale(tiny_pipe, tmp_path):
    """The c_k are in alpha (float64 reference), so the processors run at strength 1, not at c_1."""
    dog, a_dog = _random_alpha_file(tiny_pipe, tmp_path / "dog.safetensors", seed=1)
    hat, a_hat = _random_alpha_file(tiny_pipe, tmp_path / "hat.safetensors", seed=2)
    load_coeff_weights(tiny_pipe, [dog, hat], scale=[0.5, 0.7])
    for name, module in coeff_modules(tiny_pipe.unet).items():
        expected = 0.5 * a_dog[name].double() + 0.7 * a_hat[name].double()
        assert torch.allclose(module.head_mix.alpha.double(), expected, atol=1e-7, rtol=0), name
        assert module.head_mix.strength == 1.0


def test_metadata_values_are_stored_as_strings_or_sorted_json(tiny_pipe, tmp_path):
    """Strings as given; anything else as JSON with sorted keys, a Path (not JSON) as its text; keys
    as strings. Compared with the JSON the standard library writes, read back by safetensors."""
    from pathlib import Path

    from safetensors import safe_open

    apply_coeff(tiny_pipe.unet)
    meta = {"base_model": "org/model", "training_args": {"zeta": 1, "alpha": [0.5], "out": Path("/runs/a")}, 7: 2.5}
    path = save_coeff_weights(tmp_path / "a.safetensors", tiny_pipe.unet, metadata=meta)
    with safe_open(str(path), framework="pt") as fh:
        stored = fh.metadata()
    assert stored["base_model"] == "org/model"
    assert stored["training_args"] == '{"alpha": [0.5], "out": "/runs/a", "zeta": 1}'
    assert stored["7"] == "2.5"
    assert stored["format"] == "dreamcoeff"


def test_the_file_holds_float32_whatever_alphas_dtype_and_reads_back_as_float32(tiny_pipe, tmp_path):
    """The format stores float32 (docs/DESIGN.md): alpha kept in float64 or bf16 is cast on save, and a
    file another tool wrote in float16 reads back as float32 values; the metadata names no base model
    unless one is given."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    apply_coeff(tiny_pipe.unet, targets=("attn1",))
    for dtype in (torch.float64, torch.bfloat16):
        for p in coeff_parameters(tiny_pipe.unet):
            p.data = torch.full(p.shape, 0.25, dtype=dtype)
        path = save_coeff_weights(tmp_path / f"{dtype}.safetensors", tiny_pipe.unet)
        with safe_open(str(path), framework="pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}, dtype
            assert fh.metadata()["base_model"] == ""
            meta = fh.metadata()
    tensors, _ = read_coeff_file(path)
    half = {k: v.half() for k, v in tensors.items()}
    save_file(half, str(tmp_path / "f16.safetensors"), metadata=meta)
    again, _ = read_coeff_file(tmp_path / "f16.safetensors")
    assert {v.dtype for v in again.values()} == {torch.float32}
    assert all(torch.equal(again[k], half[k].float()) for k in half)
    remove_coeff(tiny_pipe)


def test_save_and_read_messages_say_what_to_do(tiny_pipe, tmp_path):
    with pytest.raises(CoeffWeightsError) as err:
        save_coeff_weights(tmp_path / "a.safetensors", tiny_pipe.unet)
    assert str(err.value) == "nothing to save: the model has no alpha (call apply_coeff first)"
    apply_coeff(tiny_pipe.unet, targets=("attn1",))
    first = coeff_parameters(tiny_pipe.unet)[0]
    with torch.no_grad():
        first[0, 0] = float("nan")
    with pytest.raises(CoeffWeightsError) as err:
        save_coeff_weights(tmp_path / "a.safetensors", tiny_pipe.unet)
    assert str(err.value).startswith("refusing to save non-finite alpha (1 layers, e.g. unet.")
    assert str(err.value).endswith(
        "the run diverged; lower --coeff_lr / --learning_rate or resume from an earlier checkpoint"
    )
    assert not (tmp_path / "a.safetensors").exists()
    remove_coeff(tiny_pipe)
