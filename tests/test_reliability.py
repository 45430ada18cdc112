"""Reliability (issue 7): training survives kills, bad data and divergence, and never loses or corrupts work.

docs/RELIABILITY.md lists every case with what the trainer does; each has a test here (or names the one
elsewhere that covers it). The kill tests run the real entry point in a subprocess and SIGKILL it: at random
moments, in the middle of a checkpoint (tests/pausing_entry.py, the entry point with pauses wrapped around
the trainer's writes, makes that moment long enough to hit), and between the final weights and the model card; then `--resume_from_checkpoint latest`
must end with the weights of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcoeff import load_coeff_weights, read_coeff_file
from dreamcoeff.train import COMPLETE_NAME, list_checkpoints, main
from dreamcoeff.weights import MAX_HEADER_BYTES, CoeffWeightsError
from tests.helpers import assert_unet_untouched, snapshot_unet
from tests.trainer_runs import (
    COEFF,
    ENTRY,
    KILL_COMMON,
    LORA,
    REPO,
    assert_checkpoints_complete,
    assert_same_weights,
    checkpoint_steps,
    final_adapter_weights,
    kill_run,
    make_square_images,
    mtime_or_zero,
    run_trainer_to_end,
    spawn_trainer,
    trainer_argv,
    wait_until,
)

# one thread, accelerate's state reset after each test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


def _run_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------------
# Kill at any moment


def _kill_and_resume(argv, out: Path, logs: Path, moments: list[str], rng: random.Random, processes=1, limit=3):
    """Run `argv`, SIGKILL it at each of `moments`, resuming with `latest` each time; then let it finish.
    Returns the moments where a kill did land."""
    landed = []
    logs.mkdir(exist_ok=True)
    for n, moment in enumerate(moments):
        argv_n = argv + (["--resume_from_checkpoint", "latest"] if n else [])
        start_steps = checkpoint_steps(out)
        start = start_steps[-1] if start_steps else 0
        # Every checkpoint (one per step here) pauses a little, so that on a fast machine the run cannot
        # finish between reaching the kill moment and the kill; mid-checkpoint kills get a longer pause.
        pause = 0.5 if moment in ("mid-checkpoint", "before-model-card") else 0.3
        spawned = time.time()
        proc = spawn_trainer(argv_n, logs / f"attempt{n}.log", processes, pause)
        try:
            if moment == "start-up":  # imports, model loading, data: before any step
                reached = proc.poll() is None
                time.sleep(rng.uniform(0.5, 3.0))
            elif moment == "random":  # anywhere in the loop once it has made some progress
                target = start + rng.randint(1, 2)
                reached = wait_until(lambda: (checkpoint_steps(out) or [0])[-1] >= target, proc)
                time.sleep(rng.uniform(0.0, 0.25))
            elif moment == "mid-checkpoint":  # a checkpoint-N.tmp being written
                # a file this attempt wrote (a leftover of the previous kill being deleted does not count)
                reached = wait_until(
                    lambda: any(mtime_or_zero(p) >= spawned for p in out.glob(f"checkpoint-*.tmp/{COEFF}")), proc
                )
                time.sleep(rng.uniform(0.0, 0.3))
            elif moment == "before-model-card":  # final weights written, README.md / completion marker not yet
                reached = wait_until(lambda: (out / LORA).exists() and not (out / "README.md").exists(), proc)
            else:
                raise ValueError(moment)
            alive = proc.poll() is None
            kill_run(proc)
        except BaseException:
            if proc.poll() is None:
                kill_run(proc)
            raise
        assert reached and alive, (
            f"attempt {n} ({moment}) ended before the kill:\n" + (logs / f"attempt{n}.log").read_text()[-3000:]
        )
        landed.append(moment)
        if moment == "mid-checkpoint":
            leftovers = list(out.glob("checkpoint-*.tmp"))
            assert leftovers, "the kill missed the checkpoint being written"
            assert all(p.name not in {c.name for _, c in list_checkpoints(out)} for p in leftovers)
        if moment == "before-model-card":
            assert (out / COEFF).exists() and not (out / COMPLETE_NAME).exists()
        if (out / "args.json").exists():
            assert_checkpoints_complete(out, processes, limit)
    rc, log = run_trainer_to_end(argv + ["--resume_from_checkpoint", "latest"], logs / "final.log", processes)
    assert rc == 0, log[-3000:]
    assert (out / COMPLETE_NAME).is_file() and (out / "README.md").is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp*")), sorted(p.name for p in out.iterdir())
    return landed


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tiny_pipeline_dir, tmp_path, capsys):
    inst = make_square_images(tmp_path / "inst")  # 3 images, batch 1: epochs end at steps 3, 6, 9
    steps = 10
    ref = tmp_path / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref, "--max_train_steps", steps, *KILL_COMMON)) == 0
    reference = final_adapter_weights(ref)
    assert any(v.abs().max() > 1e-4 for k, v in reference.items() if k.endswith(".alpha"))

    out = tmp_path / "run"
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", steps, *KILL_COMMON)
    moments = ["start-up", "random", "mid-checkpoint", "random", "before-model-card"]
    seed = int(os.environ.get("DREAMCOEFF_KILL_SEED", "7"))  # other seeds: other random moments
    landed = _kill_and_resume(argv, out, tmp_path / "logs", moments, random.Random(seed))
    assert landed == moments
    worst = assert_same_weights(final_adapter_weights(out), reference)
    with capsys.disabled():
        print(f"kills survived: {len(landed)} ({', '.join(landed)}); max |weight difference| {worst:.2g}")
    assert checkpoint_steps(out) == [steps - 2, steps - 1, steps]  # --checkpoints_total_limit 3

    # A completed run resumed again: nothing to do, nothing rewritten.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_sigkill_and_resume_with_two_processes(tiny_pipeline_dir, tmp_path):
    inst = make_square_images(tmp_path / "inst", sizes=((64, 64),) * 4)  # 2 ranks x batch 1: 2 steps per epoch
    common = ("--max_train_steps", 6, *KILL_COMMON)
    ref = tmp_path / "ref"
    proc = spawn_trainer(trainer_argv(tiny_pipeline_dir, inst, ref, *common), tmp_path / "ref.log", processes=2)
    assert proc.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference = final_adapter_weights(ref)

    out = tmp_path / "run"
    moments = ["random", "mid-checkpoint"]
    seed = int(os.environ.get("DREAMCOEFF_KILL_SEED", "11"))
    landed = _kill_and_resume(
        trainer_argv(tiny_pipeline_dir, inst, out, *common),
        out,
        tmp_path / "logs",
        moments,
        random.Random(seed),
        processes=2,
    )
    assert landed == moments
    assert "weights identical on all 2 processes" in (tmp_path / "logs" / "final.log").read_text()
    worst = assert_same_weights(final_adapter_weights(out), reference)
    print(f"kills survived (2 processes): {len(landed)} ({', '.join(landed)}); max |weight difference| {worst:.2g}")


@pytest.mark.slow
def test_sigkill_with_ema_and_prodigy_then_resume_matches_uninterrupted(tiny_pipeline_dir, tmp_path, capsys):
    """The training state later issues added (issue 20, item 5): the EMA's shadow weights and Prodigy's
    step-size estimate are in every checkpoint, so SIGKILLs at random moments and mid-checkpoint, then
    resuming, end with the same averaged weights as an uninterrupted run."""
    pytest.importorskip("prodigyopt")
    inst = make_square_images(tmp_path / "inst")
    steps = 10
    extra = ["--use_ema", "--ema_decay", "0.8", "--optimizer", "prodigy", "--coeff_lr", "1.0", "--learning_rate", "1.0"]

    def argv_for(out: Path) -> list[str]:
        argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", steps, *KILL_COMMON)
        return argv + extra  # later flags win: Prodigy's rates instead of KILL_COMMON's

    ref = tmp_path / "ref"
    assert main(argv_for(ref)) == 0
    reference = final_adapter_weights(ref)
    out = tmp_path / "run"
    moments = ["random", "mid-checkpoint", "random"]
    seed = int(os.environ.get("DREAMCOEFF_KILL_SEED", "7"))
    landed = _kill_and_resume(argv_for(out), out, tmp_path / "logs", moments, random.Random(seed))
    assert landed == moments
    worst = assert_same_weights(final_adapter_weights(out), reference)
    with capsys.disabled():
        print(f"kills survived (EMA + Prodigy): {len(landed)} ({', '.join(landed)}); max |difference| {worst:.2g}")


@pytest.mark.slow
def test_sigkill_with_learned_tokens_then_resume_matches_uninterrupted(tiny_pipeline_dir, tmp_path, capsys):
    """--train_text_encoder_ti (the tokens train for the first half, then freeze): killed at random moments
    and mid-checkpoint, then resumed: the same alpha, LoRA and embeddings file as an uninterrupted run."""
    from safetensors.torch import load_file

    inst = make_square_images(tmp_path / "inst")
    steps = 10

    def argv_for(out: Path) -> list[str]:
        argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", steps, *KILL_COMMON)
        argv[argv.index("a photo of sks dog")] = "a photo of TOK dog"
        return argv + ["--train_text_encoder_ti", "--text_encoder_lr", "1e-2"]

    def weights(out: Path) -> dict[str, torch.Tensor]:
        found = final_adapter_weights(out)
        found.update({f"emb.{k}": v for k, v in load_file(str(out / f"{out.name}_emb.safetensors")).items()})
        return found

    ref = tmp_path / "ref"
    assert main(argv_for(ref)) == 0
    reference = weights(ref)
    assert {"emb.clip_l", "emb.clip_g"} <= reference.keys()
    out = tmp_path / "run"
    moments = ["random", "mid-checkpoint", "random"]
    seed = int(os.environ.get("DREAMCOEFF_KILL_SEED", "7"))
    landed = _kill_and_resume(argv_for(out), out, tmp_path / "logs", moments, random.Random(seed))
    assert landed == moments
    assert (out / f"checkpoint-{steps}" / "run_emb.safetensors").is_file()  # the tokens are in every checkpoint
    worst = assert_same_weights(weights(out), reference)
    with capsys.disabled():
        print(f"kills survived (learned tokens): {len(landed)} ({', '.join(landed)}); max |difference| {worst:.2g}")


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_never_resumed_and_are_cleaned(tiny_pipeline_dir, tmp_path, caplog):
    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "out"
    assert main(trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", 2, "--checkpointing_steps", 1)) == 0
    # what kills leave: a checkpoint being written (even one that already has its state file), one
    # being deleted, the temp file of an atomic write; and a folder that is not a complete checkpoint
    for name in ("checkpoint-7.tmp", "checkpoint-3.tmp", "checkpoint-1.old"):
        (out / name).mkdir()
        (out / name / "dreamcoeff_state.json").write_text(json.dumps({"global_step": 7}))
    (out / "checkpoint-9").mkdir()
    (out / ".coeff_weights.safetensors.x1y2.tmp").write_bytes(b"partial")
    (out / ".tmpA1b2C3").write_bytes(b"partial")  # safetensors' own temp file, staged under our temp name
    (out / ".final.tmp.d").mkdir()
    assert checkpoint_steps(out) == [1, 2]
    with caplog.at_level("INFO", logger="dreamcoeff"):
        assert (
            main(
                trainer_argv(
                    tiny_pipeline_dir,
                    inst,
                    out,
                    "--max_train_steps",
                    3,
                    "--checkpointing_steps",
                    1,
                    "--resume_from_checkpoint",
                    "latest",
                )
            )
            == 0
        )
    assert "resumed from" in caplog.text and "checkpoint-2 at step 2" in caplog.text
    assert checkpoint_steps(out) == [1, 2, 3]
    names = {p.name for p in out.iterdir()}
    assert not names & {
        "checkpoint-7.tmp",
        "checkpoint-3.tmp",
        "checkpoint-1.old",
        ".coeff_weights.safetensors.x1y2.tmp",
        ".tmpA1b2C3",
        ".final.tmp.d",
    }
    assert "checkpoint-9" in names  # not ours to delete, and never taken for a checkpoint


# ------------------------------------------------------------------------------------------------
# Checkpoint limit and failed writes


@pytest.mark.slow
def test_checkpoint_limit_deletes_old_ones_only_after_the_new_one_is_complete(
    tiny_pipeline_dir, tmp_path, monkeypatch, capsys
):
    import dreamcoeff.train.checkpoints as checkpoints

    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "out"
    events = []
    real_prune = checkpoints.prune_checkpoints

    def spy(folder, limit, keep=None):
        # called once the new checkpoint is renamed into place: it is complete, and it must survive
        assert keep is not None and (keep / "dreamcoeff_state.json").is_file() and (keep / COEFF).is_file()
        real_prune(folder, limit, keep)
        assert keep.is_dir()
        events.append(checkpoint_steps(folder))

    monkeypatch.setattr(checkpoints, "prune_checkpoints", spy)
    argv = trainer_argv(
        tiny_pipeline_dir, inst, out, "--max_train_steps", 4, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2
    )
    assert main(argv) == 0
    argv = _override(argv, ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert events == [[1], [1, 2], [2, 3], [3, 4]]

    # The next checkpoint cannot be written (full disk): the run stops with a clear message, the
    # previous checkpoints all stay (none was deleted for the one that failed), no partial folder.
    import accelerate

    real_save_state = accelerate.Accelerator.save_state

    def full_disk(self, output_dir=None, **kw):
        real_save_state(self, output_dir, **kw)  # writes part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    err = _run_error(capsys, argv)
    assert "could not write checkpoint" in err and "No space left" in err and "--resume_from_checkpoint latest" in err
    assert checkpoint_steps(out) == [3, 4] and not list(out.glob("checkpoint-*.tmp"))

    # the same when the alpha file of the checkpoint is the write that fails
    import safetensors.torch

    monkeypatch.setattr(accelerate.Accelerator, "save_state", real_save_state)
    monkeypatch.setattr(
        safetensors.torch,
        "save_file",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    err = _run_error(capsys, argv)
    assert "could not write checkpoint" in err and "checkpoint-5" in err and "No space left" in err
    assert checkpoint_steps(out) == [3, 4] and not list(out.glob("checkpoint-*.tmp"))


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    from dreamcoeff.train.checkpoints import prune_checkpoints

    for step in (2, 5, 6, 3):  # resumed from checkpoint-2 while 5 and 6 exist: 3 is the one just written
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "dreamcoeff_state.json").write_text("{}")
    prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-3")
    assert checkpoint_steps(tmp_path) == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


@pytest.mark.slow
def test_failed_final_write_leaves_previous_files_intact(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "out"
    assert main(trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", 1, "--tuning", "coeff+lora")) == 0
    before = {name: (out / name).read_bytes() for name in (COEFF, LORA, "README.md", COMPLETE_NAME)}

    real_save_file = safetensors.torch.save_file
    for failing_write in (1, 2):  # the alpha file, then the LoRA file after the alpha one succeeded
        calls = []

        def full_disk(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == failing_write:
                with open(filename, "wb") as fh:
                    fh.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
        err = _run_error(
            capsys,
            trainer_argv(
                tiny_pipeline_dir,
                inst,
                out,
                "--max_train_steps",
                1,
                "--tuning",
                "coeff+lora",
                "--seed",
                5,
                "--overwrite_output_dir",
                "--coeff_lr",
                "0.05",
            ),
        )
        assert "No space left on device" in err and "intact" in err, err
        assert len(calls) == failing_write
        # both weight files are the previous run's, as a matching pair; nothing half-written
        assert (out / COEFF).read_bytes() == before[COEFF] and (out / LORA).read_bytes() == before[LORA]
        assert (out / "README.md").read_bytes() == before["README.md"]
        assert not (out / COMPLETE_NAME).exists()  # this run did not complete
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------
# Divergence


def _inject_nan(monkeypatch, *, loss_steps=(), grad_steps=()):
    """NaN loss (UNet output) on the given optimizer steps, NaN alpha gradients on others (batch 1)."""
    import dreamcoeff.methods as methods

    counter = {"step": 0}
    real_apply = methods.apply_coeff

    def apply_and_hook(unet, **kw):
        real_apply(unet, **kw)

        def on_forward(module, args, output):
            counter["step"] += 1
            if counter["step"] in loss_steps:
                return (output[0] * float("nan"),) + tuple(output[1:])
            return output

        unet.register_forward_hook(on_forward)
        for p in methods.coeff_parameters(unet):
            p.register_hook(lambda g: g * float("nan") if counter["step"] in grad_steps else g)

    monkeypatch.setattr(methods, "apply_coeff", apply_and_hook)
    return counter


@pytest.mark.slow
def test_transient_non_finite_steps_are_skipped(tiny_pipeline_dir, tmp_path, monkeypatch, caplog):
    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "out"
    _inject_nan(monkeypatch, loss_steps={1}, grad_steps={4})
    with caplog.at_level("WARNING"):
        assert (
            main(
                trainer_argv(
                    tiny_pipeline_dir,
                    inst,
                    out,
                    "--max_train_steps",
                    5,
                    "--checkpointing_steps",
                    2,
                    "--coeff_lr",
                    "1e-2",
                )
            )
            == 0
        )
    skipped = re.findall(r"step (\d+): non-finite loss or gradient, step skipped \(1 in a row\)", caplog.text)
    assert skipped == ["1", "4"]
    assert "step 4 was skipped: no checkpoint saved" in caplog.text
    assert checkpoint_steps(out) == [2]  # no checkpoint of the skipped step 4
    tensors = read_coeff_file(out)[0]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for t in tensors.values())


@pytest.mark.slow
def test_divergence_stops_with_learning_rate_hint_and_keeps_last_good_checkpoint(
    tiny_pipeline_dir, tmp_path, monkeypatch, capsys, caplog
):
    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "out"
    _inject_nan(monkeypatch, loss_steps=set(range(4, 100)))
    with caplog.at_level("WARNING"):
        err = _run_error(
            capsys,
            trainer_argv(
                tiny_pipeline_dir,
                inst,
                out,
                "--max_train_steps",
                20,
                "--checkpointing_steps",
                2,
                "--max_bad_steps",
                3,
                "--coeff_lr",
                "1e-2",
            ),
        )
    assert caplog.text.count("non-finite loss or gradient, step skipped") == 3
    assert "3 consecutive steps" in err and "diverged" in err
    assert "Lower the learning rate" in err and "--coeff_lr 0.01" in err
    assert "checkpoint-2" in err and "no final weights were written" in err
    assert checkpoint_steps(out) == [2]  # step 4 was bad: no checkpoint of it
    assert not (out / COEFF).exists() and not (out / COMPLETE_NAME).exists()
    assert all(torch.isfinite(t).all() for t in read_coeff_file(out / "checkpoint-2")[0].values())


# ------------------------------------------------------------------------------------------------
# Untrusted alpha files: refused from the header alone, before any tensor is allocated or applied


def _raw_safetensors(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail if any tensor data is read."""
    import safetensors
    import safetensors.torch

    def forbidden(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)


