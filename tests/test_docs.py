"""The README stays true to the code: every trainer and sampler flag is documented."""

import re
from dataclasses import fields
from pathlib import Path

from dreamcoeff.train.config import TrainConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_training_flag_in_readme():
    missing = [f.name for f in fields(TrainConfig) if f"`--{f.name}`" not in README]
    assert not missing, f"flags missing from README: {missing}"


def test_readme_flags_exist():
    known = {f.name for f in fields(TrainConfig)}
    table = README.split("## Every flag", 1)[1].split("## Using alpha", 1)[0]
    documented = set(re.findall(r"^\| `--([a-z0-9_]+)`", table, flags=re.M))
    assert documented and documented <= known, documented - known
