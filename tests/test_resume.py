"""Resume that survives a broken checkpoint, and flags that a checkpoint's state would override.

`--resume_from_checkpoint latest` takes the newest *intact* checkpoint: a truncated or missing file,
or files that disagree with each other, set the newest one aside (renamed, kept) with a warning, and
the run from the previous one ends equal to an uninterrupted run. A checkpoint named explicitly must
be intact. A changed learning rate applies from the resumed step on, and says so.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from dreamcoeff.train import main
from dreamcoeff.train.checkpoints import STATE_NAME, checkpoint_problem, list_checkpoints
from tests.helpers import make_images
from tests.trainer_runs import final_adapter_weights, run_killed_after_checkpoint, trainer_argv

COMMON = (
    "--tuning",
    "coeff+lora",
    "--max_train_steps",
    5,
    "--checkpointing_steps",
    1,
    "--random_flip",
    "--lr_scheduler",
    "linear",
    "--coeff_lr",
    "1e-2",
    "--learning_rate",
    "1e-2",
    "--seed",
    "1",
)


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory):
    """An uninterrupted 5-step run, and a run killed right after checkpoint-3 (checkpoints 1, 2, 3)."""
    base = tmp_path_factory.mktemp("resume")
    inst = make_images(base / "inst")
    ref = base / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref, *COMMON)) == 0
    killed = base / "killed"
    mp = pytest.MonkeyPatch()
    try:
        run_killed_after_checkpoint(mp, 3, trainer_argv(tiny_pipeline_dir, inst, killed, *COMMON))
    finally:
        mp.undo()
    assert [s for s, _ in list_checkpoints(killed)] == [1, 2, 3]
    return {"model": tiny_pipeline_dir, "inst": inst, "ref": ref, "killed": killed}


def _copy_of_killed_run(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["killed"], out)
    return out


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _break_weights(ckpt):
    _truncate(ckpt / "coeff_weights.safetensors")


def _break_optimizer(ckpt):
    _truncate(ckpt / "optimizer.bin")


def _drop_optimizer(ckpt):
    (ckpt / "optimizer.bin").unlink()


def _mismatched_optimizer(ckpt):
    # step 2's optimizer state (same size, 2 updates) in checkpoint-3: the files disagree
    shutil.copy(ckpt.parent / "checkpoint-2" / "optimizer.bin", ckpt / "optimizer.bin")


BREAKS = {
    "truncated weights": (_break_weights, "coeff_weights.safetensors is truncated"),
    "truncated optimizer.bin": (_break_optimizer, "optimizer.bin is truncated"),
    "missing optimizer.bin": (_drop_optimizer, "optimizer.bin is missing"),
    "optimizer of another step": (_mismatched_optimizer, "optimizer.bin holds 2 optimizer updates"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BREAKS))
def test_latest_skips_a_broken_newest_checkpoint_and_ends_equal(runs, tmp_path, case, caplog):
    out = _copy_of_killed_run(runs, tmp_path)
    newest = out / "checkpoint-3"
    breaker, reason = BREAKS[case]
    breaker(newest)
    assert checkpoint_problem(newest) is not None and reason in checkpoint_problem(newest)
    assert checkpoint_problem(out / "checkpoint-2") is None
    with caplog.at_level(logging.INFO, logger="dreamcoeff"):
        argv = trainer_argv(runs["model"], runs["inst"], out, *COMMON, "--resume_from_checkpoint", "latest")
        assert main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if "is broken" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint-3" in warned[0] and reason in warned[0], warned
    assert "resumed from" in caplog.text and "checkpoint-2 at step 2" in caplog.text
    # the broken one is kept aside, untouched, and never listed again
    assert (out / "checkpoint-3.broken").is_dir()
    assert 3 in [s for s, _ in list_checkpoints(out)]  # step 3 was trained again and saved anew
    reference, resumed = final_adapter_weights(runs["ref"]), final_adapter_weights(out)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key
    assert any(v.abs().max() > 1e-4 for k, v in reference.items() if k.endswith(".alpha"))


@pytest.mark.slow
def test_a_named_broken_checkpoint_stops_with_a_clear_error(runs, tmp_path, capsys):
    out = _copy_of_killed_run(runs, tmp_path)
    _break_optimizer(out / "checkpoint-3")
    argv = trainer_argv(runs["model"], runs["inst"], out, *COMMON, "--resume_from_checkpoint", "checkpoint-3")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "optimizer.bin is truncated" in err and "latest" in err
    assert (out / "checkpoint-3").is_dir()  # named explicitly: nothing is moved


def test_checkpoint_problem_names_each_defect(runs, tmp_path):
    """Cheap checks, no training: an intact checkpoint passes; each defect is named."""
    out = _copy_of_killed_run(runs, tmp_path)
    ckpt = out / "checkpoint-3"
    assert checkpoint_problem(ckpt) is None
    state = json.loads((ckpt / STATE_NAME).read_text())
    assert state["optimizer_steps"] == 3 and "optimizer.bin" in state["files"]
    (ckpt / STATE_NAME).write_text(json.dumps({**state, "global_step": 4}))
    assert "says step 4, the folder's name step 3" in checkpoint_problem(ckpt)
    (ckpt / STATE_NAME).write_text("{not json")
    assert f"{STATE_NAME} is unreadable" in checkpoint_problem(ckpt)
    # an older checkpoint without the manifest: the structure of each file is still checked
    (ckpt / STATE_NAME).write_text(json.dumps({"global_step": 3}))
    assert checkpoint_problem(ckpt) is None
    _truncate(ckpt / "random_states_0.pkl", 0.9)
    assert "random_states_0.pkl is not a complete torch.save archive" in checkpoint_problem(ckpt)


@pytest.mark.slow
def test_a_changed_learning_rate_applies_after_resume_and_says_so(runs, tmp_path, caplog):
    """5e-3 over a 1e-2 run: from the resumed step on the optimizer trains at the new rate (times the
    schedule's factor at that step), and a warning says which rate now applies."""
    import dreamcoeff.train.loop as training

    out = _copy_of_killed_run(runs, tmp_path)
    seen = []
    real_step = training.Trainer.optimizer_step

    def optimizer_step(self):
        seen.append(([g["lr"] for g in self.optimizer.param_groups], self.global_step))
        return real_step(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(training.Trainer, "optimizer_step", optimizer_step)
    try:
        at = COMMON.index("--learning_rate") + 1
        changed = [("5e-3" if i == at else a) for i, a in enumerate(COMMON)]
        argv = trainer_argv(runs["model"], runs["inst"], out, *changed, "--resume_from_checkpoint", "latest")
        with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
            assert main(argv) == 0
    finally:
        mp.undo()
    assert "--learning_rate 0.005 applies from now on (the checkpoint trained with 0.01)" in caplog.text
    # the first update after the resume at step 3 (of 5, linear decay, no warmup): factor (5 - 3) / 5;
    # groups: alpha (--coeff_lr 1e-2, unchanged), LoRA (--learning_rate now 5e-3, was 1e-2)
    lrs, step = seen[0]
    assert step == 3
    assert lrs == pytest.approx([1e-2 * 0.4, 5e-3 * 0.4], rel=1e-9)