GOOD_KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.alpha"
META = {"format": "dreamcoeff", "format_version": "1"}


@pytest.mark.parametrize(
    "case",
    [
        "trillion elements",
        "heads over limit",
        "data size lies",
        "non-int shape",
        "offsets not ints",
        "header length huge",
        "header over limit",
        "metadata not strings",
        "deeply nested",
    ],
)
def test_absurd_headers_refused_before_reading_data(tmp_path, case, no_tensor_reads):
    path = tmp_path / "alpha.safetensors"
    if case == "trillion elements":  # a 200-byte file claiming a 10^12-element tensor
        _raw_safetensors(
            path,
            {
                "__metadata__": META,
                GOOD_KEY: {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]},
            },
        )
        message = "corrupt or truncated"
    elif case == "heads over limit":
        _raw_safetensors(
            path,
            {"__metadata__": META, GOOD_KEY: {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}},
            b"\0" * 16,
        )
        message = "expected square H x H"
    elif case == "data size lies":  # a plausible shape, but the bytes do not match it
        _raw_safetensors(
            path,
            {"__metadata__": META, GOOD_KEY: {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 16]}},
            b"\0" * 16,
        )
        message = "16 bytes of data for a 1024 x 1024 F32 tensor"
    elif case == "non-int shape":
        _raw_safetensors(
            path,
            {"__metadata__": META, GOOD_KEY: {"dtype": "F32", "shape": [2.0, 2.0], "data_offsets": [0, 16]}},
            b"\0" * 16,
        )
        message = "expected square H x H"
    elif case == "offsets not ints":
        _raw_safetensors(
            path,
            {"__metadata__": META, GOOD_KEY: {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}},
            b"\0" * 16,
        )
        message = "corrupt or truncated"
    elif case == "header length huge":  # the 8-byte length says 1 TB
        _raw_safetensors(path, {"__metadata__": META}, header_len=2**40)
        message = "header of 1099511627776 bytes"
    elif case == "header over limit":  # a real header above the limit: refused without reading it
        filler = " " * (MAX_HEADER_BYTES + 1)
        blob = (json.dumps({"__metadata__": META})[:-1] + filler + "}").encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob)
        message = "not a valid safetensors file"
    elif case == "metadata not strings":
        _raw_safetensors(path, {"__metadata__": {"format": ["dreamcoeff"]}})
        message = "__metadata__ is not a string mapping"
    else:
        path.write_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)
        message = "unreadable header"
    tracemalloc.start()
    try:
        with pytest.raises(CoeffWeightsError, match=re.escape(message)):
            read_coeff_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated while refusing a {path.stat().st_size}-byte file"


