"""Schedules and losses users expect (issue 33 part 5): --loss_type huber / smooth_l1 with --huber_c,
--debiased_estimation_loss, --min_timestep / --max_timestep, --prediction_type with
--rescale_betas_zero_snr, --lr_num_cycles / --lr_power.

The loss is checked against a float64 reference written here from the formulas (SDXL's scaled-linear
betas, SNR = abar / (1 - abar), kohya's pseudo-Huber forms), not from dreamcoeff's code."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler

from dreamcoeff.train import main
from dreamcoeff.train.config import TrainConfig, UsageError, parse_args
from dreamcoeff.train.step import denoising_loss, training_scheduler
from tests.helpers import make_images
from tests.trainer_runs import trainer_argv

B0, B1, T = 0.00085, 0.012, 1000  # SDXL's schedule


def _scheduler(**kw) -> DDPMScheduler:
    return DDPMScheduler(beta_start=B0, beta_end=B1, beta_schedule="scaled_linear", num_train_timesteps=T, **kw)


def _abar64() -> torch.Tensor:
    betas = torch.linspace(math.sqrt(B0), math.sqrt(B1), T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _reference(cfg, latents, pred, is_class, seed, v_prediction) -> torch.Tensor:
    """The loss from the formulas, in float64, with the draws the trainer makes (noise, then timesteps)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen).double()
    t = torch.randint(cfg.min_timestep, cfg.max_timestep or T, (latents.shape[0],), generator=gen)
    abar = _abar64()[t]
    x0 = latents.double()
    target = abar.sqrt().view(-1, 1, 1, 1) * noise - (1 - abar).sqrt().view(-1, 1, 1, 1) * x0 if v_prediction else noise
    d = pred.double() - target
    c = cfg.huber_c
    per_element = {
        "l2": d**2,
        "huber": 2 * c * (torch.sqrt(d**2 + c**2) - c),
        "smooth_l1": 2 * (torch.sqrt(d**2 + c**2) - c),
    }[cfg.loss_type]
    per_example = per_element.mean(dim=(1, 2, 3))
    snr = abar / (1 - abar)
    if cfg.snr_gamma is not None:
        per_example = (
            per_example * torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma)) / (snr + 1 if v_prediction else snr)
        )
    if cfg.debiased_estimation_loss:
        capped = torch.minimum(snr, torch.full_like(snr, 1000.0))
        per_example = per_example * (1 / (capped + 1) if v_prediction else capped**-0.5)
    loss = per_example[~is_class].mean()
    if is_class.any():
        loss = loss + cfg.prior_loss_weight * per_example[is_class].mean()
    return loss


class _FixedUNet:
    """Returns a fixed prediction and records the timesteps it was given."""

    def __init__(self, pred):
        self.pred, self.timesteps = pred, None

    def __call__(self, noisy, t, embeds, added_cond_kwargs, return_dict):
        self.timesteps = t
        return (self.pred,)


CASES = [
    dict(),
    dict(loss_type="huber"),
    dict(loss_type="huber", huber_c=0.5),
    dict(loss_type="smooth_l1", huber_c=0.3),
    dict(debiased_estimation_loss=True),
    dict(loss_type="huber", snr_gamma=5.0, debiased_estimation_loss=True),
    dict(loss_type="smooth_l1", snr_gamma=1.0),
    dict(min_timestep=200, max_timestep=300),
    dict(loss_type="huber", min_timestep=990, debiased_estimation_loss=True),
]


@pytest.mark.parametrize("v_prediction", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
def test_loss_equals_the_float64_reference(case, v_prediction):
    cfg = replace(TrainConfig(), prior_loss_weight=0.7, **case)
    torch.manual_seed(1)
    latents = torch.randn(4, 4, 8, 8)
    pred = torch.randn(4, 4, 8, 8) * 1.5  # errors on both sides of huber_c
    is_class = torch.tensor([False, False, True, False])
    batch = {"add_time_ids": torch.zeros(4, 6), "is_class": is_class}
    sched = _scheduler(prediction_type="v_prediction" if v_prediction else "epsilon")
    unet = _FixedUNet(pred)
    loss = denoising_loss(
        unet, sched, latents, batch, (None, None), cfg, torch.Generator().manual_seed(9), torch.float32
    )
    ref = _reference(cfg, latents, pred, is_class, 9, v_prediction)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=0)
    assert ((unet.timesteps >= cfg.min_timestep) & (unet.timesteps < (cfg.max_timestep or T))).all()


