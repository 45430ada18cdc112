"""Fast unit tests of `dreamcoeff.train.checkpoints`: each function called directly on tmp folders.

No training run, no subprocess: the checkpoint code's behaviour (what is written, renamed, kept aside
or refused, and what the messages say) is checked here against expectations written out by hand, so
that mutation testing (`[tool.mutmut]` in pyproject.toml) can tell a wrong line in seconds. The slow
end-to-end tests (tests/test_resume.py, tests/test_reliability.py, tests/test_full_disk.py) show the
same behaviour inside real training runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreamcoeff.io import WriteError
from dreamcoeff.train import checkpoints as ck
from dreamcoeff.train.card import TrainResult
from dreamcoeff.train.checkpoints import (
    COMPLETE_NAME,
    DATASET_CONFIG_DIGEST,
    STATE_NAME,
    TrainingError,
)
from dreamcoeff.train.config import TrainConfig, UsageError

# Written out here rather than imported, so that a renamed constant shows as a failure.
ALPHA_FILE = "coeff_weights.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
VOLATILE = ("resume_from_checkpoint", "output_dir", "overwrite_output_dir", "report_to", "logging_dir",
            "dataloader_num_workers")  # fmt: skip
STRUCTURAL = ("tuning", "optimizer", "use_8bit_adam", "use_ema", "coeff_targets", "coeff_structure", "rank",
              "lora_alpha", "train_text_encoder_ti", "train_text_encoder", "token_abstraction",
              "num_new_tokens_per_abstraction")  # fmt: skip
END_OF_WRITE_MESSAGE = (
    ". Files already there are intact (each is written under a temporary name, then renamed); free some "
    "space and rerun with --resume_from_checkpoint latest"
)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path="m", **kw)


def _optimizer_state(updates: int | None) -> dict:
    state = {} if updates is None else {0: {"step": torch.tensor(float(updates)), "exp_avg": torch.zeros(3)}}
    return {"state": state, "param_groups": [{"lr": 1e-3, "params": [0]}]}


def _write_parts(folder: Path, updates: int | None = 2) -> None:
    """The files accelerate's save_state writes (optimizer, scheduler, RNG) and one trained part."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_optimizer_state(updates), folder / "optimizer.bin")
    torch.save({"last_epoch": 2}, folder / "scheduler.bin")
    torch.save({"seed": 1}, folder / "random_states_0.pkl")
    save_file({"w": torch.arange(4.0)}, str(folder / ALPHA_FILE))


def _checkpoint(out: Path, step: int, updates: int | None = None, manifest: bool = True, **state) -> Path:
    """An intact checkpoint-<step> as `save_checkpoint` leaves it (its state record last)."""
    folder = out / f"checkpoint-{step}"
    _write_parts(folder, step if updates is None else updates)
    record = {"global_step": step, "optimizer_steps": step if updates is None else updates}
    if manifest:
        record["files"] = {p.name: p.stat().st_size for p in folder.iterdir()}
    record.update(state)
    (folder / STATE_NAME).write_text(json.dumps(record))
    return folder


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dreamcoeff"]


# ------------------------------------------------------------------------------------------------
# Finding a previous run and its checkpoints


def test_has_previous_run_sees_each_kind_of_file(tmp_path):
    assert ck.has_previous_run(tmp_path / "missing") is False
    (tmp_path / "a-file").write_text("x")
    assert ck.has_previous_run(tmp_path / "a-file") is False  # not a folder
    for name in ("args.json", COMPLETE_NAME, ALPHA_FILE, LORA_FILE, "run_emb.safetensors"):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / "notes.txt").write_text("unrelated")
        assert ck.has_previous_run(out) is False, name
        (out / name).write_text("x")
        assert ck.has_previous_run(out) is True, name
    out = tmp_path / "ckpt"
    (out / "checkpoint-3").mkdir(parents=True)
    assert ck.has_previous_run(out) is False  # a checkpoint without its state record is no checkpoint
    (out / "checkpoint-3" / STATE_NAME).write_text("{}")
    assert ck.has_previous_run(out) is True


def test_list_checkpoints_takes_only_complete_checkpoint_folders_by_step(tmp_path):
    assert ck.list_checkpoints(tmp_path / "missing") == []
    for step in (10, 9, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_NAME).write_text("{}")
    # set aside, being written, without a state record, a file: none of them is a checkpoint
    for name in ("checkpoint-11.broken", "checkpoint-12.tmp", "checkpoint-13.old", "checkpoint-x", "checkpoint-5"):
        (tmp_path / name).mkdir()
        if name != "checkpoint-5":
            (tmp_path / name / STATE_NAME).write_text("{}")
    (tmp_path / "checkpoint-7").write_text("a file")
    (tmp_path / STATE_NAME).write_text("{}")
    assert ck.list_checkpoints(tmp_path) == [(s, tmp_path / f"checkpoint-{s}") for s in (2, 9, 10)]


# ------------------------------------------------------------------------------------------------
# checkpoint_problem / _file_problem


def test_an_intact_checkpoint_has_no_problem_with_or_without_a_manifest(tmp_path):
    assert ck.checkpoint_problem(_checkpoint(tmp_path, 3)) is None
    assert ck.checkpoint_problem(_checkpoint(tmp_path / "old", 3, manifest=False)) is None


def test_the_state_record_must_name_the_folders_step(tmp_path):
    folder = _checkpoint(tmp_path, 3)
    state = json.loads((folder / STATE_NAME).read_text())
    (folder / STATE_NAME).write_text(json.dumps({**state, "global_step": 4}))
    assert ck.checkpoint_problem(folder) == f"{STATE_NAME} says step 4, the folder's name step 3"
    # a folder named otherwise (a copy the user named) has no step in its name to compare
    renamed = folder.rename(tmp_path / "my-copy")
    (renamed / STATE_NAME).write_text(json.dumps({**state, "global_step": 4, "optimizer_steps": 3}))
    assert ck.checkpoint_problem(renamed) is None