def test_keys_outside_the_unet_refused_before_loading(tiny_pipe, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from dreamcoeff.processor import apply_coeff

    apply_coeff(tiny_pipe.unet)
    before = snapshot_unet(tiny_pipe)
    outside = [
        "unet.conv_in.alpha",  # a real module, but not attention
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.alpha",  # inside an attention
        "unet.text_encoder.encoder.layers.0.self_attn.alpha",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.alpha",
    ]
    import safetensors

    for key in outside:
        path = tmp_path / "alpha.safetensors"
        save_file({GOOD_KEY: torch.ones(4, 4), key: torch.ones(4, 4)}, str(path), metadata=META)
        with monkeypatch.context() as m:
            m.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("tensor data was read"))
            with pytest.raises(CoeffWeightsError, match="does not fit this UNet"):
                load_coeff_weights(tiny_pipe, path)
        assert_unet_untouched(tiny_pipe, before)


def test_alpha_is_never_read_with_pickle():
    """Static guard: nothing in the package unpickles (torch.load, pickle, np.load). (That a pickle file
    is refused by name is tested in tests/test_unet_coeff.py::test_load_refusals_leave_pipeline_untouched.)"""
    sources = {p.name: p.read_text() for p in (REPO / "dreamcoeff").glob("*.py")}
    offenders = [
        name
        for name, text in sources.items()
        if re.search(r"torch\.load\(|pickle\.loads?\(|np\.load\(|weights_only\s*=\s*False", text)
    ]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------
