"""Small helpers shared by the trainer tests."""

import contextlib
import re
import signal
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, sizes=((64, 64), (80, 64), (64, 80)), seed=0) -> Path:
    """Write one PNG per (height, width): a red field with a randomly coloured square in the middle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = 200
        arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def snapshot_tensors(source: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of a module's state dict (or of a mapping of tensors), to compare with later."""
    state = source.state_dict() if isinstance(source, torch.nn.Module) else source
    return {k: v.detach().clone() for k, v in state.items()}


def assert_same_tensors(now: torch.nn.Module | Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> None:
    """The same keys and every tensor bit-identical (`torch.equal`); names the keys that differ."""
    state = now.state_dict() if isinstance(now, torch.nn.Module) else now
    assert state.keys() == before.keys(), sorted(set(state) ^ set(before))[:5]
    changed = [k for k in before if not torch.equal(state[k], before[k])]
    assert not changed, changed[:5]


def random_alpha(unet, seed: int = 0, targets=("attn1", "attn2"), include=None, std: float = 0.3) -> None:
    """Alpha on the chosen layers of `unet`, filled with `std` x N(0, 1) from `seed` (no training)."""
    from dreamcoeff import apply_coeff, coeff_parameters

    apply_coeff(unet, targets=targets, include=include)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coeff_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def pipeline_fingerprint(pipe) -> dict:
    """Everything loading a run could change: every tensor and requires_grad flag of the UNet and both
    text encoders, the attention processors, both tokenizers' vocabularies, the LoRA adapters."""
    models = ("unet", "text_encoder", "text_encoder_2")
    adapters = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
    return {
        "tensors": {f"{m}.{k}": v for m in models for k, v in snapshot_tensors(getattr(pipe, m)).items()},
        "processors": {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()},
        "vocab": [sorted(t.get_vocab().items()) for t in (pipe.tokenizer, pipe.tokenizer_2)],
        "adapters": {k: sorted(v) for k, v in adapters.items()},
        # PEFT freezes the base layers and diffusers' unloading leaves them frozen; it shows in images
        "requires_grad": {f"{m}.{k}": p.requires_grad for m in models for k, p in getattr(pipe, m).named_parameters()},
    }


def assert_pipeline_unchanged(pipe, before: dict) -> None:
    """`pipe` is as `pipeline_fingerprint(pipe)` recorded it in `before`, tensors bit for bit."""
    now = pipeline_fingerprint(pipe)
    for key in ("processors", "vocab", "adapters", "requires_grad"):
        assert now[key] == before[key], key
    assert_same_tensors(now["tensors"], before["tensors"])


def snapshot_unet(pipe) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    """Every UNet tensor and each attention processor's type: what a refused load must leave as it was."""
    return snapshot_tensors(pipe.unet), {k: type(v) for k, v in pipe.unet.attn_processors.items()}


def assert_unet_untouched(pipe, snapshot: tuple[dict[str, torch.Tensor], dict[str, type]]) -> None:
    tensors, processors = snapshot
    assert_same_tensors(pipe.unet, tensors)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors


def validation_pipeline(model_dir):
    """The pipeline as validation builds it: Euler from the model's training (DDPM) schedule."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler").config
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Hang(BaseException):
    """A call that did not return within its alarm (a BaseException: no reader may swallow it)."""


@contextlib.contextmanager
def hang_alarm(seconds: float):
    """Raise `Hang` in the block after `seconds` (SIGALRM; main thread only)."""

    def ring(signum, frame):
        raise Hang(f"the call did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


@contextlib.contextmanager
def peak_rss_growth(result: dict):
    """The process's peak RSS during the block over its RSS before, in result['bytes'] (Linux: VmHWM
    reset through /proc/self/clear_refs); None where that is not available."""
    result["bytes"] = None
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except (OSError, AttributeError):
        yield
        return
    yield
    result["bytes"] = max(0, _status_kib("VmHWM") - before) * 1024
