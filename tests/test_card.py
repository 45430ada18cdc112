"""The model card's "Settings": every non-default setting of the run, as flags that parse back to it."""

from __future__ import annotations

import shlex

from dreamcoeff.train.card import settings_text
from dreamcoeff.train.config import build_parser, defaults


def _parse_back(text: str) -> dict:
    argv = [a for line in text.splitlines() if not line.startswith("#") for a in shlex.split(line)]
    ns = vars(build_parser().parse_args(argv))
    ns.pop("config")
    return ns


def test_settings_are_the_flags_that_give_the_run_back(tmp_path):
    argv = [
        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--instance_data_dir", str(tmp_path / "inst"),
        "--instance_prompt", 'a photo of "sks" dog', "--output_dir", str(tmp_path / "out"), "--tuning", "coeff+lora",
        "--rank", "8", "--coeff_lr", "3e-3", "--loss_type", "huber", "--huber_c", "0.2", "--lr_scheduler", "cosine",
        "--max_train_steps", "7", "--random_flip", "--no-ui_lora", "--validation_prompt", "a sks dog", "--validation_prompt", "a cat",
        "--validation_coeff_scales", "0", "0.5", "1",
    ]  # fmt: skip
    ns = vars(build_parser().parse_args(argv))
    ns.pop("config")
    from dreamcoeff.train.config import TrainConfig

    cfg = TrainConfig(**ns)
    text = settings_text(cfg)
    assert "--loss_type huber" in text and "--no-output_kohya_format" in text and "--random_flip" in text
    assert "--validation_prompt 'a cat'" in text and "--validation_coeff_scales 0.0 0.5 1.0" in text
    assert "--learning_rate" not in text  # left at its default: not listed
    assert _parse_back(text) == ns  # the listed flags alone rebuild every setting of the run


def test_all_defaults_say_so():
    from dreamcoeff.train.config import TrainConfig

    assert settings_text(TrainConfig(**defaults())) == "(all defaults)"