def test_the_manifest_names_a_missing_or_resized_file(tmp_path):
    folder = _checkpoint(tmp_path, 3)
    (folder / "extra.json").write_text('{"a": 1}')
    state = json.loads((folder / STATE_NAME).read_text())
    state["files"]["extra.json"] = (folder / "extra.json").stat().st_size
    (folder / STATE_NAME).write_text(json.dumps(state))
    assert ck.checkpoint_problem(folder) is None
    (folder / "extra.json").write_text('{"a": 1}    ')  # still valid JSON: only the size tells
    size = (folder / "extra.json").stat().st_size
    expected = f"extra.json is truncated or altered ({size} bytes, {state['files']['extra.json']} when written)"
    assert ck.checkpoint_problem(folder) == expected
    (folder / "extra.json").unlink()
    assert ck.checkpoint_problem(folder) == "extra.json is missing"  # not one of the files every checkpoint has


def test_without_a_manifest_the_files_every_checkpoint_has_are_required(tmp_path):
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        folder = _checkpoint(tmp_path / name, 3, manifest=False)
        (folder / name).unlink()
        assert ck.checkpoint_problem(folder) == f"{name} is missing"


def _corrupt_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("data/a.txt", b"hello world " * 50)
    blob = path.read_bytes()
    at = blob.index(b"hello world", 200)
    path.write_bytes(blob[:at] + b"hellO" + blob[at + 5 :])  # same length, wrong CRC


def test_each_file_format_is_checked(tmp_path):
    cases = {
        "args.json": (lambda p: p.write_text("{not json"), "args.json is unreadable (JSONDecodeError: "),
        "extra.pt": (
            lambda p: p.write_bytes(b"\x80\x02 truncated"),
            "extra.pt is not a complete torch.save archive (truncated?)",
        ),  # fmt: skip
        "state.pkl": (lambda p: p.write_bytes(b"\x80\x02"), "state.pkl is not a complete torch.save archive"),
        "extra.bin": (_corrupt_zip, "extra.bin is corrupt (CRC error in data/a.txt)"),
        "sub/w.safetensors": (
            lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
            "sub/w.safetensors is unreadable (",
        ),  # fmt: skip
    }
    for name, (breaker, expected) in cases.items():
        folder = _checkpoint(tmp_path / name.replace("/", "_"), 3, manifest=False)
        (folder / name).parent.mkdir(exist_ok=True)
        breaker(folder / name)
        problem = ck.checkpoint_problem(folder)
        assert problem is not None and problem.startswith(expected), (name, problem)
    # other suffixes are not judged
    folder = _checkpoint(tmp_path / "txt", 3, manifest=False)
    (folder / "notes.txt").write_bytes(b"\x00\xff anything")
    assert ck.checkpoint_problem(folder) is None


def test_a_reader_error_is_quoted_up_to_200_characters(tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path / "a", 3, manifest=False)

    def broken_testzip(self):
        raise RuntimeError("z" * 300)

    monkeypatch.setattr(zipfile.ZipFile, "testzip", broken_testzip)
    assert ck.checkpoint_problem(folder) == f"optimizer.bin is unreadable (RuntimeError: {'z' * 200})"
    monkeypatch.undo()

    def unreadable(state):
        raise ValueError("y" * 300)

    monkeypatch.setattr(ck, "update_count_in", unreadable)
    assert ck.checkpoint_problem(folder) == f"optimizer.bin cannot be read (ValueError: {'y' * 200})"


class _NotTensorData:
    """An object only a full unpickler would build: a checkpoint must never need one."""


def test_the_optimizer_state_is_read_without_unpickling_objects(tmp_path):
    folder = _checkpoint(tmp_path, 3, manifest=False)
    torch.save({**_optimizer_state(3), "extra": _NotTensorData()}, folder / "optimizer.bin")
    problem = ck.checkpoint_problem(folder)
    assert problem is not None and problem.startswith("optimizer.bin cannot be read (UnpicklingError: "), problem


def test_the_optimizer_update_count_must_agree_with_the_state_record(tmp_path):
    # the files disagree: step 2's optimizer state in checkpoint-3
    folder = _checkpoint(tmp_path / "a", 3, updates=2, optimizer_steps=3)
    expected = f"optimizer.bin holds 2 optimizer updates, {STATE_NAME} records 3"
    assert ck.checkpoint_problem(folder) == expected
    # an optimizer that keeps no count (nothing to compare), a record without a count (older checkpoints)
    assert ck.checkpoint_problem(_checkpoint(tmp_path / "b", 3, updates=None, optimizer_steps=3)) is None
    folder = _checkpoint(tmp_path / "c", 3, updates=None, optimizer_steps=3)
    torch.save(_optimizer_state(None), folder / "optimizer.bin")
    (folder / STATE_NAME).write_text(json.dumps({"global_step": 3, "optimizer_steps": 3}))
    assert ck.checkpoint_problem(folder) is None
    folder = _checkpoint(tmp_path / "d", 3, updates=2, manifest=False, optimizer_steps=None)
    assert ck.checkpoint_problem(folder) is None  # fewer updates than steps: gradient accumulation
    folder = _checkpoint(tmp_path / "e", 3, updates=5, manifest=False, optimizer_steps=None)
    expected = f"optimizer.bin holds 5 optimizer updates, more than the 3 steps of {STATE_NAME}"
    assert ck.checkpoint_problem(folder) == expected


# ------------------------------------------------------------------------------------------------
# resolve_resume and set_aside_broken


def test_no_resume_flag_resumes_nothing(tmp_path):
    _checkpoint(tmp_path, 2)
    assert ck.resolve_resume(_cfg(), tmp_path) is None
    assert ck.resolve_resume(_cfg(resume_from_checkpoint=""), tmp_path) is None