# Bad data: every row of the table in docs/RELIABILITY.md


def _png_claiming_size(path: Path, width: int, height: int) -> Path:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def _noise_jpeg(path: Path, size=64) -> bytes:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=95)
    return path.read_bytes()


def _emulate_permissions(monkeypatch) -> None:
    """Root reads files without read permission; make dreamcoeff.images' open() refuse them as for a user."""
    if os.geteuid() != 0:
        return
    import dreamcoeff.images as data_lib

    def open_(file, mode="r", *a, **k):
        if "r" in mode and os.stat(file).st_mode & 0o444 == 0:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return open(file, mode, *a, **k)

    monkeypatch.setattr(data_lib, "open", open_, raising=False)


def _bad_file(case: str, folder: Path, monkeypatch, stem: str = "bad") -> tuple[str, str]:
    """Create one bad image in `folder`; returns (its file name, what the error must say)."""
    folder.mkdir(parents=True, exist_ok=True)
    if case == "zero-byte":
        (folder / f"{stem}.png").write_bytes(b"")
        return f"{stem}.png", "0 bytes"
    if case == "truncated PNG":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "x.png")
        data = (folder / "x.png").read_bytes()
        (folder / "x.png").unlink()
        (folder / f"{stem}.png").write_bytes(data[: len(data) // 2])
        return f"{stem}.png", "truncated or corrupt"
    if case == "truncated JPEG":
        data = _noise_jpeg(folder / "x.jpg")
        (folder / "x.jpg").unlink()
        (folder / f"{stem}.jpg").write_bytes(data[: len(data) // 2])
        return f"{stem}.jpg", "truncated or corrupt"
    if case == "not an image":
        (folder / f"{stem}.jpg").write_text("<html>404 not found</html>")
        return f"{stem}.jpg", "not a recognised image"
    if case == "huge":
        _png_claiming_size(folder / f"{stem}.png", 100_000, 100_000)
        return f"{stem}.png", "too large"
    if case == "broken symlink":
        (folder / f"{stem}.png").symlink_to(folder / "gone.png")
        return f"{stem}.png", "does not exist"
    if case == "unreadable":
        Image.new("RGB", (64, 64)).save(folder / f"{stem}.png")
        (folder / f"{stem}.png").chmod(0)
        _emulate_permissions(monkeypatch)
        return f"{stem}.png", "cannot read file (Permission denied)"
    raise ValueError(case)


BAD_IMAGES = ["zero-byte", "truncated PNG", "truncated JPEG", "not an image", "huge", "broken symlink", "unreadable"]


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_named_in_a_clear_error(tiny_pipeline_dir, tmp_path, capsys, monkeypatch, case):
    inst = make_square_images(tmp_path / "inst", sizes=((64, 64),))
    name, message = _bad_file(case, inst, monkeypatch)
    err = _run_error(capsys, trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1))
    assert name in err and message in err and "--skip_bad_images" in err, err
    assert not (tmp_path / "out" / COEFF).exists()


@pytest.mark.slow
def test_skip_bad_images_trains_on_the_rest(tiny_pipeline_dir, tmp_path, capsys, monkeypatch, caplog):
    inst = tmp_path / "inst"
    names = [_bad_file(case, inst, monkeypatch, stem=f"bad{i}")[0] for i, case in enumerate(BAD_IMAGES)]
    # all bad: a clear error, nothing to train on
    err = _run_error(
        capsys, trainer_argv(tiny_pipeline_dir, inst, tmp_path / "none", "--max_train_steps", 1, "--skip_bad_images")
    )
    assert f"all {len(BAD_IMAGES)} instance image(s) failed to load" in err
    make_square_images(inst, sizes=((64, 64),))
    with caplog.at_level("WARNING"):
        assert (
            main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1, "--skip_bad_images"))
            == 0
        )
    for name in names:
        assert f"skipping instance image {inst / name}" in caplog.text, name
    assert (tmp_path / "out" / COEFF).is_file()


def _odd_but_valid_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(folder / "gray16.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
    rgba.save(folder / "transparent.png")
    Image.new("P", (64, 64), 3).save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (80, 64), (10, 20, 30)).save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (24, 24), (50, 60, 70)).save(folder / "small.webp")
    (folder / "._cmyk.jpg").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS metadata twin: ignored
    (folder / "notes.md").write_text("not an image")  # ignored