def test_the_losses_differ_from_each_other():
    """So the reference test can fail: each option changes the loss (the timestep range shows through
    the SNR weights: the epsilon target with a fixed prediction does not depend on t)."""
    torch.manual_seed(1)
    latents, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    batch = {"add_time_ids": torch.zeros(2, 6), "is_class": torch.zeros(2, dtype=torch.bool)}

    def loss(**kw):
        cfg = replace(TrainConfig(), **kw)
        gen = torch.Generator().manual_seed(3)
        return float(
            denoising_loss(_FixedUNet(pred), _scheduler(), latents, batch, (None, None), cfg, gen, torch.float32)
        )

    values = [loss(), loss(loss_type="huber"), loss(loss_type="smooth_l1"), loss(debiased_estimation_loss=True),
              loss(loss_type="huber", huber_c=0.5), loss(debiased_estimation_loss=True, min_timestep=500)]  # fmt: skip
    assert len({round(v, 7) for v in values}) == len(values), values


def test_timestep_range_beyond_the_scheduler_is_refused():
    from dreamcoeff.models import ModelError

    cfg = replace(TrainConfig(), max_timestep=2000)
    batch = {"add_time_ids": torch.zeros(1, 6), "is_class": torch.zeros(1, dtype=torch.bool)}
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ModelError, match="--max_timestep 2000 is beyond"):
        denoising_loss(_FixedUNet(x), _scheduler(), x, batch, (None, None), cfg, torch.Generator(), torch.float32)


def test_prediction_type_wins_over_the_scheduler_with_a_warning():
    warnings: list[str] = []
    sched = _scheduler()
    assert training_scheduler(sched, TrainConfig(), warnings.append) is sched  # defaults: untouched
    assert training_scheduler(sched, replace(TrainConfig(), prediction_type="epsilon"), warnings.append) is sched
    assert not warnings
    v = training_scheduler(sched, replace(TrainConfig(), prediction_type="v_prediction"), warnings.append)
    assert v.config.prediction_type == "v_prediction" and sched.config.prediction_type == "epsilon"
    assert len(warnings) == 1
    assert "--prediction_type v_prediction wins" in warnings[0] and "'epsilon'" in warnings[0]
    assert warnings[0] == (  # why it matters, not only what
        "--prediction_type v_prediction wins over the model's scheduler, which says 'epsilon': training and "
        "validation use it; the base model was trained for the other target"
    )
    torch.testing.assert_close(v.alphas_cumprod, sched.alphas_cumprod, rtol=0, atol=0)


def test_zero_terminal_snr_rescales_the_schedule():
    """Lin et al. 2023, algorithm 1, written here in float64: sqrt(abar) shifted to 0 at T and scaled
    back to its value at t = 0."""
    z = training_scheduler(
        _scheduler(prediction_type="v_prediction"), replace(TrainConfig(), rescale_betas_zero_snr=True)
    )
    s = _abar64().sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    ref = ((s - sT) * s0 / (s0 - sT)) ** 2
    torch.testing.assert_close(z.alphas_cumprod.double(), ref, rtol=0, atol=2e-6)  # diffusers computes in float32
    assert float(z.alphas_cumprod[-1]) == 0.0 and z.config.timestep_spacing == "trailing"
    # v-prediction's Min-SNR / debiased weights stay finite at SNR 0
    cfg = replace(TrainConfig(), rescale_betas_zero_snr=True, snr_gamma=5.0, debiased_estimation_loss=True,
                  min_timestep=998)  # fmt: skip
    batch = {"add_time_ids": torch.zeros(2, 6), "is_class": torch.zeros(2, dtype=torch.bool)}
    x = torch.randn(2, 4, 8, 8)
    loss = denoising_loss(
        _FixedUNet(x), z, x, batch, (None, None), cfg, torch.Generator().manual_seed(0), torch.float32
    )
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--lr_num_cycles", "0"), "--lr_num_cycles must be >= 1"),
        (("--lr_power", "0"), "--lr_power must be > 0"),
        (("--huber_c", "0"), "--huber_c must be > 0"),
        (("--min_timestep", "-1"), "--min_timestep must be >= 0"),
        (("--min_timestep", "500", "--max_timestep", "500"), "must be above --min_timestep"),
    ],
)
def test_bad_values_are_refused(extra, message):
    argv = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "p", *extra]
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_flags_parse_with_diffusers_and_kohya_names():
    argv = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "p",
            "--lr_num_cycles", "3", "--lr_power", "2", "--prediction_type", "v_prediction",
            "--rescale_betas_zero_snr", "--loss_type", "smooth_l1", "--huber_c", "0.2",
            "--debiased_estimation_loss", "--min_timestep", "10", "--max_timestep", "900"]  # fmt: skip
    cfg = parse_args(argv)
    assert (cfg.lr_num_cycles, cfg.lr_power, cfg.prediction_type, cfg.rescale_betas_zero_snr) == (
        3,
        2.0,
        "v_prediction",
        True,
    )
    assert (cfg.loss_type, cfg.huber_c, cfg.debiased_estimation_loss) == ("smooth_l1", 0.2, True)
    assert (cfg.min_timestep, cfg.max_timestep) == (10, 900)


