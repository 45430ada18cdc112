"""A real full disk (issue 20): the trainer's and the sampler's writes on a tiny tmpfs that runs out of space
in the middle of a write.

Each case mounts a tmpfs (root only: skipped with the reason elsewhere), puts a previous run on it, fills it
with a filler file so that only part of one chosen file still fits, and runs for real: the kernel answers
ENOSPC in the middle of that file. Asserted: a one-line error naming the file and the full disk and saying
what to do, exit code 2, the earlier checkpoints and final files byte-identical and loadable, no partial or
temporary file left; then, the filler deleted, the same command with ``--resume_from_checkpoint latest``
finishes with the weights of an uninterrupted run (the sampler: ``--overwrite`` writes the same images).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dreamcoeff import read_coeff_file
from dreamcoeff.tokens import read_embeddings_file
from dreamcoeff.train import COMPLETE_NAME, list_checkpoints
from dreamcoeff.train import main as train_main
from tests.helpers import make_images

COEFF = "coeff_weights.safetensors"
LORA = "pytorch_lora_weights.safetensors"
EMB = "out_emb.safetensors"  # <output folder's name>_emb.safetensors
CKPT_FILES = (EMB, COEFF, LORA, "args.json", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")
DISK_BYTES = 24 * 2**20
PAGE = 4096
# The folder's lock file (.dreamcoeff.lock, one page), which the trainer and the sampler write first. The
# files chosen to fail are 4 pages or more, so with or without it the failure lands inside them.
LOCK_ALLOWANCE = PAGE


# one thread, accelerate's state reset after each test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


# ------------------------------------------------------------------------------------------------
# One place turns the writers' failures into one message (no disk needed)


def test_write_failure_recognises_each_writers_error(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    from dreamcoeff import io
    from dreamcoeff.weights import CoeffWeightsError

    target = tmp_path / "x.safetensors"
    monkeypatch.setattr(io, "_free_space", lambda path: (4096, tmp_path))
    cases = [
        OSError(errno.ENOSPC, "No space left on device"),  # open / write / pickle / PIL
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    ]
    for exc in cases:
        failure = io.write_failure(exc, target)
        assert isinstance(failure, io.WriteError) and failure.errno == errno.ENOSPC, exc
        assert str(failure) == (
            f"could not write {target}: No space left on device (the disk is full: only 4.0 KiB free on {tmp_path})"
        )
    wrapped = CoeffWeightsError("could not write it")
    wrapped.__cause__ = failure
    assert io.write_failure(wrapped, tmp_path / "other") is failure  # the file the inner write named
    monkeypatch.setattr(io, "_free_space", lambda path: (10 * 2**30, tmp_path))  # torch's error, disk not full
    assert io.write_failure(cases[2], target).errno == errno.EIO
    for other in (ValueError("bad value"), RuntimeError("CUDA out of memory"), SafetensorError("invalid header")):
        assert io.write_failure(other, target) is None


def test_atomic_write_names_the_file_and_leaves_no_partial_one(tmp_path):
    from safetensors import SafetensorError

    from dreamcoeff.io import WriteError, atomic_write

    target = tmp_path / "x.png"
    target.write_bytes(b"previous")

    def half_then_full(tmp):
        Path(tmp).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(WriteError, match=re.escape(f"could not write {target}: No space left on device")):
        atomic_write(target, half_then_full)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    with pytest.raises(ZeroDivisionError):  # not a failed write: passed on as it is
        atomic_write(target, lambda tmp: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    mask = os.umask(0o22)
    os.umask(mask)
    new = atomic_write(tmp_path / "new.png", lambda tmp: Path(tmp).write_bytes(b"png"))
    assert new.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() makes it, not mkstemp's 0600


# ------------------------------------------------------------------------------------------------
# The disk


def _mount_tmpfs(request, where: Path, size: int) -> Path:
    """A fresh tmpfs of `size` bytes at `where`, unmounted at the end of the test; skip where not allowed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the full-disk tests run as root in CI)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount / umount command")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(done.stderr or done.stdout).strip()}")

    def unmount():
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)

    request.addfinalizer(unmount)
    return where


def _free(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def _blocks(path: Path) -> int:
    """Bytes the file takes on the tmpfs (whole pages)."""
    return path.stat().st_blocks * 512


def _page(n: int) -> int:
    return n - n % PAGE


def _fill(disk: Path, room: int) -> Path:
    """A filler file that leaves exactly `room` bytes (a multiple of the page size) free."""
    filler = disk / "filler"
    need = _free(disk) - room
    assert need > 0, f"the disk has only {_free(disk)} bytes free, {room} wanted"
    chunk = b"\0" * 2**20  # written, not sparse: a tmpfs counts only pages that hold data
    with open(filler, "wb") as fh:
        while need:
            need -= fh.write(chunk[: min(need, len(chunk))])
    assert _free(disk) == room, (_free(disk), room)
    return filler


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Partial or temporary files and folders: hidden names, .tmp / .old, anywhere in `folder`."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.startswith(".") or re.search(r"\.(tmp|old)(\.d)?$", p.name)
    )


