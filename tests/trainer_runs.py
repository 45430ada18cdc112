"""Building and running trainer runs in tests: the command line, the final weights, kills at a checkpoint
(in process) and at any moment (subprocesses, one or two ranks), and the checks of what a kill leaves.
Support module, not a test file: test files import from here, never from each other.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamcoeff import read_coeff_file
from dreamcoeff.train import COMPLETE_NAME, list_checkpoints, main
from tests.helpers import make_images
from tests.pausing_entry import TEST_PAUSE_ENV, TEST_STEP_PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "train_dreambooth_coeff.py"
PAUSING_ENTRY = REPO / "tests" / "pausing_entry.py"  # the same trainer, with pauses where kills hurt most
COEFF = "coeff_weights.safetensors"
LORA = "pytorch_lora_weights.safetensors"


def make_square_images(folder: Path, sizes=((64, 64),) * 3, seed=0) -> Path:
    return make_images(folder, sizes, seed)


def trainer_argv(model_dir, instance_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--instance_dir",
        str(instance_dir),
        "--instance_prompt",
        "a photo of sks dog",
        "--output_dir",
        str(out),
        "--resolution",
        "64",
        "--report_to",
        "none",
        "--checkpointing_steps",
        "0",
        *map(str, extra),
    ]


def final_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    if (folder / COEFF).exists():
        tensors.update(read_coeff_file(folder / COEFF)[0])
    if (folder / LORA).exists():
        tensors.update(load_file(str(folder / LORA)))
    return tensors


def assert_same_weights(got: dict, want: dict, atol=1e-5):
    assert got.keys() == want.keys() and want
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= atol, f"max |difference| {worst:g} from the uninterrupted run"
    return worst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_trainer(
    argv, log: Path, processes: int = 1, pause: float | None = None, step_pause: float | None = None
) -> subprocess.Popen:
    """Start the trainer (`processes` > 1: under `accelerate launch`), output to `log`; `pause` / `step_pause`:
    seconds of sleep in its checkpoint writes / after every optimizer step (tests/pausing_entry.py)."""
    entry = PAUSING_ENTRY if pause or step_pause else ENTRY
    if processes == 1:
        cmd = [sys.executable, str(entry), *argv]
    else:  # --multi_gpu picks torchrun; without CUDA the trainer runs its ranks on the CPU with gloo
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(entry),
            *argv,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop(TEST_PAUSE_ENV, None)
    env.pop(TEST_STEP_PAUSE_ENV, None)
    if pause:
        env[TEST_PAUSE_ENV] = str(pause)
    if step_pause:
        env[TEST_STEP_PAUSE_ENV] = str(step_pause)
    # A session of its own, so that a kill reaches the launcher and all its ranks at once.
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def descendant_pids(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def run_trainer_to_end(argv, log: Path, processes: int = 1, timeout: float = 600) -> tuple[int, str]:
    """Run the trainer to its end (`spawn_trainer`; killed if it outlives `timeout`): its exit code and output."""
    proc = spawn_trainer(argv, log, processes=processes)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    return rc, log.read_text()


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the run: the process and everything it started. torchrun puts each rank in a session of
    its own, so killing the launcher's process group alone would leave the ranks running."""
    if proc.poll() is not None:
        return  # already ended: the caller's check reports a kill that did not land
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen, the launcher can start no new rank while we look
    victims = descendant_pids(proc.pid) if Path("/proc").is_dir() else []
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    end = time.monotonic() + 60
    while not all(process_gone(pid) for pid in victims):
        assert time.monotonic() < end, "processes of the killed run are still alive"
        time.sleep(0.05)


def wait_until(cond, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """True once cond() holds; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the training to get there")


def mtime_or_zero(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def checkpoint_steps(out: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(out)]


def assert_checkpoints_complete(out: Path, processes: int, limit: int) -> None:
    """Whatever the moment of the kill, every checkpoint `latest` could pick is complete and loadable."""
    found = list_checkpoints(out)
    assert len(found) <= limit + 1  # the newest is renamed into place just before the oldest goes
    for step, path in found:
        names = {p.name for p in path.iterdir()}
        want = {COEFF, LORA, "optimizer.bin", "scheduler.bin", "args.json", "dreamcoeff_state.json"}
        want |= {f"random_states_{r}.pkl" for r in range(processes)}
        assert want <= names, (path, sorted(names))
        assert json.loads((path / "dreamcoeff_state.json").read_text())["global_step"] == step
        assert all(torch.isfinite(t).all() for t in read_coeff_file(path)[0].values())
    assert not (out / COMPLETE_NAME).exists()


def sample_images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def run_killed_after_checkpoint(monkeypatch, kill_step: int, argv: list[str]) -> None:
    """Run the trainer and simulate a kill right after checkpoint-``kill_step`` is written."""
    import dreamcoeff.train.loop as training

    real_save = training.save_checkpoint

    def save_then_die(accelerator, out, step, limit, *rest):
        path = real_save(accelerator, out, step, limit, *rest)
        if step == kill_step:
            raise KeyboardInterrupt("simulated kill")
        return path

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(training, "save_checkpoint", real_save)


KILL_COMMON = (
    "--tuning",
    "coeff+lora",
    "--checkpointing_steps",
    1,
    "--checkpoints_total_limit",
    3,
    "--random_flip",
    "--lr_scheduler",
    "linear",
    "--coeff_lr",
    "1e-2",
    "--learning_rate",
    "1e-2",
    "--lora_dropout",
    "0.1",
    "--coeff_dropout",
    "0.2",
    "--seed",
    3,
)
