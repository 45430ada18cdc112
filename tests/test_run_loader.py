"""The run loader (`dreamcoeff.loading`, issue 31 item 2): one reader every caller goes through.

The sampler, the inspector and the library API must read a run with the same function, `read_run`;
`tests/test_layout.py` checks on the source that no other module reads a run's files. Values are
compared with what safetensors' own reader gives for the files, not with the loader's output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamcoeff import (
    apply_coeff,
    coeff_modules,
    coeff_parameters,
    load_run,
    loading,
    remove_coeff,
    save_coeff_weights,
    unload_run,
)
from dreamcoeff.loading import RunFiles, RunLoadError, read_run
from tests.helpers import random_alpha


def _alpha_run(pipe, folder: Path, seed: int, targets=("attn1", "attn2")) -> Path:
    """Random alpha (no training) saved into `folder` (a file path or a run folder); the pipeline back to plain."""
    random_alpha(pipe.unet, seed, targets)
    path = save_coeff_weights(folder, pipe.unet)
    remove_coeff(pipe)
    return Path(path)


def test_the_sampler_the_inspector_and_load_run_read_through_read_run(tiny_pipe, tmp_path, monkeypatch, capsys):
    from dreamcoeff import inspection
    from dreamcoeff import sample as S
    from dreamcoeff.sample import runs
    from dreamcoeff.sample.adapters import AdapterSwitcher

    folder = tmp_path / "dog"
    folder.mkdir()
    alpha = _alpha_run(tiny_pipe, folder, seed=1)
    # one function object, imported by each caller
    assert inspection.read_run is runs.read_run is loading.read_run
    # and each caller's reads go through it: read_run finds a folder's files with the loader's
    # artifacts_in, and the alpha is read with the loader's read_coeff_file (spied here)
    seen: list[tuple[str, Path]] = []
    real_find, real_read = loading.artifacts_in, loading.read_coeff_file
    monkeypatch.setattr(loading, "artifacts_in", lambda f: seen.append(("find", Path(f))) or real_find(f))
    monkeypatch.setattr(loading, "read_coeff_file", lambda p: seen.append(("read", Path(p))) or real_read(p))

    assert inspection.main([str(folder), "--output", str(tmp_path / "inspect")]) == 0
    assert seen == [("find", folder), ("read", alpha)]
    capsys.readouterr()

    seen.clear()
    spec = S.parse_run(f"dog={folder}")
    assert spec.alpha_path == alpha and seen == [("find", folder)]
    seen.clear()
    switcher = AdapterSwitcher(tiny_pipe, [spec])
    assert seen == [("read", alpha)] and switcher.weights["dog"]["alpha"]["layers"] == len(load_file(str(alpha)))
    switcher.close()

    seen.clear()
    loaded = load_run(tiny_pipe, folder)
    assert seen == [("find", folder)] and loaded.parts == ["alpha"]
    unload_run(tiny_pipe, loaded)
    assert not coeff_modules(tiny_pipe)


def test_read_run_tells_files_apart_and_installs_nothing(tiny_pipe, tmp_path):
    alpha = _alpha_run(tiny_pipe, tmp_path / "a.safetensors", seed=2)
    files = read_run(alpha)
    assert files == RunFiles(alpha=alpha) and files.parts == ["alpha"] and files.source is None
    tensors, metadata = files.read_alpha()
    reference = load_file(str(alpha))  # safetensors' own reader
    assert tensors.keys() == reference.keys() and metadata["format"] == "dreamcoeff"
    for key, value in reference.items():
        assert torch.equal(tensors[key], value), key
    assert not coeff_modules(tiny_pipe)  # read, not installed

    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(RunLoadError, match="holds no trained files .*holds neither coeff_weights"):
        read_run(folder)
    with pytest.raises(RunLoadError, match="does not exist"):
        read_run(tmp_path / "missing")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(RunLoadError, match=r"garbage\.safetensors is not a readable safetensors file"):
        read_run(tmp_path / "garbage.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RunLoadError, match="is neither a dreamcoeff alpha file nor a LoRA file"):
        read_run(tmp_path / "other.safetensors")
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "l.safetensors"))
    lora_only = read_run(tmp_path / "l.safetensors")
    assert lora_only.parts == ["lora"]
    with pytest.raises(RunLoadError, match=r"l\.safetensors holds no alpha .*it has lora"):
        lora_only.read_alpha()


def test_load_run_installs_a_combination_as_the_weighted_sum(tiny_pipe, tmp_path):
    dog = _alpha_run(tiny_pipe, tmp_path / "dog.safetensors", seed=3)
    hat = _alpha_run(tiny_pipe, tmp_path / "hat.safetensors", seed=4, targets=("attn2",))
    loaded = load_run(tiny_pipe, RunFiles(alpha_mix=((dog, 1.0), (hat, 0.7)), source=tmp_path), coeff_scale=0.5)
    assert loaded.parts == ["alpha"]
    a, b = load_file(str(dog)), load_file(str(hat))
    modules = coeff_modules(tiny_pipe)
    assert {f"unet.{k}.alpha" for k in modules} == set(a)
    for path, module in modules.items():
        key = f"unet.{path}.alpha"
        want = a[key].double() + 0.7 * (b[key].double() if key in b else 0.0)
        assert torch.allclose(module.head_mix.alpha.double(), want, atol=1e-6, rtol=0), path
        assert module.head_mix.strength == 0.5  # the row's c scales the whole sum
    unload_run(tiny_pipe, loaded)
    assert not coeff_modules(tiny_pipe)


def test_alpha_record_install_alpha_and_the_no_alpha_messages(tiny_pipe, tmp_path):
    """The sampler's record of an alpha file against hashlib, os.stat and safetensors' reader;
    install_alpha's strength (default 1); what a run without alpha says it has."""
    import hashlib

    from safetensors import safe_open

    from dreamcoeff import save_coeff_weights as save
    from dreamcoeff.loading import alpha_record, install_alpha

    apply_coeff(tiny_pipe.unet)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in coeff_parameters(tiny_pipe.unet):
            p.copy_(torch.randn(p.shape, generator=g))
    path = Path(save(tmp_path / "a.safetensors", tiny_pipe.unet, metadata={"training_args": {"seed": 1}}))
    remove_coeff(tiny_pipe)
    reference = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    record = alpha_record(tiny_pipe, path)
    assert record == {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
        "layers": len(reference),
        "coefficients": sum(t.numel() for t in reference.values()),
        "max_abs_alpha": max(float(t.abs().max()) for t in reference.values()),
        "metadata": {k: v for k, v in metadata.items() if k != "training_args"},
        "has_training_args": True,
    }
    assert "training_args" in metadata and not coeff_modules(tiny_pipe)  # checked, then removed again

    files = RunFiles(alpha=path)
    assert files.found() == [("alpha", path)]
    install_alpha(tiny_pipe, files)
    assert {m.head_mix.strength for m in coeff_modules(tiny_pipe).values()} == {1.0}
    install_alpha(tiny_pipe, files, scale=0.5)
    assert {m.head_mix.strength for m in coeff_modules(tiny_pipe).values()} == {0.5}
    remove_coeff(tiny_pipe)

    lora, unet, emb = tmp_path / "l.safetensors", tmp_path / "unet", tmp_path / "t_emb.safetensors"
    everything = RunFiles(lora=lora, unet=unet, embeddings=emb)
    assert everything.found() == [("lora", lora), ("unet", unet), ("embeddings", emb)]
    with pytest.raises(RunLoadError) as err:
        install_alpha(tiny_pipe, everything)
    assert str(err.value) == f"{lora} holds no alpha (coeff_weights.safetensors): it has lora, unet, embeddings"
    assert RunFiles().no_alpha() == "this run holds no alpha (coeff_weights.safetensors): it has no trained files"


