"""SIGTERM (issue 20, item 2): the trainer finishes the current optimizer step, writes a checkpoint, says
how to resume and exits 143; a second SIGTERM or a SIGINT while it stops ends it at once. Resumed with
`--resume_from_checkpoint latest`, a run stopped any number of times ends with the weights of an
uninterrupted one; under `accelerate launch` every rank stops after the same step.

The end-to-end tests run the real entry point with a pause after every optimizer step
(tests/pausing_entry.py), so that a signal at a random moment lands in the loop.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreamcoeff.locking import LOCK_NAME, read_owner
from dreamcoeff.train import COMPLETE_NAME, STOP_EXIT_CODE, list_checkpoints, main
from dreamcoeff.train.stopping import DUPLICATE_WINDOW_S, StopRequest
from tests.trainer_runs import (
    COEFF,
    KILL_COMMON,
    REPO,
    assert_checkpoints_complete,
    assert_same_weights,
    checkpoint_steps,
    descendant_pids,
    final_adapter_weights,
    kill_run,
    make_square_images,
    spawn_trainer,
    trainer_argv,
    wait_until,
)

STOPPED_RE = re.compile(r"dreamcoeff: stopped by SIGTERM at step (\d+) of (\d+); (.*)")


# one thread, accelerate's state reset after each test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


# ------------------------------------------------------------------------------------------------ units


def test_importing_installs_no_signal_handler():
    # compared with the handlers the interpreter started with (a background job starts with SIGINT ignored)
    code = (
        "import signal\n"
        "before = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]\n"
        "import dreamcoeff, dreamcoeff.train, dreamcoeff.sample, dreamcoeff.train.stopping\n"
        "after = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]\n"
        "print(after[0] is before[0], after[1] is before[1])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "True"]


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test (a background job starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_stop_request_sets_a_flag_and_puts_the_handlers_back(capfd, python_sigint):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop:
        assert not stop.requested
        with pytest.raises(KeyboardInterrupt):  # no stop pending: Ctrl-C does what it did before
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # within the duplicate window: the same request, not an exit
        time.sleep(0.05)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    err = capfd.readouterr().err
    assert err.count("SIGTERM received") == 1 and "stopping after the current step with a checkpoint" in err


def test_a_copy_of_sigterm_delivered_inside_the_handler_is_the_same_request(monkeypatch):
    """Python runs a handler again, for a signal that arrives meanwhile, at any call inside it: torchrun's
    forwarded SIGTERM and SLURM's own reach a rank at once. The nested run must see the request already
    made: one announcement, no exit (the two-process SIGTERM test once found three announcements for two
    ranks, this race's signature)."""
    from dreamcoeff.train import stopping

    said: list[str] = []
    monkeypatch.setattr(stopping, "_say", said.append)
    monkeypatch.setattr(stopping.os, "_exit", lambda code: pytest.fail(f"exited with {code}"))
    stop = StopRequest()  # not entered: the handler is called directly, as Python would
    real_monotonic = time.monotonic
    nested: list[bool] = []

    def monotonic_with_a_signal_arriving() -> float:
        if not nested:  # the first call made inside the outer run of the handler
            nested.append(True)
            stop._handle(signal.SIGTERM, None)
        return real_monotonic()

    monkeypatch.setattr(stopping.time, "monotonic", monotonic_with_a_signal_arriving)
    stop._handle(signal.SIGTERM, None)
    assert nested and stop.requested
    assert len(said) == 1 and "SIGTERM received" in said[0], said


def test_stop_request_outside_the_main_thread_installs_nothing():
    import threading

    seen = []

    def body():
        with StopRequest() as stop:
            seen.append((signal.getsignal(signal.SIGTERM), stop.requested))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [(signal.getsignal(signal.SIGTERM), False)]


WAITER = """
import sys, time
from dreamcoeff.train.stopping import StopRequest
with StopRequest() as stop:
    print("ready", flush=True)
    while not stop.requested:
        time.sleep(0.01)
    print("stopping", flush=True)
    time.sleep(float(sys.argv[1]))
print("finished", flush=True)
"""


@pytest.mark.parametrize(
    "second, wait, code",
    [
        (signal.SIGTERM, DUPLICATE_WINDOW_S + 0.3, 128 + signal.SIGTERM),  # a second SIGTERM: exit at once
        (signal.SIGINT, 0.0, 128 + signal.SIGINT),  # Ctrl-C while stopping: exit at once
        (signal.SIGTERM, 0.0, 0),  # the same SIGTERM again at once (torchrun + SLURM): ignored
    ],
    ids=["second SIGTERM", "SIGINT", "duplicate SIGTERM"],
)
def test_a_second_signal_while_stopping(second, wait, code):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    linger = 4.0  # the "stop" takes this long
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(linger + wait)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "stopping"
        time.sleep(wait)
        sent = time.monotonic()
        proc.send_signal(second)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert rc == code, err
    if code:
        assert took < 2.0 and "finished" not in out  # at once, not after the stop's work
        assert "while stopping: exiting at once" in err and "--resume_from_checkpoint latest" in err
    else:
        assert "finished" in out


# ------------------------------------------------------------------------------------------------ end to end


def _progress(log: Path, total: int) -> int:
    """The step tqdm shows last in `log` ("7/10")."""
    found = re.findall(rf"\b(\d+)/{total}\b", log.read_text(errors="replace"))
    return int(found[-1]) if found else -1


def _stopped(log: Path) -> tuple[int, str]:
    """The step and the rest of the trainer's stop message (exactly one in the log)."""
    found = STOPPED_RE.findall(log.read_text(errors="replace"))
    assert len(found) == 1, log.read_text()[-3000:]
    return int(found[0][0]), found[0][2]


def _wait_rc(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_run(proc)
            raise AssertionError("the run did not stop:\n" + log.read_text()[-3000:])


STOP_COMMON = (*KILL_COMMON, "--checkpointing_steps", 0)  # every checkpoint is SIGTERM's


@pytest.mark.slow
def test_sigterm_at_random_moments_then_resume_matches_uninterrupted(tiny_pipeline_dir, tmp_path, capsys):
    inst = make_square_images(tmp_path / "inst")
    steps = 16
    ref = tmp_path / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref, "--max_train_steps", steps, *STOP_COMMON)) == 0
    reference = final_adapter_weights(ref)

    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", steps, *STOP_COMMON)
    rng = random.Random(int(os.environ.get("DREAMCOEFF_KILL_SEED", "5")))
    moments = ["loading", "random", "random", "random"]
    stops = []
    for n, moment in enumerate(moments):
        log = logs / f"attempt{n}.log"
        start = (checkpoint_steps(out) or [0])[-1]
        proc = spawn_trainer(argv + (["--resume_from_checkpoint", "latest"] if n else []), log, step_pause=0.3)
        try:
            if moment == "loading":  # the lock is taken: the handler is in place; the model is not loaded yet
                assert wait_until(lambda: (out / LOCK_NAME).exists(), proc)
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                target = start + rng.randint(1, 2)
                assert wait_until(lambda: _progress(log, steps) >= target, proc), log.read_text()[-3000:]
                time.sleep(rng.uniform(0.0, 0.3))
            assert proc.poll() is None, f"attempt {n} ended before the signal:\n" + log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            rc = _wait_rc(proc, log)
        finally:
            if proc.poll() is None:
                kill_run(proc)
        assert rc == STOP_EXIT_CODE, log.read_text()[-3000:]
        step, rest = _stopped(log)
        assert step >= start and "Traceback" not in log.read_text()
        if step > start:  # it had made steps: their checkpoint is the stop's, complete, and named
            assert checkpoint_steps(out)[-1] == step
            assert rest == (
                f"the newest checkpoint is {out / f'checkpoint-{step}'}. To resume, run the same command with "
                f"--resume_from_checkpoint latest (it continues in {out})"
            )
            assert_checkpoints_complete(out, 1, 3)
        elif not checkpoint_steps(out):  # stopped while loading, before any checkpoint
            assert rest.startswith(f"no checkpoint had been written in {out}")
        assert not (out / LOCK_NAME).exists() and not (out / COMPLETE_NAME).exists()
        stops.append(f"{moment}@{step}")
    proc = spawn_trainer(argv + ["--resume_from_checkpoint", "latest"], logs / "final.log")
    assert _wait_rc(proc, logs / "final.log") == 0, (logs / "final.log").read_text()[-3000:]
    worst = assert_same_weights(final_adapter_weights(out), reference)
    with capsys.disabled():
        print(f"SIGTERMs survived: {len(stops)} ({', '.join(stops)}); max |weight difference| {worst:.2g}")
    assert sum(s.startswith("random") for s in stops) == 3


