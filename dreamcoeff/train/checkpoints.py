"""The output folder and its checkpoints: refuse or clean a previous run, save, find, resume, prune.

A checkpoint is written as ``checkpoint-N.tmp``, flushed, and renamed to ``checkpoint-N`` only when
complete; deleted ones are renamed aside first. So a kill at any moment never leaves a folder that
``--resume_from_checkpoint latest`` would take, and the completion record (``COMPLETE_NAME``) is
written last, once every final file is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import (
    TEMP_FILE_RE,
    WriteError,
    atomic_write,
    fsync_dir,
    fsync_tree,
    remove_aside,
    replace_path,
    write_failure,
)
from ..loading import load_checkpoint_parts
from ..methods import ARTIFACTS, artifacts_in
from ..tokens import EMBEDDINGS_SUFFIX
from .card import TrainResult
from .config import TrainConfig, UsageError
from .optim import update_count_in

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from ..methods import TuningMethod
    from ..tokens import LearnedTokens

logger = logging.getLogger("dreamcoeff")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Leftovers of an interrupted write besides the temp files io.TEMP_FILE_RE names (atomic_write's and
# safetensors'): a checkpoint being written or deleted, the final files' staging folder.
_LEFTOVER_RE = re.compile(r"^(checkpoint-\d+\.(tmp|old)|\..+\.tmp\.d)$")
STATE_NAME = "dreamcoeff_state.json"
COMPLETE_NAME = "dreamcoeff_complete.json"
# Arguments that may change between a run and its resumption without changing what is trained.
_VOLATILE_ARGS = {
    "resume_from_checkpoint",
    "output_dir",  # a run folder moved or copied elsewhere is still the same run
    "overwrite_output_dir",
    "report_to",
    "logging_dir",
    "dataloader_num_workers",
}
# Arguments that fix the shape of the trainable weights: a checkpoint cannot be resumed with others.
# (Another base model only gets a warning: the same model may live under another path now.)
_STRUCTURAL_ARGS = (
    "tuning",
    "optimizer",  # another optimizer's state does not fit (and would read as a broken checkpoint)
    "use_8bit_adam",
    "use_ema",  # the EMA copy is one of the checkpoint's objects, or is not
    "coeff_targets",
    "coeff_structure",  # which of alpha's entries are free: another would silently drop trained entries
    "rank",
    "lora_alpha",
    "train_text_encoder_ti",
    "train_text_encoder",  # the LoRA files hold the text encoders' adapters, or do not
    "token_abstraction",
    "num_new_tokens_per_abstraction",
)


#: The key of args.json and the completion record holding the SHA-256 of the --dataset_config file's
#: contents: its path alone would not show that the file was edited between a run and its resume.
DATASET_CONFIG_DIGEST = "dataset_config_sha256"


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, nothing to resume, disk full); the message says what to do."""