def test_a_runs_clip_skip_comes_with_it_to_load_run_and_the_sampler(tiny_pipe, tmp_path, capsys):
    """The pipeline does not keep clip_skip, so a run trained with --clip_skip 1 and sampled without it
    reads its prompts from another layer: `load_run` hands the value back, and the sampler takes it as
    its default (refusing runs that disagree, warning where the flag overrides a run's)."""
    import argparse
    import json

    from dreamcoeff import sample as S
    from dreamcoeff.sample.cli import _resolve_clip_skip

    def run(name, trained):
        folder = tmp_path / name
        folder.mkdir()
        _alpha_run(tiny_pipe, folder, seed=len(name))
        if trained != "no args.json":
            (folder / "args.json").write_text(json.dumps({"tuning": "coeff", "clip_skip": trained}))
        return folder

    folders = {
        n: run(n, t) for n, t in [("one", 1), ("one_b", 1), ("zero", 0), ("unset", None), ("bare", "no args.json")]
    }
    for name, want in [("one", 1), ("zero", None), ("unset", None), ("bare", None)]:
        loaded = load_run(tiny_pipe, folders[name])
        assert loaded.clip_skip == want, name
        unload_run(tiny_pipe, loaded)

    def resolve(given, *names):
        args = argparse.Namespace(clip_skip=given)
        _resolve_clip_skip(args, [S.parse_run(f"{n}={folders[n]}") for n in names])
        return args.clip_skip, capsys.readouterr().err

    value, err = resolve(None, "one", "one_b", "bare")  # a run without args.json says nothing
    assert value == 1 and "--clip_skip 1, as the runs trained (one: 1, one_b: 1)" in err
    assert resolve(None, "zero", "unset", "bare") == (None, "")  # 0 reads SDXL's default layer too
    assert resolve(0, "zero") == (0, "")
    with pytest.raises(S.SamplingError, match=r"different --clip_skip \(one: 1, zero: default\).*--clip_skip N"):
        resolve(None, "one", "zero")
    value, err = resolve(2, "one", "unset")
    assert value == 2 and "warning: --clip_skip 2, but one, unset trained otherwise" in err
    value, err = resolve(1, "one", "unset")
    assert value == 1 and "but unset trained otherwise" in err and "one," not in err.split("but")[1]