@pytest.mark.slow
def test_a_second_signal_while_stopping_exits_at_once_and_latest_stays_valid(tiny_pipeline_dir, tmp_path, capsys):
    """The stop's checkpoint is slow (3 s pauses, tests/pausing_entry.py): a second SIGTERM (after the
    duplicate window) or a SIGINT during it ends the run at once; the partial checkpoint is never taken by
    `latest`, and the run resumed from the last complete one still ends with the uninterrupted weights."""
    inst = make_square_images(tmp_path / "inst")
    steps = 8
    ref = tmp_path / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref, "--max_train_steps", steps, *STOP_COMMON)) == 0
    reference = final_adapter_weights(ref)
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", steps, *STOP_COMMON)

    # a clean stop first, for a complete checkpoint to fall back on
    proc = spawn_trainer(argv, logs / "first.log", step_pause=0.3)
    assert wait_until(lambda: _progress(logs / "first.log", steps) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert _wait_rc(proc, logs / "first.log") == STOP_EXIT_CODE
    good = checkpoint_steps(out)[-1]

    took_all, previous = [], None
    for n, second in enumerate((signal.SIGTERM, signal.SIGINT)):
        log = logs / f"attempt{n}.log"
        proc = spawn_trainer(argv + ["--resume_from_checkpoint", "latest"], log, pause=3.0, step_pause=0.3)
        try:
            assert wait_until(lambda: _progress(log, steps) >= good + 1, proc), log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            first_at = time.monotonic()
            assert wait_until(lambda: any(out.glob(f"checkpoint-*.tmp/{COEFF}")), proc), log.read_text()[-3000:]
            if second == signal.SIGTERM:  # a later SIGTERM, not the duplicate of the first
                time.sleep(max(0.0, first_at + DUPLICATE_WINDOW_S + 0.2 - time.monotonic()))
            assert proc.poll() is None and any(out.glob("checkpoint-*.tmp"))
            sent = time.monotonic()
            proc.send_signal(second)
            rc = _wait_rc(proc, log)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                kill_run(proc)
        assert rc == 128 + second, log.read_text()[-3000:]
        assert took < 2.5, took  # at once: the checkpoint's remaining 3 s pause was not waited for
        took_all.append(f"{signal.Signals(second).name} {took:.2f} s")
        text = log.read_text()
        assert "while stopping: exiting at once" in text and "stopped by SIGTERM at step" not in text
        assert list(out.glob("checkpoint-*.tmp")), "the signal missed the checkpoint being written"
        assert checkpoint_steps(out)[-1] == good  # latest is still the last complete checkpoint
        assert_checkpoints_complete(out, 1, 3)
        assert read_owner(out).pid == proc.pid  # it exited holding the lock: the kernel released it, the file stays
        if previous is not None:  # the next run took over the lock of the previous one, which had exited at once
            assert f"taking over the lock of a run that ended without releasing it (pid {previous}" in text
        previous = proc.pid
    proc = spawn_trainer(argv + ["--resume_from_checkpoint", "latest"], logs / "final.log")
    assert _wait_rc(proc, logs / "final.log") == 0, (logs / "final.log").read_text()[-3000:]
    assert not list(out.glob("checkpoint-*.tmp")) and not (out / LOCK_NAME).exists()
    assert (
        f"taking over the lock of a run that ended without releasing it (pid {previous}"
        in (logs / "final.log").read_text()
    )
    worst = assert_same_weights(final_adapter_weights(out), reference)
    with capsys.disabled():
        print(f"second signal while stopping: exited after {', '.join(took_all)}; max |difference| {worst:.2g}")


@pytest.mark.slow
def test_sigterm_with_two_processes_stops_every_rank_at_the_same_step(tiny_pipeline_dir, tmp_path, capsys):
    """SIGTERM to the launcher alone (as Kubernetes sends it to the container's first process: torchrun
    forwards it to the ranks), then to the launcher and every rank at once (as SLURM signals every process
    of a job step); each time both ranks stop after the same step, with one checkpoint; then resumed, the
    run ends with the weights of an uninterrupted one."""
    inst = make_square_images(tmp_path / "inst", sizes=((64, 64),) * 4)  # 2 ranks x batch 1: 2 steps per epoch
    steps = 8
    common = ("--max_train_steps", steps, *STOP_COMMON)
    ref = tmp_path / "ref"
    proc = spawn_trainer(trainer_argv(tiny_pipeline_dir, inst, ref, *common), tmp_path / "ref.log", processes=2)
    assert _wait_rc(proc, tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference = final_adapter_weights(ref)

    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    argv = trainer_argv(tiny_pipeline_dir, inst, out, *common)
    rng = random.Random(int(os.environ.get("DREAMCOEFF_KILL_SEED", "13")))
    stops = []
    for n, whom in enumerate(("launcher", "every process")):
        log = logs / f"attempt{n}.log"
        start = (checkpoint_steps(out) or [0])[-1]
        proc = spawn_trainer(
            argv + (["--resume_from_checkpoint", "latest"] if n else []), log, processes=2, step_pause=0.3
        )
        try:
            target = start + rng.randint(1, 2)
            assert wait_until(lambda: _progress(log, steps) >= target, proc), log.read_text()[-3000:]
            time.sleep(rng.uniform(0.0, 0.3))
            ranks = descendant_pids(proc.pid) if whom == "every process" else []
            for pid in [proc.pid, *ranks]:
                os.kill(pid, signal.SIGTERM)
            rc = _wait_rc(proc, log)
        finally:
            if proc.poll() is None:
                kill_run(proc)
        text = log.read_text()
        assert rc != 0  # the launcher's own code: torchrun re-raises the signal it got (1)
        step, _ = _stopped(log)  # said once, by the main process
        per_rank = re.findall(r"process (\d): stopping on SIGTERM at step (\d+)", text)
        assert sorted(per_rank) == [("0", str(step)), ("1", str(step))], text[-3000:]
        assert text.count("SIGTERM received (pid") == 2  # each rank's once: the duplicates were absorbed
        assert "while stopping" not in text
        assert checkpoint_steps(out)[-1] == step > start
        assert_checkpoints_complete(out, 2, 3)  # random_states_0 and _1: both ranks saved that step
        stops.append(f"{whom}@{step} (launcher exit {rc})")
    proc = spawn_trainer(argv + ["--resume_from_checkpoint", "latest"], logs / "final.log", processes=2)
    assert _wait_rc(proc, logs / "final.log") == 0, (logs / "final.log").read_text()[-3000:]
    assert "weights identical on all 2 processes" in (logs / "final.log").read_text()
    worst = assert_same_weights(final_adapter_weights(out), reference)
    assert [s for s, _ in list_checkpoints(out)][-1] == step
    with capsys.disabled():
        print(f"SIGTERMs survived (2 processes): {', '.join(stops)}; max |difference| {worst:.2g}")