def has_previous_run(out: Path) -> bool:
    """Whether `out` holds another run's files (arguments, weights, completion record, checkpoints)."""
    if not out.is_dir():
        return False
    files = any((out / m).exists() for m in ("args.json", COMPLETE_NAME))
    weights = any(a.find(out) is not None for a in ARTIFACTS if a.marker is None)
    return files or weights or bool(list_checkpoints(out))


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`checkpoint-N`, never the `.tmp` of one being written), oldest first."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names, or None (nothing to resume).

    ``latest``: the newest *intact* checkpoint (`checkpoint_problem`). A broken newer one (a truncated
    or missing file, files that disagree) is renamed aside to ``checkpoint-N.broken`` (kept for
    inspection, never deleted, never picked again) with a warning naming it and why. A folder named
    explicitly must be intact: a broken one is a `TrainingError` saying what is wrong with it.
    Call it on the main process only (it renames folders)."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(out)
        for _, path in reversed(found):
            refuse_other_shape(cfg, path)  # other flags: the user's mistake, not a broken checkpoint
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            aside = set_aside_broken(path)
            logger.warning(
                "--resume_from_checkpoint latest: %s is broken (%s); moved aside to %s and skipped",
                path,
                problem,
                aside.name,
            )
        logger.warning(
            "--resume_from_checkpoint latest: no %scheckpoint in %s; starting a new run",
            "intact " if found else "complete ",
            out,
        )
        return None
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = out / path
    if not (path / STATE_NAME).is_file():
        raise UsageError(
            f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: {path} is not a complete dreamcoeff checkpoint"
        )
    refuse_other_shape(cfg, path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(
            f"cannot resume from {path}: {problem}. Name an earlier checkpoint, or pass "
            "--resume_from_checkpoint latest to take the newest intact one"
        )
    return path


def set_aside_broken(path: Path) -> Path:
    """Rename a broken checkpoint to ``<name>.broken`` (``.broken-2``, ... if taken): out of every
    listing, kept for whoever wants to look at it."""
    aside = path.with_name(path.name + ".broken")
    n = 2
    while aside.exists():
        aside = path.with_name(f"{path.name}.broken-{n}")
        n += 1
    path.rename(aside)
    fsync_dir(path.parent)
    return aside


def checkpoint_manifest(folder: Path) -> dict[str, int]:
    """Every file of a checkpoint being written and its size (relative POSIX path -> bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STATE_NAME
    }


# Files every checkpoint holds, whatever the method (accelerate's optimizer, scheduler, RNG of rank 0).
_REQUIRED = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def checkpoint_problem(path: Path) -> str | None:
    """What makes checkpoint `path` unusable, in a few words, or None when it is intact.

    Checked without unpickling anything: the state record parses and names the folder's step; every
    file the manifest lists is there with its size (older checkpoints without a manifest: the files
    every checkpoint has); each safetensors file's header and length agree; each torch.save archive
    opens and passes its CRC check; and the optimizer state holds the number of updates the state
    record says (no more updates than steps, for older checkpoints)."""
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{STATE_NAME} is unreadable ({exc.__class__.__name__}: {exc})"
    named = CHECKPOINT_RE.match(path.name)
    if named and int(named.group(1)) != step:
        return f"{STATE_NAME} says step {step}, the folder's name step {named.group(1)}"
    manifest = state.get("files")
    expected = manifest if isinstance(manifest, dict) else dict.fromkeys(_REQUIRED)
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if size is not None and file.stat().st_size != size:
            return f"{name} is truncated or altered ({file.stat().st_size} bytes, {size} when written)"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        problem = _file_problem(file)
        if problem is not None:
            return f"{file.relative_to(path).as_posix()} {problem}"
    optimizer_file = path / "optimizer.bin"
    if zipfile.is_zipfile(optimizer_file):
        import torch

        try:
            held = update_count_in(torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:  # noqa: BLE001  (any reader error means the same: this file cannot be used)
            return f"optimizer.bin cannot be read ({exc.__class__.__name__}: {str(exc)[:200]})"
        recorded = state.get("optimizer_steps")
        if held is not None and recorded is not None and held != recorded:
            return f"optimizer.bin holds {held} optimizer updates, {STATE_NAME} records {recorded}"
        if held is not None and held > step:
            return f"optimizer.bin holds {held} optimizer updates, more than the {step} steps of {STATE_NAME}"
    return None


def _file_problem(file: Path) -> str | None:
    """What is wrong with one checkpoint file as its format can tell, or None."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:  # checks the header against the file's length
                f.keys()
        elif file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"is corrupt (CRC error in {bad})"
        elif file.suffix in (".bin", ".pkl", ".pt"):
            return "is not a complete torch.save archive (truncated?)"
    except Exception as exc:  # noqa: BLE001  (readers raise their own types; all mean unusable)
        return f"is unreadable ({exc.__class__.__name__}: {str(exc)[:200]})"
    return None


def prune_checkpoints(out: Path, limit: int | None, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never `keep` (the one just written). Each is
    renamed aside first, so a kill mid-delete never leaves a half-deleted folder under a name that
    `list_checkpoints` accepts."""
    if not limit:
        return
    others = [path for _, path in list_checkpoints(out) if path != keep]
    excess = len(others) + (keep is not None) - limit
    for path in others[: max(0, excess)]:
        remove_aside(path)


def clean_output_dir(out: Path, drop_checkpoints: bool) -> None:
    """Remove what interrupted runs leave behind (checkpoints being written or deleted, temp files
    of atomic writes) and the completion marker of the run about to be continued or replaced; with
    `drop_checkpoints` (--overwrite_output_dir without resuming) also the replaced run's checkpoints,
    so that a later `--resume_from_checkpoint latest` can never continue the old run."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if _LEFTOVER_RE.match(p.name) or TEMP_FILE_RE.match(p.name):
            logger.info("removing %s, left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if drop_checkpoints:
        for _, path in list_checkpoints(out):
            logger.info("--overwrite_output_dir: removing %s of the previous run", path)
            remove_aside(path)
    (out / COMPLETE_NAME).unlink(missing_ok=True)


def run_args(cfg: TrainConfig) -> dict[str, Any]:
    """The run's arguments as args.json records them: every flag, and with --dataset_config the SHA-256
    of the file's bytes (`DATASET_CONFIG_DIGEST`), so that a resume or a completed run compares contents."""
    args = json.loads(cfg.to_json())
    if cfg.dataset_config:
        try:
            args[DATASET_CONFIG_DIGEST] = hashlib.sha256(Path(cfg.dataset_config).read_bytes()).hexdigest()
        except OSError:  # unreadable: the flags' check has already said so; nothing to compare
            pass
    return args


def run_args_json(cfg: TrainConfig) -> str:
    """`run_args` as the text of args.json."""
    return json.dumps(run_args(cfg), indent=2, sort_keys=True)


def _changed(key: str, saved: dict, now: dict) -> str:
    if key == DATASET_CONFIG_DIGEST:  # a digest means nothing to a reader: say which file changed
        return (
            f"the contents of --dataset_config {now.get('dataset_config')} (SHA-256 {str(saved[key])[:12]} "
            f"in the checkpoint, {str(now[key])[:12]} now)"
        )
    return f"--{key}"


def _comparable_args(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in _VOLATILE_ARGS}


def _saved_args(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def refuse_other_shape(cfg: TrainConfig, checkpoint: Path) -> None:
    """A `UsageError` when `checkpoint` was trained with settings that give the trainable weights or the
    optimizer state another shape: a usage mistake to report, never a broken checkpoint to skip."""
    saved = _saved_args(checkpoint)
    if saved is None:
        return
    now = json.loads(cfg.to_json())
    # A key the checkpoint lacks was written before its flag existed, by a version that trained as the
    # flag's default does (a new flag keeps the old behaviour by default): compare with that default,
    # so that e.g. --coeff_structure diagonal cannot resume an older run's full alpha.
    defaults = json.loads(TrainConfig().to_json())
    was = {k: saved.get(k, defaults.get(k)) for k in _STRUCTURAL_ARGS}
    clash = [
        f"--{k} {was[k]!r} in the checkpoint{'' if k in saved else ' (the default: it predates the flag)'}, "
        f"{now.get(k)!r} now"
        for k in _STRUCTURAL_ARGS
        if was[k] != now.get(k)
    ]
    if clash:
        raise UsageError(
            f"cannot resume from {checkpoint}: it was trained with other settings ("
            + "; ".join(clash)
            + "). Use the same flags, or start a new --output_dir"
        )


def check_resume_args(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse a checkpoint whose trainable weights have another shape; warn about other changes."""
    saved = _saved_args(checkpoint)
    if saved is None:
        return
    refuse_other_shape(cfg, checkpoint)
    now = run_args(cfg)
    changed = sorted(k for k, v in _comparable_args(now).items() if k in saved and saved[k] != v)
    if changed:
        logger.warning(
            "resuming from %s with changed settings: %s; the result will differ from an "
            "uninterrupted run with the original ones",
            checkpoint,
            ", ".join(_changed(k, saved, now) for k in changed),
        )


def completed_run(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    """The completion record of a finished run in `out` with the same arguments, else None."""
    try:
        record = json.loads((out / COMPLETE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if _comparable_args(record.get("args", {})) != _comparable_args(run_args(cfg)):
        return None
    if not all((out / name).is_file() for name in record.get("files", [])):
        return None
    return record


def write_completion_record(cfg: TrainConfig, result: TrainResult) -> None:
    """`COMPLETE_NAME` in the output folder: call it last, since a run is complete only once every file
    is in place (`completed_run` reads it back)."""
    record = {
        "global_step": result.global_step,
        "trainable_parameters": result.trainable_parameters,
        "unet_parameters": result.unet_parameters,
        "final_loss": result.final_loss,
        "files": [p.name for p in result.files],
        "args": run_args(cfg),
    }
    text = json.dumps(record, indent=2)
    atomic_write(result.output_dir / COMPLETE_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def recorded_result(out: Path, record: dict[str, Any], wall_time_s: float) -> TrainResult:
    """The `TrainResult` of a completed run, from its completion record (nothing trained this time)."""
    return TrainResult(
        out,
        int(record["global_step"]),
        int(record.get("trainable_parameters", 0)),
        int(record.get("unet_parameters", 0)),
        wall_time_s,
        0,
        [out / name for name in record.get("files", [])],
        record.get("final_loss"),
    )


def write_failed_message(out: Path, exc: BaseException) -> str:
    """What to tell the user when the final files could not be written (`exc` a failed write)."""
    failure = write_failure(exc, out) or WriteError(out, getattr(exc, "errno", None) or 5, str(exc))
    name = Path(failure.filename).name if failure.filename and Path(failure.filename) != out else None
    return (
        f"could not write the final files in {out}{f' ({name})' if name else ''}: {failure.reason}. Files "
        "already there are intact (each is written under a temporary name, then renamed); free some space "
        "and rerun with --resume_from_checkpoint latest"
    )


def _newest_file(folder: Path) -> Path | None:
    """The file last written in `folder` (the one a write without a file name of its own was making)."""
    try:
        files = [p for p in folder.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


def register_hooks(
    accelerator: Accelerator,
    method: TuningMethod,
    cfg: TrainConfig,
    unet: torch.nn.Module,
    tokens: LearnedTokens | None = None,
    tokens_name: str | None = None,
    text_encoders: Sequence[torch.nn.Module] = (),
) -> None:
    """Make accelerate's save_state / load_state write and read only the trained parts (never the
    multi-GB frozen UNet), the learned tokens and the text encoders' LoRA (`text_encoders`, inside
    the LoRA file), plus the run's arguments."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            method.save(unet, output_dir, tokens=tokens, tokens_name=tokens_name, text_encoders=text_encoders)
            (Path(output_dir) / "args.json").write_text(run_args_json(cfg), encoding="utf-8")
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:  # accelerate would otherwise load a whole UNet's weights: ours are the parts
            models.pop()
        load_checkpoint_parts(method, unet, input_dir, tokens, text_encoders)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Accelerator, out: Path, step: int, limit: int | None, updates: int | None = None
) -> Path:
    """accelerate state + trained parts into `checkpoint-N.tmp`, flushed to disk, then renamed: a
    kill mid-write never leaves a folder that `latest` would pick. Old checkpoints go only after the
    new one is complete, and the new one is never among them. A failed write (full disk) removes the
    partial folder and stops the run with a `TrainingError`; the earlier checkpoints are intact.
    The state record lists every file with its size and the optimizer's update count (`updates`), so
    that `checkpoint_problem` can tell a truncated or mismatched checkpoint on resume."""
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record = {"global_step": step, "optimizer_steps": updates, "files": checkpoint_manifest(tmp)}
            (tmp / STATE_NAME).write_text(json.dumps(record, indent=1))
            fsync_tree(tmp)
            # resumed from an earlier checkpoint: this step is being redone, the old copy goes aside
            replace_path(tmp, final, aside=final.with_name(final.name + ".old"))
            fsync_dir(out)
            prune_checkpoints(out, limit, keep=final)
    except Exception as exc:  # noqa: BLE001 - accelerate's writers (torch.save, pickle) raise their own types
        # judged before the partial folder goes: the file being written, the free space
        failure = write_failure(exc, _newest_file(tmp) or tmp)
        if failure is None:
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        name = Path(failure.filename).name if failure.filename else "?"
        raise TrainingError(
            f"could not write checkpoint {final} ({name}): {failure.reason}. The earlier checkpoints are intact; "
            "free some space and rerun with --resume_from_checkpoint latest"
        ) from exc
    accelerator.wait_for_everyone()
    return final


def remove_stale_weights(out: Path, keep: set[str]) -> None:
    """Remove trained files of a replaced run (``--overwrite_output_dir`` with another method) that
    this run did not write, so a loader never mixes the two runs' parts."""
    stale = [path for _, path in artifacts_in(out)] + sorted(out.glob("*" + EMBEDDINGS_SUFFIX))
    for path in dict.fromkeys(stale):
        if path.name in keep or not path.exists():
            continue
        logger.info("removing %s of the replaced run", path)
        if path.is_dir():
            remove_aside(path, path.with_name(f".{path.name}.old.tmp"))
        else:
            path.unlink()


def stage_final_files(
    method: TuningMethod,
    unet,
    out: Path,
    metadata: dict[str, Any],
    tokens: LearnedTokens | None = None,
    tokens_name: str | None = None,
    kohya_name: str | None = None,
    text_encoders: Sequence[torch.nn.Module] = (),
) -> list[Path]:
    """Write every final weight file in full beside the output first, then rename all into place:
    a failed write (full disk) leaves the previous run's files intact and matching. `text_encoders`:
    those carrying a LoRA (``--train_text_encoder``), saved into the LoRA files."""
    staging = out / ".final.tmp.d"
    files = []
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        saved = method.save(unet, staging, metadata, tokens, tokens_name, kohya_name, text_encoders)
        for path in saved:
            replace_path(path, out / path.name)
            files.append(out / path.name)
        remove_stale_weights(out, {p.name for p in files})
        fsync_dir(out)
    except Exception as exc:  # noqa: BLE001 - a full UNet's save_pretrained raises safetensors' own type
        failure = write_failure(exc, staging)
        if failure is None:
            raise
        raise TrainingError(write_failed_message(out, failure)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files
