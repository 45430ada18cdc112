"""The package as `pip install dreamcoeff` users get it: a wheel built from the tracked files alone.

The wheel must hold the prompt files and the CPU kernel's source (package data), and an install of it
(not editable: nothing may be read from the repository) must run both console scripts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked_copy(dest: Path) -> Path:
    """The repository's files as a clean clone holds them (tracked, plus new files git does not
    ignore, so a change not yet committed is tested too), without the shipped model and data."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout  # fmt: skip
    for name in files.decode().split("\0"):
        if not name or name.startswith(("models/", "samples/", "benchmarks/")):
            continue
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to list the tracked files")
    src = _tracked_copy(tmp_path_factory.mktemp("clone") / "dreamcoeff")
    dist = tmp_path_factory.mktemp("dist")
    # No build isolation: the test environment has setuptools, and the build needs no network.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (found,) = dist.glob("dreamcoeff-*.whl")
    return found


def test_wheel_holds_package_data_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "dreamcoeff/prompts/dreambooth_live.txt",
        "dreamcoeff/prompts/dreambooth_objects.txt",
        "dreamcoeff/prompts/validation.txt",
        "dreamcoeff/attention/csrc/mixed_attention_cpu.cpp",
        "dreamcoeff/train/loop.py",
        "dreamcoeff/sample/cli.py",
        "dreamcoeff/testing/tiny.py",
    ):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "benchmarks/", "models/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "dreamcoeff-train = dreamcoeff.train.cli:main" in text
    assert "dreamcoeff-sample = dreamcoeff.sample.cli:main" in text


@pytest.mark.slow
def test_installed_wheel_runs_both_commands(wheel, tmp_path, tiny_pipeline_dir):
    """A fresh virtual environment with the wheel (the test environment's third-party packages reused
    through a .pth file), run from a folder with no repository in sight."""
    env_dir = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(env_dir)], check=True)  # with its own pip (ensurepip, offline)
    python = env_dir / "bin" / "python"
    # The environment's own pip installs the wheel: its scripts then run this environment's Python, and
    # it cannot touch the test environment's editable install (pip uninstalls an installed copy of a
    # package it installs, and `--prefix` from the test environment's pip would).
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # torch, diffusers, ... from the test environment; a plain path line does not run that folder's
    # own .pth files, so the editable install of the repository is not visible here.
    Path(site, "reuse_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run(
        [python, "-c", "import dreamcoeff, sys; print(dreamcoeff.__file__)"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where  # the wheel's copy, not the repository's

    train = subprocess.run(
        [env_dir / "bin" / "dreamcoeff-train", "--help"], cwd=run_dir, env=env, capture_output=True, text=True
    )
    assert train.returncode == 0, train.stderr
    assert "--pretrained_model_name_or_path" in train.stdout and "--tuning" in train.stdout

    # the demo's 53 MB model is the repository's, not the wheel's: a clear message naming --model
    demo = subprocess.run([python, "-m", "dreamcoeff.demo", "--output_dir", str(tmp_path / "demo")],
                          cwd=run_dir, env=env, capture_output=True, text=True)  # fmt: skip
    assert demo.returncode == 1 and "Traceback" not in demo.stderr, demo.stderr[-3000:]
    assert "not with the pip package" in demo.stderr and "--model <clone>/models/microworld-sdxl-v2" in demo.stderr

    out = tmp_path / "grid"
    sample = subprocess.run(
        [
            env_dir / "bin" / "dreamcoeff-sample",
            "--pretrained_model_name_or_path",
            str(tiny_pipeline_dir),
            "--include_base",
            "--prompts",
            "validation",
            "--token",
            "sks",
            "--class_name",
            "dog",
            "--num_inference_steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--no_progress",
            "--output",
            str(out),
        ],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert "a sks dog on the beach" in settings["prompts"]  # the packaged validation.txt, placeholders filled
    assert Path(settings["prompt_file"]).is_relative_to(env_dir)  # read from the installed package
    assert (out / "grid_s0.png").is_file()