def test_latest_takes_the_newest_intact_checkpoint(tmp_path, caplog):
    for step in (1, 2, 10):
        _checkpoint(tmp_path, step)
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        assert ck.resolve_resume(_cfg(resume_from_checkpoint="latest"), tmp_path) == tmp_path / "checkpoint-10"
    assert _messages(caplog) == []
    assert _names(tmp_path) == ["checkpoint-1", "checkpoint-10", "checkpoint-2"]


def test_latest_sets_broken_checkpoints_aside_and_falls_back(tmp_path, caplog):
    _checkpoint(tmp_path, 1)
    _checkpoint(tmp_path, 2)
    (_checkpoint(tmp_path, 3) / "optimizer.bin").unlink()
    broken4 = _checkpoint(tmp_path, 4)
    (broken4 / STATE_NAME).write_text(json.dumps({"global_step": 5}))
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        assert ck.resolve_resume(_cfg(resume_from_checkpoint="latest"), tmp_path) == tmp_path / "checkpoint-2"
    assert _messages(caplog) == [
        f"--resume_from_checkpoint latest: {tmp_path / 'checkpoint-4'} is broken ({STATE_NAME} says step 5, "
        "the folder's name step 4); moved aside to checkpoint-4.broken and skipped",
        f"--resume_from_checkpoint latest: {tmp_path / 'checkpoint-3'} is broken (optimizer.bin is missing); "
        "moved aside to checkpoint-3.broken and skipped",
    ]
    # kept, with their files, out of every listing
    assert _names(tmp_path) == ["checkpoint-1", "checkpoint-2", "checkpoint-3.broken", "checkpoint-4.broken"]
    assert (tmp_path / "checkpoint-3.broken" / ALPHA_FILE).is_file()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2]


