"""`--coeff_structure` (alpha's diagonal only / off-diagonal only, issue 35's head-mixing ablation):
the projection against hand-built matrices and a float64 least-squares reference, the flag checks, and
the trainer on the tiny pipeline: masked entries exactly 0 after training, with coefficient dropout and
weight decay, through a resume, and from an ``--init_coeff_weights`` file trained without the structure."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dreamcoeff.processor import keep_structure_
from dreamcoeff.train import main
from dreamcoeff.train.coeff_options import constrain_alpha_, free_alpha_entries, validate_coeff_constraints
from dreamcoeff.train.errors import UsageError
from tests.helpers import make_images
from tests.trainer_runs import final_adapter_weights, run_killed_after_checkpoint, trainer_argv


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


# ---- the projection ----------------------------------------------------------------------------------


def test_keep_structure_on_a_hand_built_matrix():
    m = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    diag, off, full = m.clone(), m.clone(), m.clone()
    keep_structure_([diag], "diagonal")
    keep_structure_([off], "off_diagonal")
    keep_structure_([full], "full")
    assert diag.tolist() == [[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 9.0]]
    assert off.tolist() == [[0.0, 2.0, 3.0], [4.0, 0.0, 6.0], [7.0, 8.0, 0.0]]
    assert full.tolist() == m.tolist()
    with pytest.raises(ValueError, match="unknown alpha structure 'upper'"):
        keep_structure_([m], "upper")


def _projection_reference(m: np.ndarray, free: np.ndarray, zero_rows: bool) -> np.ndarray:
    """The orthogonal projection of `m` onto {x: x = 0 outside `free`, and (zero_rows) rows sum to 0},
    by least squares over a basis of that subspace built from its constraints (float64, numpy alone)."""
    h = m.shape[0]
    rows = [np.eye(h * h)[i] for i in range(h * h) if not free.ravel()[i]]  # masked entries are 0
    if zero_rows:
        rows += [np.kron(np.eye(h)[r], np.ones(h)) for r in range(h)]  # each row's sum is 0
    c = np.array(rows) if rows else np.zeros((0, h * h))
    _, s, vt = np.linalg.svd(c) if len(c) else (None, np.zeros(0), np.zeros((0, h * h)))
    basis = vt[(s > 1e-10).sum() :].T  # null space of the constraints
    return (basis @ basis.T @ m.ravel()).reshape(h, h)


@pytest.mark.parametrize(
    "structure,zero_rows", [("full", True), ("diagonal", False), ("off_diagonal", False), ("off_diagonal", True)]
)
def test_constrain_alpha_is_the_orthogonal_projection(structure, zero_rows):
    rng = np.random.default_rng(0)
    for h in (4, 5):
        m = rng.standard_normal((h, h))
        free = {"full": np.ones((h, h), bool), "diagonal": np.eye(h, dtype=bool)}.get(structure, ~np.eye(h, dtype=bool))
        want = _projection_reference(m, free, zero_rows)
        got = torch.tensor(m)
        constrain_alpha_([got], structure, zero_rows)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
        assert (got.numpy()[~free] == 0).all()  # exactly, not approximately
        again = got.clone()
        constrain_alpha_([again], structure, zero_rows)  # inside already: left as it is
        torch.testing.assert_close(again, got, rtol=0, atol=1e-15)


# ---- the flag checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["full", "diagonal", "off_diagonal"])
@pytest.mark.parametrize("zero_rows", [False, True])
def test_free_entries_are_the_projections_rank(structure, zero_rows):
    # the count the card reports as trainable = the dimension of the subspace the projection keeps,
    # measured as the rank of the projection applied to every basis matrix (2 layers: 3 and 5 heads)
    if structure == "diagonal" and zero_rows:
        pytest.skip("refused by the checks: nothing is left to train")
    expected = 0
    for heads in (3, 5):
        basis = [torch.zeros(heads, heads, dtype=torch.float64) for _ in range(heads * heads)]
        for i, b in enumerate(basis):
            b.view(-1)[i] = 1.0
        constrain_alpha_(basis, structure, zero_rows)
        expected += int(torch.linalg.matrix_rank(torch.stack([b.reshape(-1) for b in basis])))
    alphas = [torch.zeros(3, 3), torch.zeros(5, 5)]
    assert free_alpha_entries(alphas, structure, zero_rows) == expected
    assert free_alpha_entries(alphas, "full", False) == 9 + 25


def test_structure_flag_checks(tmp_path, capsys):
    with pytest.raises(UsageError, match="leaves nothing to train"):
        validate_coeff_constraints("coeff", "diagonal", True)
    validate_coeff_constraints("coeff+lora", "off_diagonal", True)  # allowed: mixing without any gain
    inst = make_images(tmp_path / "inst", sizes=((64, 64),))
    base = trainer_argv(tmp_path / "no-model", inst, tmp_path / "o")
    for extra, message in (
        (["--coeff_structure", "diagonal", "--coeff_zero_row_sum"], "--coeff_structure diagonal with --coeff_zero_row_sum"),
        (["--tuning", "lora", "--coeff_structure", "off_diagonal"], "--coeff_structure off_diagonal constrains alpha: it needs --tuning coeff or coeff+lora, not lora"),
        (["--tuning", "full", "--coeff_zero_row_sum"], "--coeff_zero_row_sum constrains alpha"),
    ):  # fmt: skip
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own choice check
        main([*base, "--coeff_structure", "upper"])
    assert stop.value.code == 2 and "invalid choice: 'upper'" in capsys.readouterr().err


# ---- the trainer -------------------------------------------------------------------------------------


def _alphas(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in final_adapter_weights(folder).items() if k.endswith(".alpha")}


def _off(a: torch.Tensor) -> torch.Tensor:
    return a[~torch.eye(a.shape[0], dtype=torch.bool)]


@pytest.mark.slow
def test_structure_holds_through_training_resume_and_init(tiny_pipeline_dir, tmp_path, monkeypatch, capsys, caplog):
    inst = make_images(tmp_path / "inst")
    common = ("--tuning", "coeff", "--coeff_structure", "diagonal", "--max_train_steps", 4, "--coeff_lr", "5e-2",
              "--coeff_dropout", "0.2", "--adam_weight_decay", "0.1", "--checkpointing_steps", 2)  # fmt: skip
    ref = tmp_path / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref, *common)) == 0
    alphas = _alphas(ref)
    assert alphas and all((_off(a) == 0).all() for a in alphas.values())  # held at exactly 0
    assert min(a.diagonal().abs().max().item() for a in alphas.values()) > 1e-2  # every layer's gains moved
    assert json.loads((ref / "args.json").read_text())["coeff_structure"] == "diagonal"
    card = (ref / "README.md").read_text()
    assert "diagonal only (per-head gains)" in card
    heads = sum(a.shape[0] for a in alphas.values())  # H free entries per layer, not H x H
    assert f"| trainable parameters | {heads:,} (" in card

    # a resume: refused with another structure, exact with the same one
    out = tmp_path / "resumed"
    argv = trainer_argv(tiny_pipeline_dir, inst, out, *common)
    run_killed_after_checkpoint(monkeypatch, 2, argv)
    capsys.readouterr()
    assert main([*argv, "--coeff_structure", "full", "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--coeff_structure 'diagonal' in the checkpoint, 'full' now" in err
    assert main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    resumed = _alphas(out)
    assert resumed.keys() == alphas.keys()
    for key, a in alphas.items():
        assert (_off(resumed[key]) == 0).all()
        torch.testing.assert_close(resumed[key], a, rtol=0, atol=1e-6)

    # off-diagonal with zero row sums, started from the diagonal run: projected at the start (to zero)
    init = tmp_path / "init"
    with caplog.at_level(logging.WARNING, logger="dreamcoeff"):
        assert main(trainer_argv(tiny_pipeline_dir, inst, init, "--tuning", "coeff", "--coeff_structure", "off_diagonal",
                                 "--coeff_zero_row_sum", "--init_coeff_weights", ref, "--max_train_steps", 2,
                                 "--coeff_lr", "5e-2")) == 0  # fmt: skip
    assert "lies outside --coeff_structure off_diagonal with --coeff_zero_row_sum" in caplog.text
    for a in _alphas(init).values():
        assert (a.diagonal() == 0).all()
        assert a.sum(1).abs().max().item() < 1e-6
        assert _off(a).abs().max().item() > 1e-3  # the mixing trained
