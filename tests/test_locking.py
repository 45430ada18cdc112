"""One run per output folder (issue 20, item 1): `dreamcoeff.locking` and its use by the trainer and the sampler.

A second trainer on a folder that a live run holds (fresh, with --overwrite_output_dir, or resuming) exits 2
at once naming the first run, and leaves every file of the folder byte for byte as it was; so does a second
sampler. A lock whose owner died (kill -9: the kernel released it, the file stayed) is taken over with a
warning. The lock module is unit-tested here too, its fallback without fcntl included.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreamcoeff import locking
from dreamcoeff.locking import LOCK_NAME, FolderBusyError, FolderLock, LockOwner, read_owner
from dreamcoeff.train import COMPLETE_NAME, main
from tests.trainer_runs import (
    COEFF,
    KILL_COMMON,
    REPO,
    checkpoint_steps,
    kill_run,
    make_square_images,
    run_trainer_to_end,
    spawn_trainer,
    trainer_argv,
    wait_until,
)

HOLDER = (
    "import sys, time\n"
    "from dreamcoeff.locking import FolderLock\n"
    "FolderLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


# one thread, accelerate's state reset after each test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


@pytest.fixture
def holder():
    """Start processes that hold a folder's lock (another run); each is SIGKILLed at the end."""
    procs: list[subprocess.Popen] = []

    def start(folder: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _busy_message(folder: Path, flag: str) -> str:
    owner = read_owner(folder)
    assert owner is not None and owner.pid is not None
    return f"another run ({owner.describe()}) is using {folder}: wait for it, or choose another {flag}"


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: files with their bytes and modification time, folders by name."""
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        found[rel] = ("dir",) if p.is_dir() else (p.stat().st_mtime_ns, p.read_bytes())
    return found


# ------------------------------------------------------------------------------------------------ the lock


def test_lock_records_its_owner_and_removes_its_file(tmp_path):
    with FolderLock(tmp_path, flag="--output_dir") as lock:
        assert lock.held and lock.previous is None
        data = json.loads((tmp_path / LOCK_NAME).read_text())
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        assert read_owner(tmp_path) == LockOwner(os.getpid(), socket.gethostname(), data["started"])
        assert data["started"][:4].isdigit() and "T" in data["started"]  # ISO 8601, with its UTC offset
        with pytest.raises(FolderBusyError):  # even in the same process: another open file, another run
            FolderLock(tmp_path).acquire()
    assert not lock.held and not (tmp_path / LOCK_NAME).exists() and tmp_path.is_dir()
    lock.release()  # twice is harmless
    FolderLock(tmp_path).acquire().release()  # free again


def test_a_held_folder_is_refused_naming_its_owner(tmp_path, holder):
    proc = holder(tmp_path)
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(FolderBusyError) as info:
        FolderLock(tmp_path, flag="--output").acquire()
    owner = read_owner(tmp_path)
    assert owner.pid == proc.pid and owner.host == socket.gethostname()
    assert str(info.value) == (
        f"another run (pid {proc.pid} on {socket.gethostname()}, started {owner.started}) is using {tmp_path}: "
        "wait for it, or choose another --output"
    )
    assert info.value.owner == owner
    assert (tmp_path / LOCK_NAME).read_bytes() == before  # the refused one wrote nothing


def test_the_lock_of_a_killed_owner_is_taken_over_with_a_warning(tmp_path, holder):
    proc = holder(tmp_path)
    dead = read_owner(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert read_owner(tmp_path) == dead  # the kernel released the lock; the file stays
    warnings: list[str] = []
    with FolderLock(tmp_path, warn=warnings.append) as lock:
        assert lock.previous == dead
        assert read_owner(tmp_path).pid == os.getpid()
    assert warnings == [
        f"{tmp_path}: taking over the lock of a run that ended without releasing it "
        f"(pid {proc.pid} on {socket.gethostname()}, started {dead.started})"
    ]
    # an empty lock file (an owner killed before it wrote its name) is no warning, a garbled one is
    (tmp_path / LOCK_NAME).write_text("")
    FolderLock(tmp_path, warn=warnings.append).acquire().release()
    (tmp_path / LOCK_NAME).write_text("not json")
    FolderLock(tmp_path, warn=warnings.append).acquire().release()
    assert len(warnings) == 2 and "(pid ? on ?, started ?)" in warnings[1]


def test_a_missing_folder_is_created_and_removed_again_when_unused(tmp_path):
    folder = tmp_path / "a" / "b"
    with FolderLock(folder):
        assert (folder / LOCK_NAME).is_file()
    assert not folder.exists()  # a run refused right after taking the lock leaves no trace
    with FolderLock(folder):
        (folder / "written.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["written.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        FolderLock(tmp_path / "file").acquire()


def test_an_owner_releasing_while_we_open_the_file_is_not_a_second_lock(tmp_path, monkeypatch):
    """The owner removes the file while we hold a descriptor of it: our flock then succeeds on a file
    nobody else will look at. The lock must notice and take the file that is at the path now."""
    first = FolderLock(tmp_path).acquire()
    real_flock = locking.fcntl.flock
    calls = []

    def flock_after_release(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            first.release()  # between our open() and our flock()
        return real_flock(fd, op)

    monkeypatch.setattr(locking.fcntl, "flock", flock_after_release)
    second = FolderLock(tmp_path).acquire()
    monkeypatch.setattr(locking.fcntl, "flock", real_flock)
    assert len(calls) == 2  # the first lock was on the removed file: retried
    assert os.path.samestat(os.fstat(second._fd), os.stat(tmp_path / LOCK_NAME))
    with pytest.raises(FolderBusyError):
        FolderLock(tmp_path).acquire()
    second.release()


def test_without_fcntl_or_lock_support_it_warns_and_goes_on(tmp_path, monkeypatch):
    warnings: list[str] = []
    monkeypatch.setattr(locking, "fcntl", None)
    with FolderLock(tmp_path / "w", warn=warnings.append) as lock:
        assert not lock.held
    assert warnings == [f"cannot lock {tmp_path / 'w'} on this platform (no fcntl): make sure no other run uses it"]
    monkeypatch.undo()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_locks)
    with FolderLock(tmp_path, warn=warnings.append) as lock:
        assert not lock.held
    assert "No locks available" in warnings[-1] and not (tmp_path / LOCK_NAME).exists()


def test_importable_without_fcntl(tmp_path):
    """Windows has no fcntl: the package imports, and a lock is a warning."""
    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import dreamcoeff.locking, dreamcoeff.train, dreamcoeff.sample.cli\n"
        "from dreamcoeff.locking import FolderLock\n"
        "lock = FolderLock(sys.argv[1], warn=print).acquire()\n"
        "print('held', lock.held)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(no fcntl)" in res.stdout and "held False" in res.stdout


# ------------------------------------------------------------------------------------------------ trainer


@pytest.mark.slow
def test_second_trainer_refused_while_the_first_runs_and_nothing_touched(tiny_pipeline_dir, tmp_path, capsys):
    """The first run is frozen (SIGSTOP) in the middle of writing a checkpoint, lock held: a second trainer,
    fresh, with --overwrite_output_dir or resuming, exits 2 at once; the folder, leftovers of the checkpoint
    being written included, is byte-identical afterwards; the first run then finishes."""
    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "run"
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", 4, *KILL_COMMON)
    first = spawn_trainer(argv, tmp_path / "first.log", pause=1.0)
    try:
        spawned = time.time()
        assert wait_until(
            lambda: any(p.stat().st_mtime >= spawned for p in out.glob(f"checkpoint-*.tmp/{COEFF}")), first
        ), (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGSTOP)
        before = _snapshot(out)
        assert LOCK_NAME in before and any(name.endswith(".tmp") for name in before)
        message = _busy_message(out, "--output_dir")
        assert read_owner(out).pid == first.pid
        seconds = []
        for extra in ([], ["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]):
            t0 = time.perf_counter()
            code = main(argv + extra)
            seconds.append(time.perf_counter() - t0)
            err = capsys.readouterr().err
            assert code == 2, err
            assert f"error: {message}\n" in err and "Traceback" not in err
            assert _snapshot(out) == before, extra
        with capsys.disabled():
            print(f"second trainer refused in {', '.join(f'{s:.2f}' for s in seconds)} s (fresh, overwrite, resume)")
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGCONT)
            kill_run(first)
    assert (out / COMPLETE_NAME).is_file() and not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_second_trainer_refused_on_every_rank_of_a_two_process_launch(tiny_pipeline_dir, tmp_path, holder):
    """Only the main process takes the lock; the other one waits for its verdict, and both stop with it."""
    inst = make_square_images(tmp_path / "inst", sizes=((64, 64),) * 4)
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    holder(out)
    before = _snapshot(out)
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", 2, "--overwrite_output_dir")
    rc, log = run_trainer_to_end(argv, tmp_path / "two.log", processes=2)
    assert rc != 0, log[-3000:]
    assert log.count(f"error: {_busy_message(out, '--output_dir')}") == 2, log[-3000:]  # one line per rank
    assert "exitcode  : 2" in log  # torchrun's report: the ranks exited 2 (the launcher itself reports 1)
    assert _snapshot(out) == before


def test_a_runs_own_overwrite_keeps_its_lock(tiny_pipeline_dir, tmp_path, monkeypatch):
    """--overwrite_output_dir cleans the replaced run's files, never the lock file of the run doing it."""
    import dreamcoeff.train.loop as loop

    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "out"
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", 1, "--checkpointing_steps", 1)
    assert main(argv) == 0
    assert not (out / LOCK_NAME).exists()  # released at the end of the run
    seen = []

    def still_ours(when):
        assert read_owner(out).pid == os.getpid(), when
        with pytest.raises(FolderBusyError):  # and held: another run would be refused
            FolderLock(out).acquire()
        seen.append(when)

    for name in ("clean_output_dir", "stage_final_files"):
        real = getattr(loop, name)

        def spy(*a, _real=real, _name=name, **k):
            result = _real(*a, **k)
            still_ours(f"after {_name}")
            return result

        monkeypatch.setattr(loop, name, spy)
    argv = trainer_argv(
        tiny_pipeline_dir, inst, out, "--max_train_steps", 1, "--tuning", "lora", "--overwrite_output_dir"
    )
    assert main(argv) == 0
    assert seen == ["after clean_output_dir", "after stage_final_files"]
    assert not (out / LOCK_NAME).exists() and not checkpoint_steps(
        out
    )  # the replaced run's checkpoint went, the lock too


def test_a_trainer_takes_over_the_lock_of_a_killed_run(tiny_pipeline_dir, tmp_path, holder, caplog):
    inst = make_square_images(tmp_path / "inst")
    out = tmp_path / "out"
    proc = holder(out)
    dead = read_owner(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with caplog.at_level("WARNING", logger="dreamcoeff"):
        assert main(trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", 1)) == 0
    assert f"taking over the lock of a run that ended without releasing it ({dead.describe()})" in caplog.text
    assert not (out / LOCK_NAME).exists() and (out / COMPLETE_NAME).is_file()


# ------------------------------------------------------------------------------------------------ sampler


def test_sampler_refuses_an_output_folder_in_use(tiny_pipeline_dir, tmp_path, holder, capsys):
    from dreamcoeff.sample import main as sample_main

    out = tmp_path / "grids"
    holder(out)
    (out / "manifest.json").write_text("{}")
    before = _snapshot(out)
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--include_base", "--prompt", "a dog",
            "--num_inference_steps", "1", "--no_progress", "--output", str(out)]  # fmt: skip
    for extra in ([], ["--overwrite"]):
        assert sample_main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err == f"dreamcoeff-sample: error: {_busy_message(out, '--output')}\n"
        assert _snapshot(out) == before


def test_sampler_takes_over_a_stale_lock_and_leaves_none(tiny_pipeline_dir, tmp_path, holder, capsys):
    from dreamcoeff.sample import main as sample_main

    out = tmp_path / "grids"
    proc = holder(out)  # an output folder holding nothing but the lock file of a killed sampler
    dead = read_owner(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--include_base", "--prompt", "a dog",
            "--num_inference_steps", "1", "--no_progress", "--output", str(out)]  # fmt: skip
    assert sample_main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"warning: {out}: taking over the lock of a run that ended without releasing it ({dead.describe()})" in err
    assert (out / "manifest.json").is_file() and not (out / LOCK_NAME).exists()
