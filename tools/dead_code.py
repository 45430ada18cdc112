"""Find dead code: functions, methods, classes and flags that nothing calls (run by `make lint`).

Two checks, both over the package (`dreamcoeff/`):

1. vulture (a maintained dead-code finder) reads the package *and* everything that may use it
   (tests, benchmarks, tools, the entry script), and reports the package's unused names; names that
   only a framework calls (torch's `extra_repr`, a scheduler's `_last_lr`) are listed in `ALLOWED`
   with the reason.
2. every trainer flag (a `TrainConfig` field) and every sampler flag (an argparse dest) is read
   somewhere other than where it is defined: a flag nothing reads is an option that does nothing.

    python tools/dead_code.py      # exit 1 and one line per finding when there is dead code

It lives outside the package because it imports both top layers (train/ and sample/).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACKAGE = ROOT / "dreamcoeff"
#: Where the package's code may be used from (read for uses, never reported).
USERS = [ROOT / "tests", ROOT / "benchmarks", ROOT / "tools", ROOT / "train_dreambooth_coeff.py"]
MIN_CONFIDENCE = 60
#: name -> why it is used although no code here calls it
ALLOWED = {
    "extra_repr": "torch.nn.Module.__repr__ calls it",
    "_last_lr": "torch's LRScheduler.get_last_lr reads it",
}


def unused_names() -> list[str]:
    """vulture's findings inside the package, less the allowed names."""
    from vulture import Vulture

    v = Vulture()
    v.scavenge([str(PACKAGE)] + [str(p) for p in USERS if p.exists()])
    found = []
    for item in v.get_unused_code(min_confidence=MIN_CONFIDENCE):
        path = Path(item.filename).resolve()
        if not path.is_relative_to(PACKAGE) or item.name in ALLOWED:
            continue
        found.append(f"{path.relative_to(ROOT)}:{item.first_lineno}: {item.message}")
    return found


def _sources(skip: Path) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if p != skip}


def unread_flags() -> list[str]:
    """Trainer and sampler flags whose value no code reads (outside the module that defines them)."""
    from dreamcoeff.sample import cli as sample_cli
    from dreamcoeff.train import config

    found = []
    train_src = _sources(Path(config.__file__).resolve())
    # config.py reads some fields itself (validation, derived settings): count reads beyond the definition
    config_src = Path(config.__file__).read_text(encoding="utf-8")
    for name in config.FIELDS:
        read = re.compile(rf"\.{name}\b|[\"']{name}[\"']")
        definition = re.compile(rf"^\s+{name}:", re.M)
        if not any(read.search(s) for s in train_src.values()) and not (
            len(read.findall(config_src)) > len(definition.findall(config_src))
        ):
            found.append(f"trainer flag --{name}: no code reads cfg.{name}")
    sample_src = "\n".join(_sources(Path("/nonexistent")).values())
    for action in sample_cli.build_parser()._actions:
        if action.dest in ("help",) or not action.option_strings:
            continue
        if not re.search(rf"\.{action.dest}\b|[\"']{action.dest}[\"']", sample_src):
            found.append(f"sampler flag {action.option_strings[0]}: no code reads args.{action.dest}")
    return found


def main() -> int:
    findings = unused_names() + unread_flags()
    for line in findings:
        print(line)
    if findings:
        print(
            f"dead code: {len(findings)} finding(s). Remove the code, or if something outside this repository "
            "calls it (a framework hook), add it to ALLOWED in tools/dead_code.py with the reason."
        )
        return 1
    print("dead code: none found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