@pytest.mark.slow
def test_trainer_runs_with_the_new_options(
    tiny_pipeline_dir, tmp_path, caplog, monkeypatch, one_thread_fresh_accelerate
):
    """v-prediction on the tiny model (its scheduler says epsilon), zero terminal SNR, pseudo-Huber,
    debiased weights, a timestep range, a polynomial schedule: the run finishes, warns which
    prediction type wins, hands --lr_power / --lr_num_cycles to diffusers' get_scheduler, and the model
    card and the UI file say what was trained."""
    import diffusers.optimization

    seen = {}
    original = diffusers.optimization.get_scheduler

    def spy(name, **kw):
        seen.update(kw, name=name)
        return original(name, **kw)

    monkeypatch.setattr(diffusers.optimization, "get_scheduler", spy)
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "out"
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--tuning", "lora", "--max_train_steps", 2,
                 "--prediction_type", "v_prediction", "--rescale_betas_zero_snr", "--loss_type", "huber",
                 "--huber_c", "0.2", "--debiased_estimation_loss", "--snr_gamma", "5", "--min_timestep", "100",
                 "--max_timestep", "900", "--lr_scheduler", "polynomial", "--lr_power", "2",
                 "--lr_num_cycles", "3")  # fmt: skip
    assert main(argv) == 0
    assert "--prediction_type v_prediction wins over the model's scheduler" in caplog.text
    assert (seen["name"], seen["power"], seen["num_cycles"]) == ("polynomial", 2.0, 3)
    card = (out / "README.md").read_text()
    assert "huber (c = 0.2), Min-SNR gamma 5, debiased estimation" in card
    assert "prediction v_prediction, zero terminal SNR, timesteps [100, 900)" in card
    assert "polynomial, 0 warm-up steps, power 2" in card
    from safetensors import safe_open

    with safe_open(str(out / "out.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["modelspec.prediction_type"], meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"]) == (
        "v",
        "True",
        "True",
    )
    assert (meta["ss_loss_type"], meta["ss_huber_c"], meta["ss_debiased_estimation"]) == ("huber", "0.2", "True")


class _RecordingUNet:
    """Records every input the loss gives the UNet and returns a fixed prediction."""

    def __init__(self, pred):
        self.pred, self.seen = pred, None

    def __call__(self, noisy, t, embeds, added_cond_kwargs, return_dict):
        self.seen = dict(noisy=noisy, t=t, embeds=embeds, added=added_cond_kwargs, return_dict=return_dict)
        return (self.pred,)