@pytest.mark.slow
def test_odd_but_valid_inputs_train(tiny_pipeline_dir, tmp_path, monkeypatch, caplog):
    import dreamcoeff.train.data as data_lib
    import dreamcoeff.train.text as training

    inst = tmp_path / "inst"
    _odd_but_valid_images(inst)
    (inst / "cmyk.txt").write_bytes("\ufeffa photo of sks dog, café".encode("utf-8"))  # BOM: stripped
    (inst / "gray16.txt").write_text("  \n")  # blank: the instance prompt is used
    long_caption = "a photo of sks dog " + " ".join(["on the red grass"] * 30)
    (inst / "anim.txt").write_text(long_caption)
    seen_batches, seen_prompts = [], []
    real_collate, real_encode = data_lib.collate_examples, training.encode_prompts

    def collate(batch):
        out = real_collate(batch)
        seen_batches.append(out["pixel_values"])
        return out

    def encode(prompts, *a, **k):
        seen_prompts.extend(prompts)
        return real_encode(prompts, *a, **k)

    monkeypatch.setattr(data_lib, "collate_examples", collate)
    monkeypatch.setattr(training, "encode_prompts", encode)
    with caplog.at_level("WARNING"):
        assert (
            main(
                trainer_argv(
                    tiny_pipeline_dir,
                    inst,
                    tmp_path / "out",
                    "--max_train_steps",
                    8,
                    "--caption_ext",
                    ".txt",
                    "--square_crop",
                )
            )
            == 0
        )
    assert len(seen_batches) >= 8 and all(
        b.shape[1] == 3 and b.abs().max() <= 1 and torch.isfinite(b).all() for b in seen_batches
    )
    assert "a photo of sks dog, café" in seen_prompts and "a photo of sks dog" in seen_prompts
    assert long_caption in seen_prompts and "CLIP reads 77" in caplog.text
    assert "small.webp is 24x24" in caplog.text and "upscaling" in caplog.text
    assert "._cmyk" not in caplog.text and "notes.md" not in caplog.text