def test_latest_with_nothing_to_resume_starts_anew_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        assert ck.resolve_resume(_cfg(resume_from_checkpoint="latest"), tmp_path) is None
    assert _messages(caplog) == [
        f"--resume_from_checkpoint latest: no complete checkpoint in {tmp_path}; starting a new run"
    ]
    caplog.clear()
    (_checkpoint(tmp_path, 1) / "scheduler.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        assert ck.resolve_resume(_cfg(resume_from_checkpoint="latest"), tmp_path) is None
    assert _messages(caplog)[-1] == (
        f"--resume_from_checkpoint latest: no intact checkpoint in {tmp_path}; starting a new run"
    )
    assert _names(tmp_path) == ["checkpoint-1.broken"]


def test_latest_refuses_a_checkpoint_of_other_flags_instead_of_skipping_it(tmp_path):
    folder = _checkpoint(tmp_path, 2)
    (folder / "args.json").write_text(json.dumps(ck.run_args(_cfg(tuning="lora"))))
    with pytest.raises(UsageError, match="it was trained with other settings"):
        ck.resolve_resume(_cfg(resume_from_checkpoint="latest"), tmp_path)
    assert _names(tmp_path) == ["checkpoint-2"]  # a usage mistake: nothing set aside


def test_a_named_checkpoint_is_found_relative_to_the_output_folder_or_as_given(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _checkpoint(out, 2)
    _checkpoint(out, 3)
    elsewhere = _checkpoint(tmp_path / "copies", 7)
    assert ck.resolve_resume(_cfg(resume_from_checkpoint="checkpoint-2"), out) == out / "checkpoint-2"
    assert ck.resolve_resume(_cfg(resume_from_checkpoint=str(elsewhere)), out) == elsewhere
    monkeypatch.chdir(tmp_path)  # a relative path that exists from here is taken as it is
    assert ck.resolve_resume(_cfg(resume_from_checkpoint="copies/checkpoint-7"), out) == Path("copies/checkpoint-7")


def test_a_named_checkpoint_must_be_complete_and_intact(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(UsageError) as err:
        ck.resolve_resume(_cfg(resume_from_checkpoint="checkpoint-4"), tmp_path)
    assert str(err.value) == (
        f"--resume_from_checkpoint checkpoint-4: {tmp_path / 'checkpoint-4'} is not a complete dreamcoeff checkpoint"
    )
    folder = _checkpoint(tmp_path, 3)
    (folder / "optimizer.bin").write_bytes((folder / "optimizer.bin").read_bytes()[:100])
    with pytest.raises(TrainingError) as err:
        ck.resolve_resume(_cfg(resume_from_checkpoint="checkpoint-3"), tmp_path)
    size = (folder / "optimizer.bin").stat().st_size
    written = json.loads((folder / STATE_NAME).read_text())["files"]["optimizer.bin"]
    assert str(err.value) == (
        f"cannot resume from {folder}: optimizer.bin is truncated or altered ({size} bytes, {written} when "
        "written). Name an earlier checkpoint, or pass --resume_from_checkpoint latest to take the newest intact one"
    )
    assert folder.is_dir()  # named explicitly: nothing is moved
    (folder / "args.json").write_text(json.dumps(ck.run_args(_cfg(rank=8))))
    with pytest.raises(UsageError, match="--rank 8 in the checkpoint, 4 now"):  # the flags are judged first
        ck.resolve_resume(_cfg(resume_from_checkpoint="checkpoint-3"), tmp_path)


def test_set_aside_broken_never_overwrites_an_earlier_one(tmp_path):
    for n in range(3):
        folder = tmp_path / "checkpoint-3"
        folder.mkdir()
        (folder / "mark").write_text(str(n))
        aside = ck.set_aside_broken(folder)
        assert aside == tmp_path / ("checkpoint-3.broken" + ("" if n == 0 else f"-{n + 1}"))
        assert not folder.exists() and (aside / "mark").read_text() == str(n)
    assert _names(tmp_path) == ["checkpoint-3.broken", "checkpoint-3.broken-2", "checkpoint-3.broken-3"]


# ------------------------------------------------------------------------------------------------
# Arguments: args.json, refused and warned changes, the completion record


def test_run_args_records_every_flag_and_the_configs_digest(tmp_path):
    import hashlib

    cfg = _cfg(rank=8)
    flags = json.loads(cfg.to_json())
    assert ck.run_args(cfg) == flags and flags["rank"] == 8
    toml = tmp_path / "d.toml"
    toml.write_bytes(b"[[datasets]]\n")
    cfg = _cfg(dataset_config=str(toml))
    assert ck.run_args(cfg) == {
        **json.loads(cfg.to_json()),
        DATASET_CONFIG_DIGEST: hashlib.sha256(b"[[datasets]]\n").hexdigest(),
    }
    assert ck.run_args(_cfg(dataset_config=str(tmp_path / "gone.toml"))) == json.loads(
        _cfg(dataset_config=str(tmp_path / "gone.toml")).to_json()
    )  # unreadable: nothing to compare, no error here
    text = ck.run_args_json(cfg)
    assert json.loads(text) == ck.run_args(cfg)
    lines = text.splitlines()
    assert (
        lines[0] == "{"
        and lines[1].startswith('  "')
        and [ln.split('"')[1] for ln in lines[1:-1]] == sorted(ck.run_args(cfg))
    )  # indented, keys sorted: args.json of two runs diff line by line


def test_refuse_other_shape_names_every_structural_flag(tmp_path):
    now = ck.run_args(_cfg())
    for key in STRUCTURAL:
        (tmp_path / "args.json").write_text(json.dumps({**now, key: "other"}))
        with pytest.raises(UsageError) as err:
            ck.refuse_other_shape(_cfg(), tmp_path)
        assert str(err.value) == (
            f"cannot resume from {tmp_path}: it was trained with other settings (--{key} 'other' in the "
            f"checkpoint, {now[key]!r} now). Use the same flags, or start a new --output_dir"
        )
    (tmp_path / "args.json").write_text(json.dumps({**now, "rank": 16, "tuning": "full"}))
    with pytest.raises(UsageError, match=r"\(--tuning 'full' in the checkpoint, 'coeff' now; --rank 16 in the"):
        ck.refuse_other_shape(_cfg(), tmp_path)
    # a flag an older args.json lacks: that version trained as the flag's default does, so only a
    # non-default value now is refused (an older run's full alpha resumed as --coeff_structure diagonal)
    default = TrainConfig()
    for key, other in (("rank", 16), ("coeff_structure", "diagonal")):
        (tmp_path / "args.json").write_text(json.dumps({k: v for k, v in now.items() if k != key}))
        ck.refuse_other_shape(_cfg(learning_rate=1.0), tmp_path)  # the default now, non-structural changes
        with pytest.raises(UsageError) as err:
            ck.refuse_other_shape(_cfg(**{key: other}), tmp_path)
        assert (
            f"(--{key} {getattr(default, key)!r} in the checkpoint (the default: it predates the flag), "
            f"{other!r} now)" in str(err.value)
        )
    # no args.json, unreadable args.json: nothing to compare, no error
    (tmp_path / "args.json").write_text("{broken")
    ck.refuse_other_shape(_cfg(tuning="lora"), tmp_path)
    (tmp_path / "args.json").unlink()
    ck.refuse_other_shape(_cfg(tuning="lora"), tmp_path)


def test_check_resume_args_warns_of_changed_flags_but_not_volatile_ones(tmp_path, caplog):
    saved = ck.run_args(_cfg())
    (tmp_path / "args.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        ck.check_resume_args(_cfg(), tmp_path)
        for key in VOLATILE:  # each may change without changing what is trained
            (tmp_path / "args.json").write_text(json.dumps({**saved, key: "another"}))
            ck.check_resume_args(_cfg(), tmp_path)
    assert _messages(caplog) == []
    (tmp_path / "args.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        ck.check_resume_args(_cfg(seed=7, learning_rate=5e-3, output_dir="elsewhere"), tmp_path)
    assert _messages(caplog) == [
        f"resuming from {tmp_path} with changed settings: --learning_rate, --seed; the result will differ from "
        "an uninterrupted run with the original ones"
    ]
    with pytest.raises(UsageError, match="--tuning 'coeff' in the checkpoint, 'lora' now"):
        ck.check_resume_args(_cfg(tuning="lora"), tmp_path)
    (tmp_path / "args.json").write_text("not json")
    ck.check_resume_args(_cfg(tuning="lora"), tmp_path)  # nothing to compare


def test_a_changed_dataset_config_is_named_by_its_file(tmp_path, caplog):
    toml = tmp_path / "d.toml"
    toml.write_text("a = 1\n")
    cfg = _cfg(dataset_config=str(toml))
    saved = ck.run_args(cfg)
    (tmp_path / "args.json").write_text(json.dumps(saved))
    toml.write_text("a = 2\n")
    now = ck.run_args(cfg)
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        ck.check_resume_args(cfg, tmp_path)
    assert _messages(caplog) == [
        f"resuming from {tmp_path} with changed settings: the contents of --dataset_config {toml} (SHA-256 "
        f"{saved[DATASET_CONFIG_DIGEST][:12]} in the checkpoint, {now[DATASET_CONFIG_DIGEST][:12]} now); the "
        "result will differ from an uninterrupted run with the original ones"
    ]


def _result(out: Path, files=(), **kw) -> TrainResult:
    return TrainResult(out, kw.get("step", 5), 123, 4567, 9.5, 77, [out / f for f in files], kw.get("loss", 0.25))


def test_the_completion_record_holds_the_result_and_the_arguments(tmp_path):
    cfg = _cfg(output_dir=str(tmp_path), rank=8)
    (tmp_path / ALPHA_FILE).write_text("x")
    ck.write_completion_record(cfg, _result(tmp_path, [ALPHA_FILE]))
    expected = {
        "global_step": 5,
        "trainable_parameters": 123,
        "unet_parameters": 4567,
        "final_loss": 0.25,
        "files": [ALPHA_FILE],
        "args": json.loads(cfg.to_json()),
    }
    text = (tmp_path / COMPLETE_NAME).read_text(encoding="utf-8")
    assert json.loads(text) == expected and text.startswith('{\n  "global_step": 5,\n')
    assert _names(tmp_path) == [ALPHA_FILE, COMPLETE_NAME]  # written atomically: no temp file left


def test_completed_run_takes_only_a_record_of_the_same_arguments_with_its_files(tmp_path):
    cfg = _cfg(output_dir=str(tmp_path))
    assert ck.completed_run(cfg, tmp_path) is None  # no record
    (tmp_path / COMPLETE_NAME).write_text("{torn")
    assert ck.completed_run(cfg, tmp_path) is None
    (tmp_path / ALPHA_FILE).write_text("x")
    ck.write_completion_record(cfg, _result(tmp_path, [ALPHA_FILE]))
    record = json.loads((tmp_path / COMPLETE_NAME).read_text())
    assert ck.completed_run(cfg, tmp_path) == record
    # moved elsewhere, resumed, reported elsewhere: the same run
    moved = _cfg(output_dir="x", resume_from_checkpoint="latest", report_to="none", overwrite_output_dir=True,
                 logging_dir="l", dataloader_num_workers=3)  # fmt: skip
    assert ck.completed_run(moved, tmp_path) == record
    assert ck.completed_run(_cfg(output_dir=str(tmp_path), seed=99), tmp_path) is None
    (tmp_path / ALPHA_FILE).unlink()
    assert ck.completed_run(cfg, tmp_path) is None  # a listed file is gone
    (tmp_path / COMPLETE_NAME).write_text(json.dumps({"global_step": 1, "args": ck.run_args(cfg)}))
    assert ck.completed_run(cfg, tmp_path) == {"global_step": 1, "args": ck.run_args(cfg)}  # no files listed
    (tmp_path / COMPLETE_NAME).write_text(json.dumps({"global_step": 1}))
    assert ck.completed_run(cfg, tmp_path) is None  # no arguments: not this run


def test_recorded_result_reads_the_record_back(tmp_path):
    record = {"global_step": "5", "trainable_parameters": 123, "unet_parameters": 4567, "final_loss": 0.25,
              "files": [ALPHA_FILE, LORA_FILE]}  # fmt: skip
    assert ck.recorded_result(tmp_path, record, 1.5) == TrainResult(
        tmp_path, 5, 123, 4567, 1.5, 0, [tmp_path / ALPHA_FILE, tmp_path / LORA_FILE], 0.25
    )
    assert ck.recorded_result(tmp_path, {"global_step": 2}, 0.0) == TrainResult(tmp_path, 2, 0, 0, 0.0, 0, [], None)


# ------------------------------------------------------------------------------------------------
# Cleaning a folder


def test_clean_output_dir_removes_leftovers_and_keeps_the_rest(tmp_path, caplog):
    ck.clean_output_dir(tmp_path / "missing", drop_checkpoints=True)  # nothing there: nothing to do
    _checkpoint(tmp_path, 2)
    for name in ("checkpoint-3.tmp", "checkpoint-1.old", ".final.tmp.d", "checkpoint-4.broken"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    for name in (".coeff_weights.safetensors.a1b2.tmp", ".tmpAb12Cd", "args.json", ALPHA_FILE, COMPLETE_NAME):
        (tmp_path / name).write_text("x")
    with caplog.at_level(logging.INFO, logger="dreamcoeff"):
        ck.clean_output_dir(tmp_path, drop_checkpoints=False)
    assert _names(tmp_path) == ["args.json", "checkpoint-2", "checkpoint-4.broken", ALPHA_FILE]
    removed = sorted(m for m in _messages(caplog))
    expected = [f"removing {tmp_path / n}, left by an interrupted run" for n in
                (".coeff_weights.safetensors.a1b2.tmp", ".final.tmp.d", ".tmpAb12Cd", "checkpoint-1.old",
                 "checkpoint-3.tmp")]  # fmt: skip
    assert removed == sorted(expected)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreamcoeff"):
        ck.clean_output_dir(tmp_path, drop_checkpoints=True)
    assert _names(tmp_path) == ["args.json", "checkpoint-4.broken", ALPHA_FILE]  # set-aside ones are kept
    assert _messages(caplog) == [f"--overwrite_output_dir: removing {tmp_path / 'checkpoint-2'} of the previous run"]


def test_remove_stale_weights_removes_the_replaced_runs_parts_only(tmp_path, caplog):
    for name in (ALPHA_FILE, LORA_FILE, "a_emb.safetensors", "b_emb.safetensors", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="dreamcoeff"):
        ck.remove_stale_weights(tmp_path, {LORA_FILE, "b_emb.safetensors"})
    assert _names(tmp_path) == ["b_emb.safetensors", "notes.txt", LORA_FILE]
    assert sorted(_messages(caplog)) == sorted(
        f"removing {tmp_path / n} of the replaced run" for n in (ALPHA_FILE, "unet", "a_emb.safetensors")
    )
    ck.remove_stale_weights(tmp_path, set())
    assert _names(tmp_path) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# Messages of failed writes


def test_write_failed_message_names_the_file_and_what_to_do(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    failure = WriteError(out / "sub" / LORA_FILE, errno.EIO, "Input/output error")
    assert ck.write_failed_message(out, failure) == (
        f"could not write the final files in {out} ({LORA_FILE}): Input/output error" + END_OF_WRITE_MESSAGE
    )
    # an OSError with an errno: named after the folder (the file is unknown)
    assert ck.write_failed_message(out, OSError(errno.EACCES, "Permission denied")) == (
        f"could not write the final files in {out}: Permission denied" + END_OF_WRITE_MESSAGE
    )
    # not a recognised write failure: its text, as an I/O error
    assert ck.write_failed_message(out, ValueError("bad thing")) == (
        f"could not write the final files in {out}: bad thing" + END_OF_WRITE_MESSAGE
    )

    class FullDisk(Exception):
        errno = errno.ENOSPC

    message = ck.write_failed_message(out, FullDisk("no room"))
    assert message.startswith(f"could not write the final files in {out}: no room (the disk is full: only ")


def test_newest_file_is_the_last_one_written(tmp_path):
    assert ck._newest_file(tmp_path / "missing") is None
    assert ck._newest_file(tmp_path) is None
    (tmp_path / "sub").mkdir()
    for i, name in enumerate(("b", "sub/c", "a")):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, ns=(10**18 + i * 10**9, [3, 2, 1][i] * 10**18))
    assert ck._newest_file(tmp_path) == tmp_path / "b"
    os.utime(tmp_path / "sub" / "c", ns=(0, 4 * 10**18))
    assert ck._newest_file(tmp_path) == tmp_path / "sub" / "c"


# ------------------------------------------------------------------------------------------------
# save_checkpoint and the accelerate hooks


class FakeAccelerator:
    """What save_checkpoint uses of accelerate's Accelerator: one process of several, or the only one."""

    def __init__(self, main: bool = True, fail: BaseException | None = None, updates: int = 3):
        self.is_main_process = main
        self.fail, self.updates = fail, updates
        self.calls: list[str] = []
        self.save_hooks, self.load_hooks = [], []

    def wait_for_everyone(self) -> None:
        self.calls.append("wait")

    def save_state(self, folder: str) -> None:
        self.calls.append(f"save_state {Path(folder).name}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_optimizer_state(self.updates), folder / "optimizer.bin")
        os.utime(folder / "optimizer.bin", ns=(0, 10**18))
        if self.fail is not None:
            (folder / "scheduler.bin").write_bytes(b"PK\x03\x04 half")  # the write that fails
            raise self.fail
        torch.save({"last_epoch": 3}, folder / "scheduler.bin")
        torch.save({"seed": 1}, folder / "random_states_0.pkl")
        (folder / "parts").mkdir()
        save_file({"w": torch.ones(2)}, str(folder / "parts" / ALPHA_FILE))

    def register_save_state_pre_hook(self, hook) -> None:
        self.save_hooks.append(hook)

    def register_load_state_pre_hook(self, hook) -> None:
        self.load_hooks.append(hook)


def test_save_checkpoint_writes_a_complete_checkpoint_with_its_manifest(tmp_path):
    acc = FakeAccelerator(updates=3)
    final = ck.save_checkpoint(acc, tmp_path, 3, None, updates=3)
    assert final == tmp_path / "checkpoint-3" and _names(tmp_path) == ["checkpoint-3"]
    assert acc.calls == ["wait", "save_state checkpoint-3.tmp", "wait", "wait"]
    record = json.loads((final / STATE_NAME).read_text())
    files = {n: (final / n).stat().st_size for n in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")}
    assert record == {"global_step": 3, "optimizer_steps": 3,
                      "files": {**files, f"parts/{ALPHA_FILE}": (final / "parts" / ALPHA_FILE).stat().st_size}}  # fmt: skip
    assert ck.checkpoint_problem(final) is None
    assert ck.list_checkpoints(tmp_path) == [(3, final)]


def test_save_checkpoint_replaces_a_stale_write_and_a_redone_step(tmp_path):
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-4.tmp" / "stale").write_text("from a killed run")
    old = _checkpoint(tmp_path, 4)
    (old / "old-only").write_text("x")
    final = ck.save_checkpoint(FakeAccelerator(updates=4), tmp_path, 4, None, updates=4)
    assert _names(tmp_path) == ["checkpoint-4"]
    assert "stale" not in _names(final) and "old-only" not in _names(final) and (final / "parts").is_dir()
    assert ck.checkpoint_problem(final) is None


def test_save_checkpoint_prunes_only_older_checkpoints_beyond_the_limit(tmp_path):
    for step in (1, 2):
        _checkpoint(tmp_path, step)
    ck.save_checkpoint(FakeAccelerator(), tmp_path, 3, 3, updates=3)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2, 3]
    ck.save_checkpoint(FakeAccelerator(), tmp_path, 4, 2, updates=3)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    ck.save_checkpoint(FakeAccelerator(), tmp_path, 5, None, updates=3)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4, 5]
    assert _names(tmp_path) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_prune_keeps_the_limit_counting_the_new_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step)
    ck.prune_checkpoints(tmp_path, 3, keep=tmp_path / "checkpoint-3")
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2, 3]
    ck.prune_checkpoints(tmp_path, 5)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2, 3]
    ck.prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]
    ck.prune_checkpoints(tmp_path, 0)  # 0 or None: no limit
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]


def test_save_checkpoint_on_another_process_only_writes_its_share(tmp_path):
    (tmp_path / "checkpoint-2.tmp").mkdir()  # the main process clears it, not this one
    acc = FakeAccelerator(main=False)
    assert ck.save_checkpoint(acc, tmp_path, 2, 1, updates=3) == tmp_path / "checkpoint-2"
    assert acc.calls == ["wait", "save_state checkpoint-2.tmp", "wait", "wait"]
    assert _names(tmp_path) == ["checkpoint-2.tmp"] and STATE_NAME not in _names(tmp_path / "checkpoint-2.tmp")


def test_a_failed_checkpoint_write_stops_with_a_clear_error_and_keeps_the_earlier_ones(tmp_path):
    earlier = _checkpoint(tmp_path, 2)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    acc = FakeAccelerator(fail=OSError(errno.EIO, "Input/output error"))
    with pytest.raises(TrainingError) as err:
        ck.save_checkpoint(acc, tmp_path, 3, 1, updates=3)
    assert str(err.value) == (
        f"could not write checkpoint {tmp_path / 'checkpoint-3'} (scheduler.bin): Input/output error. The earlier "
        "checkpoints are intact; free some space and rerun with --resume_from_checkpoint latest"
    )
    assert isinstance(err.value.__cause__, OSError)
    assert _names(tmp_path) == ["checkpoint-2"]  # the partial folder is gone, nothing pruned
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    # a WriteError names its own file; on another process the partial folder is the main one's to remove
    acc = FakeAccelerator(main=False, fail=WriteError(tmp_path / "x" / "model.safetensors", errno.EIO, "I/O"))
    with pytest.raises(TrainingError, match=r"checkpoint-3 \(model.safetensors\): I/O\. The earlier"):
        ck.save_checkpoint(acc, tmp_path, 3, 1, updates=3)
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-3.tmp"]


def test_a_failure_before_any_file_names_the_checkpoint_folder(tmp_path):
    class NoWrite(FakeAccelerator):
        def save_state(self, folder):
            raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(TrainingError, match=r"^could not write checkpoint \S+checkpoint-3 \(checkpoint-3\.tmp\): "):
        ck.save_checkpoint(NoWrite(), tmp_path, 3, None, updates=3)


def test_an_error_that_is_no_write_failure_is_raised_as_it_is(tmp_path):
    acc = FakeAccelerator(fail=KeyError("a bug"))
    with pytest.raises(KeyError, match="a bug"):
        ck.save_checkpoint(acc, tmp_path, 3, None, updates=3)


class FakeMethod:
    """A tuning method that records its calls and writes one file per save."""

    def __init__(self, fail_after: int | None = None, error: BaseException | None = None, names=(LORA_FILE,)):
        self.calls: list[tuple] = []
        self.fail_after, self.error, self.names = fail_after, error, names

    def save(self, unet, folder, *args, **kwargs):
        self.calls.append((unet, Path(folder), args, kwargs))
        written = []
        for i, name in enumerate(self.names):
            if self.fail_after == i:
                (Path(folder) / name).write_bytes(b"half")
                raise self.error
            (Path(folder) / name).write_text(f"new {name}")
            written.append(Path(folder) / name)
        return written


def test_the_save_hook_writes_the_trained_parts_and_the_arguments_on_the_main_process(tmp_path):
    acc, method, unet, tokens, encoders = FakeAccelerator(), FakeMethod(), object(), object(), (object(),)
    cfg = _cfg(rank=8)
    ck.register_hooks(acc, method, cfg, unet, tokens, "run_emb", encoders)
    assert len(acc.save_hooks) == 1 and len(acc.load_hooks) == 1
    weights = [{"a": 1}, {"b": 2}]
    acc.save_hooks[0]([unet], weights, str(tmp_path))
    assert weights == []  # accelerate would otherwise save the whole UNet
    assert method.calls == [
        (unet, tmp_path, (), {"tokens": tokens, "tokens_name": "run_emb", "text_encoders": encoders})
    ]
    assert json.loads((tmp_path / "args.json").read_text(encoding="utf-8")) == json.loads(cfg.to_json())
    assert (tmp_path / "args.json").read_text(encoding="utf-8") == ck.run_args_json(cfg)

    other, method = tmp_path / "rank1", FakeMethod()
    other.mkdir()
    acc = FakeAccelerator(main=False)
    ck.register_hooks(acc, method, cfg, unet)
    weights = [{"a": 1}]
    acc.save_hooks[0]([unet], weights, str(other))
    assert weights == [] and method.calls == [] and _names(other) == []


def test_the_load_hook_loads_our_parts_instead_of_a_whole_unet(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(ck, "load_checkpoint_parts", lambda *a: loaded.append(a))
    acc, method, unet, tokens, encoders = FakeAccelerator(), FakeMethod(), object(), object(), (object(),)
    ck.register_hooks(acc, method, _cfg(), unet, tokens, "x", encoders)
    models = [unet, object()]
    acc.load_hooks[0](models, str(tmp_path))
    assert models == [] and loaded == [(method, unet, str(tmp_path), tokens, encoders)]


def test_a_real_accelerator_saves_a_checkpoint_the_resume_check_accepts(tmp_path):
    """The smallest real accelerate run on the CPU: the hooks and save_state as the trainer uses them."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        acc = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model, opt, sched = acc.prepare(model, opt, sched)
        for _ in range(2):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
        method = FakeMethod(names=(ALPHA_FILE,))
        method.save = lambda unet, folder, **kw: [save_file({"w": torch.ones(1)}, str(Path(folder) / ALPHA_FILE))]
        ck.register_hooks(acc, method, _cfg(), model)
        final = ck.save_checkpoint(acc, tmp_path, 2, None, updates=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", ALPHA_FILE, "args.json"} <= set(_names(final))
    assert not any(n.startswith("model") for n in _names(final))  # the hook dropped the model's weights
    assert ck.checkpoint_problem(final) is None
    assert json.loads((final / STATE_NAME).read_text())["optimizer_steps"] == 2


# ------------------------------------------------------------------------------------------------
# stage_final_files


def test_stage_final_files_puts_every_file_in_place_and_removes_the_replaced_runs(tmp_path):
    for name in (ALPHA_FILE, LORA_FILE):  # a previous coeff+lora run; this one trains LoRA only
        (tmp_path / name).write_text(f"old {name}")
    method, unet = FakeMethod(names=(LORA_FILE, "run_emb.safetensors")), object()
    files = ck.stage_final_files(method, unet, tmp_path, {"k": "v"}, "tok", "run_emb", "kohya.safetensors", ("te",))
    assert files == [tmp_path / LORA_FILE, tmp_path / "run_emb.safetensors"]
    assert method.calls == [
        (unet, tmp_path / ".final.tmp.d", ({"k": "v"}, "tok", "run_emb", "kohya.safetensors", ("te",)), {})
    ]
    assert _names(tmp_path) == [LORA_FILE, "run_emb.safetensors"]  # staging gone, the stale alpha file too
    assert (tmp_path / LORA_FILE).read_text() == f"new {LORA_FILE}"


def test_stage_final_files_clears_a_stale_staging_folder(tmp_path):
    (tmp_path / ".final.tmp.d").mkdir()
    (tmp_path / ".final.tmp.d" / ALPHA_FILE).write_text("from a killed run")
    files = ck.stage_final_files(FakeMethod(), object(), tmp_path, {})
    assert files == [tmp_path / LORA_FILE] and _names(tmp_path) == [LORA_FILE]


def test_a_failed_final_write_keeps_the_previous_files_and_says_what_to_do(tmp_path):
    for name in (ALPHA_FILE, LORA_FILE):
        (tmp_path / name).write_text(f"old {name}")
    method = FakeMethod(fail_after=1, error=OSError(errno.ENOSPC, "No space left on device"),
                        names=(ALPHA_FILE, LORA_FILE))  # fmt: skip
    with pytest.raises(TrainingError) as err:
        ck.stage_final_files(method, object(), tmp_path, {})
    message = str(err.value)
    assert message.startswith(f"could not write the final files in {tmp_path} (.final.tmp.d): No space left on "
                              "device (the disk is full")  # fmt: skip
    assert message.endswith(END_OF_WRITE_MESSAGE)
    assert isinstance(err.value.__cause__, OSError)
    assert _names(tmp_path) == [ALPHA_FILE, LORA_FILE]  # nothing renamed, staging removed
    assert all((tmp_path / n).read_text() == f"old {n}" for n in (ALPHA_FILE, LORA_FILE))
    with pytest.raises(KeyError):  # no write failure: raised as it is, staging removed all the same
        ck.stage_final_files(FakeMethod(fail_after=0, error=KeyError("bug")), object(), tmp_path, {})
    assert _names(tmp_path) == [ALPHA_FILE, LORA_FILE]


# ------------------------------------------------------------------------------------------------
# Added after the fourth mutation pass: each kills survivors that were real behaviour changes


def test_a_checkpoint_written_on_a_gpu_is_judged_on_any_machine(tmp_path, monkeypatch):
    """accelerate saves a CUDA run's optimizer state with CUDA storages: it is read onto the CPU, so a
    CPU-only machine (or a busy GPU) can still tell that the checkpoint is intact."""
    import torch.serialization

    folder = _checkpoint(tmp_path, 3, manifest=False)
    with monkeypatch.context() as m:  # torch.save tags each storage with its device: say CUDA
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(_optimizer_state(3), folder / "optimizer.bin")
    assert ck.checkpoint_problem(folder) is None


def test_objects_are_refused_whatever_torchs_default(tmp_path, monkeypatch):
    """torch < 2.6, or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, unpickles everything by default: the check
    asks for weights only itself."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    folder = _checkpoint(tmp_path, 3, manifest=False)
    torch.save({**_optimizer_state(3), "extra": _NotTensorData()}, folder / "optimizer.bin")
    problem = ck.checkpoint_problem(folder)
    assert problem is not None and problem.startswith("optimizer.bin cannot be read (UnpicklingError: "), problem


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_cleaning(tmp_path, monkeypatch):
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        name = os.path.basename(os.fspath(path))
        if name == "stuck":  # a file the user cannot delete inside a leftover folder
            raise PermissionError(errno.EACCES, "Permission denied", name)
        if name == ".tmpGone12":  # removed by its own writer in the meantime
            real_unlink(path, *args, **kwargs)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
        return real_unlink(path, *args, **kwargs)

    (tmp_path / "checkpoint-3.tmp").mkdir()
    (tmp_path / "checkpoint-3.tmp" / "stuck").write_text("x")
    (tmp_path / ".tmpGone12").write_text("x")
    (tmp_path / COMPLETE_NAME).write_text("{}")
    monkeypatch.setattr(os, "unlink", unlink)
    ck.clean_output_dir(tmp_path, drop_checkpoints=False)
    monkeypatch.undo()
    assert _names(tmp_path) == ["checkpoint-3.tmp"]  # what could go went; the marker too


def test_stage_final_files_into_a_missing_folder_is_a_clear_error(tmp_path):
    out = tmp_path / "gone"
    with pytest.raises(TrainingError) as err:
        ck.stage_final_files(FakeMethod(), object(), out, {})
    assert str(err.value) == (
        f"could not write the final files in {out} (.final.tmp.d): No such file or directory" + END_OF_WRITE_MESSAGE
    )


def test_remove_stale_weights_removes_every_stale_embedding_and_no_folder_of_the_user(tmp_path):
    for name in ("a_emb.safetensors", "b_emb.safetensors", "c_emb.safetensors"):
        (tmp_path / name).write_text("x")
    for folder in ("unet", "unet.old"):  # unet.old: the user's own, not ours to delete
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
    ck.remove_stale_weights(tmp_path, {"c_emb.safetensors"})
    assert _names(tmp_path) == ["c_emb.safetensors", "unet.old"]
    assert (tmp_path / "unet.old" / "config.json").is_file()


def test_save_checkpoint_never_prunes_the_checkpoint_it_just_wrote(tmp_path):
    for step in (2, 5, 6):  # resumed from checkpoint-2 while 5 and 6 exist: 3 is written anew
        _checkpoint(tmp_path, step)
    final = ck.save_checkpoint(FakeAccelerator(), tmp_path, 3, 1, updates=3)
    assert ck.list_checkpoints(tmp_path) == [(3, final)] and _names(tmp_path) == ["checkpoint-3"]


def test_a_kill_while_a_step_is_redone_leaves_only_what_the_next_run_cleans(tmp_path, monkeypatch):
    _checkpoint(tmp_path, 4)
    real_replace, calls = os.replace, []

    def killed_replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the old checkpoint-4 is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(FakeAccelerator(), tmp_path, 4, None, updates=4)
    monkeypatch.undo()
    assert ck.list_checkpoints(tmp_path) == []  # neither half is taken for a checkpoint
    ck.clean_output_dir(tmp_path, drop_checkpoints=False)
    assert _names(tmp_path) == []  # the aside copy and the new write both count as leftovers
