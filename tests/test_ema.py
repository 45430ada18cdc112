"""--use_ema (issue 17, item 8): the final weights are the moving average of the trained ones, computed
independently here from the run's per-step checkpoints, and a resumed run ends with the same average."""

from __future__ import annotations

import pytest
import torch

from dreamcoeff import read_coeff_file
from dreamcoeff.train import main
from tests.helpers import make_images
from tests.trainer_runs import final_adapter_weights, run_killed_after_checkpoint, trainer_argv

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")

COMMON = ("--tuning", "coeff+lora", "--max_train_steps", 5, "--coeff_lr", "5e-2", "--learning_rate", "5e-2",
          "--ema_decay", "0.6")  # fmt: skip


@pytest.mark.slow
def test_ema_final_weights_are_the_average_of_the_trained_steps(tiny_pipeline_dir, tmp_path):
    inst = make_images(tmp_path / "inst")
    # the live trajectory, one checkpoint per step (EMA does not change training, so it is the same one)
    live = tmp_path / "live"
    assert main(trainer_argv(tiny_pipeline_dir, inst, live, *COMMON, "--checkpointing_steps", 1)) == 0
    steps = [final_adapter_weights(live / f"checkpoint-{n}") for n in range(1, 6)]
    ema_run = tmp_path / "ema"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ema_run, *COMMON, "--use_ema")) == 0
    got = final_adapter_weights(ema_run)
    assert got.keys() == steps[0].keys()
    # float64 reference: shadow = w_1, then shadow = d_n shadow + (1 - d_n) w_n with d_n = min((1+k)/(10+k), decay), k = n-1
    for key in got:
        shadow = steps[0][key].double()
        for n in range(2, 6):
            k = n - 1
            d = min((1 + k) / (10 + k), 0.6)
            shadow = d * shadow + (1 - d) * steps[n - 1][key].double()
        torch.testing.assert_close(got[key].double(), shadow, rtol=0, atol=1e-6)
    # and the average is not simply the last step's weights (the comparison above can fail)
    alpha = next(k for k in got if k.endswith(".alpha"))
    assert (steps[-1][alpha] - got[alpha]).abs().max() > 1e-4
    assert read_coeff_file(ema_run)[1]["format"] == "dreamcoeff"


@pytest.mark.slow
def test_ema_resumes_exactly(tiny_pipeline_dir, tmp_path, monkeypatch):
    inst = make_images(tmp_path / "inst")
    ref = tmp_path / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref, *COMMON, "--use_ema", "--checkpointing_steps", 2)) == 0
    out = tmp_path / "run"
    argv = trainer_argv(tiny_pipeline_dir, inst, out, *COMMON, "--use_ema", "--checkpointing_steps", 2)
    run_killed_after_checkpoint(monkeypatch, 2, argv)
    assert main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    reference, resumed = final_adapter_weights(ref), final_adapter_weights(out)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6)


def test_ema_flags_are_checked(tmp_path, capsys):
    inst = make_images(tmp_path / "inst")
    assert main(trainer_argv(tmp_path / "m", inst, tmp_path / "o", "--use_ema", "--ema_decay", "1.5")) == 2
    assert "--ema_decay must be in (0, 1)" in capsys.readouterr().err