@pytest.mark.parametrize("case", ["latin-1", "utf-16", "caption is a directory", "no caption and no prompt"])
def test_bad_captions(tiny_pipeline_dir, tmp_path, capsys, case):
    inst = make_square_images(tmp_path / "inst", sizes=((64, 64),))
    caption = inst / "img0.txt"
    argv = trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1, "--caption_ext", ".txt")
    if case == "latin-1":
        caption.write_bytes("a photo of sks dog, café".encode("latin-1"))
        expected = ["img0.txt", "not valid UTF-8"]
    elif case == "utf-16":
        caption.write_bytes("a photo of sks dog".encode("utf-16"))
        expected = ["img0.txt", "UTF-16"]
    elif case == "caption is a directory":
        caption.mkdir()
        expected = ["img0.txt", "is a directory"]
    else:
        argv[argv.index("--instance_prompt") : argv.index("--instance_prompt") + 2] = []
        expected = ["img0.png", "no caption file", "--instance_prompt"]
    err = _run_error(capsys, argv)
    assert all(e in err for e in expected), err


def _write_checkpoint_of(out: Path, **args) -> None:
    ckpt = out / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "dreamcoeff_state.json").write_text(json.dumps({"global_step": 1}))
    (ckpt / "args.json").write_text(json.dumps(args))