@pytest.mark.parametrize("noise_offset", [0.0, 0.1])
def test_the_unet_gets_the_noisy_latents_and_the_conditioning(noise_offset):
    """What the UNet is given, against float64 formulas with the trainer's draws (noise, the offset
    noise per channel, then the timesteps): x_t = sqrt(abar) x_0 + sqrt(1 - abar) noise, the prompt
    embeddings and pooled embeddings as passed, time ids in the weight dtype, return_dict False;
    and the epsilon loss against the noise with its offset. float64 latents: noise is drawn in theirs."""
    cfg = replace(TrainConfig(), noise_offset=noise_offset)
    torch.manual_seed(2)
    latents = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    pred = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    embeds, pooled = torch.randn(3, 77, 16), torch.randn(3, 12)
    time_ids = torch.arange(18, dtype=torch.float32).view(3, 6)
    batch = {"add_time_ids": time_ids, "is_class": torch.zeros(3, dtype=torch.bool)}
    unet = _RecordingUNet(pred)
    loss = denoising_loss(
        unet, _scheduler(), latents, batch, (embeds, pooled), cfg, torch.Generator().manual_seed(4), torch.float64
    )
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float64)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((3, 4, 1, 1), generator=gen, dtype=torch.float64)
    t = torch.randint(0, T, (3,), generator=gen)
    abar = _abar64()[t].view(-1, 1, 1, 1)
    seen = unet.seen
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["noisy"], abar.sqrt() * latents + (1 - abar).sqrt() * noise, rtol=1e-6, atol=1e-6)
    assert (
        seen["embeds"] is embeds
        and seen["added"]["text_embeds"] is pooled
        and set(seen["added"])
        == {
            "text_embeds",
            "time_ids",
        }
    )
    assert seen["added"]["time_ids"].dtype == torch.float64 and torch.equal(
        seen["added"]["time_ids"], time_ids.double()
    )
    assert seen["return_dict"] is False
    torch.testing.assert_close(loss.double(), ((pred - noise) ** 2).mean(), rtol=1e-6, atol=0)


def test_an_unknown_prediction_type_is_named():
    x = torch.zeros(1, 4, 8, 8)
    batch = {"add_time_ids": torch.zeros(1, 6), "is_class": torch.zeros(1, dtype=torch.bool)}
    with pytest.raises(Exception, match="unsupported prediction_type 'sample' in the model's scheduler"):
        denoising_loss(
            _FixedUNet(x), _scheduler(prediction_type="sample"), x, batch, (None, None), TrainConfig(),
            torch.Generator(), torch.float32,
        )  # fmt: skip


def test_an_unknown_loss_type_is_named():
    from dreamcoeff.train.step import elementwise_loss

    with pytest.raises(ValueError, match=r"unknown --loss_type 'l3'"):
        elementwise_loss(torch.zeros(2), torch.ones(2), replace(TrainConfig(), loss_type="l3"))


def test_low_precision_latents_stay_in_their_dtype_with_offset_noise():
    """bf16 latents (mixed precision): the noise and its per-channel offset are drawn in the latents'
    dtype, so the UNet gets bf16 noisy latents, not float32 ones promoted by a float32 offset."""
    cfg = replace(TrainConfig(), noise_offset=0.1)
    latents = torch.randn(2, 4, 8, 8).bfloat16()
    unet = _RecordingUNet(torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16))
    batch = {"add_time_ids": torch.zeros(2, 6), "is_class": torch.zeros(2, dtype=torch.bool)}
    embeds = (torch.zeros(2, 77, 16, dtype=torch.bfloat16), torch.zeros(2, 12, dtype=torch.bfloat16))
    denoising_loss(unet, _scheduler(), latents, batch, embeds, cfg, torch.Generator().manual_seed(0), torch.bfloat16)
    assert unet.seen["noisy"].dtype == torch.bfloat16
    assert unet.seen["added"]["time_ids"].dtype == torch.bfloat16


def test_debiased_estimation_caps_the_snr_at_1000():
    """--debiased_estimation_loss weighs by 1 / sqrt(min(SNR, 1000)) (kohya's cap): at t = 0 SDXL's schedule
    has an SNR above 1000, so the cap is what sets the weight there."""
    from dreamcoeff.train.step import snr_weights

    sched = _scheduler()
    abar = _abar64()
    t = torch.tensor([0, 1, 500])
    snr = abar[t] / (1 - abar[t])
    assert snr[0] > 1000 > snr[2]
    got = snr_weights(sched, t, replace(TrainConfig(), debiased_estimation_loss=True), v_prediction=False)
    want = 1 / torch.sqrt(torch.clamp(snr, max=1000.0))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
