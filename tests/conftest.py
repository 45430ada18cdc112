import os
from pathlib import Path

# Triton's interpreter (the fused kernels' tests run there; there is no GPU) must be chosen before
# anything imports triton: the library's own @jit helpers (tl.zeros, ...) are bound at import, and
# torch or diffusers may import triton while other test modules are collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the tiny models gain nothing from more, and tests that start subprocesses (2-process
# training, kill tests) would oversubscribe the cores.
torch.set_num_threads(1)

SHARED_DREAMBOOTH = Path(__file__).resolve().parents[1].parent / "shared" / "dreambooth"


@pytest.fixture
def one_thread_fresh_accelerate():
    """One intra-op thread for the test (on a shared 2-core machine two OpenMP threads per training
    step spin against each other and the test's subprocesses), and accelerate's process-wide state
    reset afterwards (every trainer call builds an Accelerator). Modules that train in-process ask for
    it with ``pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")``."""
    from accelerate.state import AcceleratorState, PartialState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny SDXL pipeline saved as a diffusers folder, the way a real model is loaded."""
    from dreamcoeff.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture
def tiny_pipe():
    from dreamcoeff.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def unet_inputs():
    """A batch of UNet inputs for the tiny SDXL UNet (latents, timesteps, text, added conditions)."""
    from dreamcoeff.testing.tiny import tiny_unet_config

    cfg = tiny_unet_config()
    g = torch.Generator().manual_seed(123)
    b, size = 2, 8
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(
        sample=torch.randn(b, cfg["in_channels"], size, size, generator=g),
        timestep=torch.tensor([10, 700]),
        encoder_hidden_states=torch.randn(b, 77, cfg["cross_attention_dim"], generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(b, pooled_dim, generator=g),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * b, dtype=torch.float32),
        },
    )