# ------------------------------------------------------------------------------------------------
# Training


def _train_args(model_dir: Path, inst: Path, out: Path, steps: int, *extra) -> list[str]:
    args = ["--pretrained_model_name_or_path", model_dir, "--instance_dir", inst, "--instance_prompt",
            "a photo of TOK dog", "--output_dir", out, "--resolution", 64, "--report_to", "none",
            "--tuning", "coeff+lora", "--train_text_encoder_ti", "--num_new_tokens_per_abstraction", 48,
            "--train_text_encoder_ti_frac", 1.0, "--checkpointing_steps", 1, "--max_train_steps", steps,
            "--coeff_lr", "1e-2", "--learning_rate", "1e-2", "--text_encoder_lr", "1e-2", "--seed", 3, *extra]  # fmt: skip
    return [str(a) for a in args]


def _train(argv: list[str], capsys) -> tuple[int, str]:
    from accelerate.state import AcceleratorState, PartialState

    capsys.readouterr()
    try:
        code = train_main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    return code, capsys.readouterr().err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every trained tensor of a run folder or checkpoint, loaded with the library's checked readers."""
    from safetensors.torch import load_file

    tensors = dict(read_coeff_file(folder / COEFF)[0])
    tensors.update(load_file(str(folder / LORA)))
    (emb,) = folder.glob("*_emb.safetensors")  # named after the run's output folder
    state, tokens = read_embeddings_file(emb)
    assert len(tokens) == 48
    tensors.update({f"emb.{k}": v for k, v in state.items()})
    return tensors


@pytest.fixture(scope="module")
def full_disk_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fulldisk")


@pytest.fixture(scope="module")
def training_runs(tiny_pipeline_dir, full_disk_root):
    """The instance images, an uninterrupted 3-step run (the reference), and a finished 2-step run made
    at the path the tests mount their tmpfs on (kept in a backup folder, copied onto each fresh disk)."""
    from accelerate.state import AcceleratorState, PartialState

    inst = make_images(full_disk_root / "inst", ((64, 64),) * 3)
    disk = full_disk_root / "disk"
    out = disk / "out"
    try:
        assert train_main(_train_args(tiny_pipeline_dir, inst, full_disk_root / "ref", 3)) == 0
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        assert train_main(_train_args(tiny_pipeline_dir, inst, out, 2)) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    previous = full_disk_root / "previous"
    shutil.move(str(out), str(previous))
    return {"inst": inst, "disk": disk, "reference": _weights(full_disk_root / "ref"), "previous": previous}