FLAG_CASES = {
    # name: (extra argv, text the error must contain)
    "missing instance dir": (["--instance_dir", "{tmp}/nope"], "does not exist"),
    "empty instance dir": (["--instance_dir", "{tmp}/empty"], "is empty"),
    "instance dir without images": (["--instance_dir", "{tmp}/text_only"], "none with an image extension"),
    "instance dir is a file": (["--instance_dir", "{tmp}/text_only/notes.txt"], "is a file, not a directory"),
    "prior preservation without class prompt": (
        ["--with_prior_preservation", "--class_data_dir", "{tmp}/c"],
        "--with_prior_preservation needs --class_prompt",
    ),
    "prior preservation without class dir": (
        ["--with_prior_preservation", "--class_prompt", "a dog"],
        "needs --class_data_dir",
    ),
    "class prompt without prior preservation": (
        ["--class_prompt", "a dog"],
        "only used with --with_prior_preservation",
    ),
    "resolution not a multiple of 8": (["--resolution", "100"], "multiple of 8"),
    "zero steps": (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    "dropout of 1": (["--coeff_dropout", "1.0"], "--coeff_dropout must be in [0, 1)"),
    "zero checkpoint limit": (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
    "zero learning rate": (["--coeff_lr", "0"], "must be > 0"),
    "zero max_bad_steps": (["--max_bad_steps", "0"], "--max_bad_steps must be >= 1"),
    "no instance prompt nor captions": (["--instance_prompt", ""], "--instance_prompt is required"),
    "resume from a folder that is no checkpoint": (
        ["--resume_from_checkpoint", "{tmp}/empty"],
        "is not a complete dreamcoeff checkpoint",
    ),
    "resume with another method": (
        ["--resume_from_checkpoint", "latest", "--tuning", "coeff"],
        "--tuning 'lora' in the checkpoint, 'coeff' now",
    ),
    "config file with unknown keys": (["--config", "{tmp}/bad.yaml"], "unknown setting(s) ['learning_rat']"),
    "config file unparsable": (["--config", "{tmp}/broken.toml"], "cannot parse it"),
    "output dir of a previous run": (["--output_dir", "{tmp}/previous"], "holds a previous run"),
    "model folder that is not SDXL": (["--pretrained_model_name_or_path", "{tmp}/empty"], "no model_index.json"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags_and_folders(tiny_pipeline_dir, tmp_path, capsys, case):
    inst = make_square_images(tmp_path / "inst", sizes=((64, 64),))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "notes.txt").write_text("hello")
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    (tmp_path / "broken.toml").write_text("rank = = 4\n")
    (tmp_path / "previous").mkdir()
    (tmp_path / "previous" / COEFF).write_bytes(b"weights of an earlier run")
    if case == "resume with another method":
        _write_checkpoint_of(tmp_path / "out", tuning="lora", pretrained_model_name_or_path=str(tiny_pipeline_dir))
    extra, message = FLAG_CASES[case]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    argv = _override(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1), extra)
    err = _run_error(capsys, argv)
    assert message in err, err
    assert (tmp_path / "previous" / COEFF).read_bytes() == b"weights of an earlier run"


def _override(argv: list[str], extra: list[str]) -> list[str]:
    """argv with the flags in `extra` replaced (or added); a flag followed by another flag is a switch."""
    argv = list(argv)
    i = 0
    while i < len(extra):
        flag = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if flag in argv:
            j = argv.index(flag)
            if has_value:
                argv[j + 1] = extra[i + 1]
        else:
            argv += [flag, extra[i + 1]] if has_value else [flag]
        i += 2 if has_value else 1
    return argv


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--tuning", "dora"], "invalid choice: 'dora'"),
        (["--max_train_steps", "ten"], "invalid int value: 'ten'"),
    ],
)
def test_unknown_and_malformed_flags_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["--pretrained_model_name_or_path", "m", "--instance_dir", str(tmp_path), "--instance_prompt", "p", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bad_class_image_named(tiny_pipeline_dir, tmp_path, capsys):
    inst = make_square_images(tmp_path / "inst", sizes=((64, 64),))
    cls = make_square_images(tmp_path / "class", sizes=((64, 64),))
    (cls / "img1.png").write_bytes(b"")
    err = _run_error(
        capsys,
        trainer_argv(
            tiny_pipeline_dir,
            inst,
            tmp_path / "out",
            "--max_train_steps",
            1,
            "--with_prior_preservation",
            "--class_prompt",
            "a photo of a dog",
            "--class_data_dir",
            cls,
            "--num_class_images",
            2,
        ),
    )
    assert "img1.png" in err and "0 bytes" in err


# ------------------------------------------------------------------------------------------------
# Load: 500 steps in one run without memory growth


def _rss_bytes(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_500_steps_without_memory_growth(tiny_pipeline_dir, tmp_path):
    inst = make_square_images(tmp_path / "inst")
    steps = 500
    cmd = [
        sys.executable,
        str(ENTRY),
        *trainer_argv(
            tiny_pipeline_dir,
            inst,
            tmp_path / "out",
            "--max_train_steps",
            steps,
            "--tuning",
            "coeff",
            "--random_flip",
            "--coeff_lr",
            "1e-3",
        ),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    progress = {"step": 0}
    tail: list[str] = []

    def read_progress():  # tqdm's "12/500" on stderr
        buf = b""
        while chunk := proc.stderr.read1(4096):
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            for part in parts:
                text = part.decode(errors="replace")
                m = re.search(rf"\b(\d+)/{steps}\b", text)
                if m:
                    progress["step"] = int(m.group(1))
                tail.append(text)
                del tail[:-50]

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    samples = []  # (step, rss)
    try:
        while proc.poll() is None:
            rss = _rss_bytes(proc.pid)
            if rss:
                samples.append((progress["step"], rss))
            time.sleep(0.1)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    reader.join(timeout=10)
    assert rc == 0, "\n".join(tail)

    def rss_at(step):
        return next(r for s, r in samples if s >= step)

    early, middle = rss_at(50), rss_at(275)
    end = [r for s, r in samples if s >= steps - 5][-1]
    mib = 2**20
    figures = {
        "rss_step50_mib": early / mib,
        "rss_step275_mib": middle / mib,
        "rss_end_mib": end / mib,
        "growth_mib": (end - early) / mib,
        "samples": len(samples),
    }
    print("memory:", json.dumps(figures))
    # A leak of one step's graph or batch per step would add tens of MiB over 450 steps (and keep growing).
    assert end - early < 32 * mib, figures
    assert end - middle < 16 * mib, figures