def _room(case: str, out: Path) -> tuple[int, str]:
    """How much room to leave so the run resumed to step 3 runs out of space half-way through one file,
    from what the previous run wrote (checkpoint-3 and the final files have the same layout), and the
    name of that file. The resumed run first deletes the completion record (its page is free again)."""
    ck = {name: _blocks(out / "checkpoint-2" / name) for name in CKPT_FILES}
    ck_total = sum(_blocks(p) for p in (out / "checkpoint-2").iterdir())
    final = {name: _blocks(out / name) for name in (EMB, COEFF, LORA)}
    start = LOCK_ALLOWANCE - _blocks(out / COMPLETE_NAME)
    if case == "checkpoint: LoRA file":  # written by the trainer's save hook (safetensors)
        return start + ck[EMB] + ck[COEFF] + _page(ck[LORA] // 2), LORA
    if case == "checkpoint: optimizer state":  # accelerate's torch.save
        before = ck[EMB] + ck[COEFF] + ck[LORA] + ck["args.json"]
        return start + before + _page(ck["optimizer.bin"] // 2), "optimizer.bin"
    if case == "final: embeddings":  # the first of the final files
        return start + ck_total + _page(final[EMB] // 2), EMB
    if case == "final: alpha":
        return start + ck_total + final[EMB] + _page(final[COEFF] // 2), COEFF
    if case == "final: LoRA":  # after the embeddings and alpha were written in full
        return start + ck_total + final[EMB] + final[COEFF] + _page(final[LORA] // 2), LORA
    raise ValueError(case)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["checkpoint: LoRA file", "checkpoint: optimizer state", "final: embeddings", "final: alpha", "final: LoRA"],
)
def test_full_disk_during_training(tiny_pipeline_dir, training_runs, request, capsys, case):
    disk = _mount_tmpfs(request, training_runs["disk"], DISK_BYTES)
    out = disk / "out"
    shutil.copytree(training_runs["previous"], out)
    before = _snapshot(out)
    room, failing = _room(case, out)
    assert room > 0 and room % PAGE == 0
    filler = _fill(disk, room)

    argv = _train_args(tiny_pipeline_dir, training_runs["inst"], out, 3, "--resume_from_checkpoint", "latest")
    code, err = _train(argv, capsys)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    found = re.search(r"(?:^|[\r\n\]])(error: [^\r\n]*)", err)  # after a progress bar's last \r, on its line
    assert found, err[-3000:]
    message = found.group(1)
    where = "could not write checkpoint" if case.startswith("checkpoint") else "could not write the final files"
    assert where in message and f"({failing})" in message, message
    assert "No space left on device (the disk is full: " in message and f"free on {disk}" in message, message
    assert "intact" in message and "free some space and rerun with --resume_from_checkpoint latest" in message

    # Everything the previous run wrote is there, byte for byte, and loads; nothing partial is left.
    now = _snapshot(out)
    gone = sorted(set(before) - set(now) - {COMPLETE_NAME})  # the resumed run deletes the completion record
    assert not gone, gone
    changed = sorted(k for k in before if k in now and now[k] != before[k] and k != "args.json")
    assert not changed, changed
    assert not _leftovers(out), _leftovers(out)
    assert not (out / COMPLETE_NAME).exists()
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == ([1, 2] if case.startswith("checkpoint") else [1, 2, 3]), steps
    for _, checkpoint in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in _weights(checkpoint).values())
    previous_final = _weights(out)  # the previous run's final files: intact, a matching set
    assert previous_final.keys() == training_runs["reference"].keys()

    # Space freed: the same command resumes and ends with the weights of an uninterrupted run.
    filler.unlink()
    code, err = _train(argv, capsys)
    assert code == 0, err[-3000:]
    assert (out / COMPLETE_NAME).is_file() and not _leftovers(out), _leftovers(out)
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3]
    got, want = _weights(out), training_runs["reference"]
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst == 0.0, f"max |difference| {worst:g} from the uninterrupted run"
    with capsys.disabled():
        print(f"\nfull disk, {case}: refused with: {message}")


# ------------------------------------------------------------------------------------------------
# Sampling


def _sample_args(model_dir: Path, run: Path, output: Path, *extra) -> list[str]:
    args = ["--pretrained_model_name_or_path", model_dir, "--run", f"run={run}", "--include_base",
            "--prompt", "a {token} dog", "--prompt", "a {token} dog on a beach", "--token", "sks",
            "--seeds", 0, 1, "--num_inference_steps", 2, "--no_progress", "--output", output, *extra]  # fmt: skip
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def reference_samples(tiny_pipeline_dir, training_runs, full_disk_root):
    """The sampler's output for the reference run on an ordinary disk, and the images in writing order."""
    from dreamcoeff.sample import main as sample_main

    output = full_disk_root / "samples_ref"
    assert sample_main(_sample_args(tiny_pipeline_dir, full_disk_root / "ref", output)) == 0
    order = [im["file"] for im in json.loads((output / "manifest.json").read_text())["images"]]
    return output, order


@pytest.mark.slow
@pytest.mark.parametrize("case", ["image", "grid"])
def test_full_disk_while_sampling(tiny_pipeline_dir, full_disk_root, reference_samples, request, capsys, case):
    from dreamcoeff.sample import main as sample_main

    ref_output, order = reference_samples
    disk = _mount_tmpfs(request, full_disk_root / "sample_disk", 4 * 2**20)
    output = disk / "samples"
    pages = {name: -(-(ref_output / name).stat().st_size // PAGE) * PAGE for name in order}
    if case == "image":  # the third image runs out of space half-way
        failing = order[2]
        room = LOCK_ALLOWANCE + pages[order[0]] + pages[order[1]] + _page(pages[failing] // 2)
    else:  # every image fits, the first grid does not
        failing = "grid_s0.png"
        room = LOCK_ALLOWANCE + sum(pages.values()) + _page((ref_output / failing).stat().st_size // 2)
    assert room > sum(pages[n] for n in order[:2])
    filler = _fill(disk, room)

    argv = _sample_args(tiny_pipeline_dir, full_disk_root / "ref", output)
    capsys.readouterr()
    code = sample_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    found = re.search(r"dreamcoeff-sample: error: [^\r\n]*", err)
    assert found, err[-3000:]
    message = found.group(0)
    assert f"could not write {output / failing}: No space left on device (the disk is full: " in message, message
    assert "free some space and run the same command again with --overwrite" in message, message
    written = sorted(str(p.relative_to(output)) for p in output.rglob("*.png"))
    expected = order[:2] if case == "image" else sorted(order)
    assert written == sorted(expected), written
    for name in written:  # complete, the same bytes as on a disk with room
        assert (output / name).read_bytes() == (ref_output / name).read_bytes(), name
    assert not _leftovers(output), _leftovers(output)

    filler.unlink()
    assert sample_main(argv + ["--overwrite"]) == 0, capsys.readouterr().err[-3000:]
    for name in [*order, "grid_s0.png", "grid_s1.png"]:
        assert (output / name).read_bytes() == (ref_output / name).read_bytes(), name
    assert (output / "manifest.json").is_file() and (output / "index.html").is_file()
    assert not _leftovers(output), _leftovers(output)
    with capsys.disabled():
        print(f"\nfull disk while sampling, {case}: refused with: {message}")
