"""Loss options: SNR, Min-SNR-gamma weights, weighted MSE, offset noise and input perturbation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from difftrain.diffusion import (
    add_noise,
    min_snr_weights,
    offset_noise,
    perturbed_noise,
    snr,
    training_target,
    velocity,
    weighted_mse,
)

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# --- snr ------------------------------------------------------------------------------------


def test_snr_matches_diffusers(scheduler) -> None:
    t = torch.arange(1000)
    ours = snr(scheduler.alphas_cumprod, t)
    assert ours.dtype == torch.float32
    assert ours.shape == (1000,)
    assert torch.allclose(ours, compute_snr(scheduler, t), rtol=1e-5)


def test_snr_by_hand() -> None:
    # abar = 0.8 -> 0.8 / 0.2 = 4; abar = 0.5 -> 1; abar = 0.2 -> 0.25.
    abar = torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64)
    assert snr(abar, torch.tensor([0, 1, 2, 0])).tolist() == pytest.approx([4.0, 1.0, 0.25, 4.0])


# --- min_snr_weights --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    [
        ("epsilon", [1.0, 1.0, 0.25]),
        ("v_prediction", [0.5 / 1.5, 4 / 5, 5 / 21]),
        ("sample", [0.5, 4.0, 5.0]),
    ],
)
def test_min_snr_weights_by_hand(prediction_type, expected) -> None:
    weights = min_snr_weights(torch.tensor([0.5, 4.0, 20.0]), 5.0, prediction_type)
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_example(scheduler, prediction_type) -> None:
    # The formula of diffusers' examples/text_to_image/train_text_to_image.py.
    gamma, timesteps = 5.0, torch.arange(0, 1000, 7)
    snr_ = compute_snr(scheduler, timesteps)
    expected = torch.stack([snr_, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    expected = expected / snr_ if prediction_type == "epsilon" else expected / (snr_ + 1)
    ours = min_snr_weights(snr(scheduler.alphas_cumprod, timesteps), gamma, prediction_type)
    assert torch.allclose(ours, expected, rtol=1e-5)


def test_min_snr_weights_at_zero_and_infinite_snr() -> None:
    # SNR = 0 (zero terminal SNR) and SNR = inf (abar = 1): finite weights at the limits.
    values = torch.tensor([0.0, float("inf")])
    assert min_snr_weights(values, 5.0, "epsilon").tolist() == [1.0, 0.0]
    assert min_snr_weights(values, 5.0, "v_prediction").tolist() == [0.0, 0.0]
    assert min_snr_weights(values, 5.0, "sample").tolist() == [0.0, 5.0]


def test_min_snr_weights_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown prediction type"):
        min_snr_weights(torch.tensor([1.0]), 5.0, "flow")
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights(torch.tensor([1.0]), 0.0, "epsilon")


def test_min_snr_is_one_loss_in_x0_space(scheduler) -> None:
    # One model output seen as x0_hat, eps_hat or v_hat (tied by the same x_t) gives the same
    # Min-SNR loss, min(SNR, gamma) * ||x0 - x0_hat||^2, whichever target the MSE is taken on.
    generator = torch.Generator().manual_seed(0)
    x0, eps, x0_hat = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    ac, t = scheduler.alphas_cumprod.double(), torch.tensor([10, 500, 990])
    x0, eps, x0_hat = x0.double(), eps.double(), x0_hat.double()
    abar = ac[t].reshape(-1, 1, 1, 1)
    x_t = add_noise(x0, eps, ac, t)
    eps_hat = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
    v_hat = velocity(x0_hat, eps_hat, ac, t)
    predictions = {"epsilon": eps_hat, "v_prediction": v_hat, "sample": x0_hat}

    snr_ = snr(ac, t)
    # The identities behind the weights, per sample: eps error = SNR * x0 error,
    # v error = (SNR + 1) * x0 error.
    x0_err = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    eps_err = ((eps - eps_hat) ** 2).mean(dim=(1, 2, 3))
    v_err = ((velocity(x0, eps, ac, t) - v_hat) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(eps_err.float(), snr_ * x0_err.float(), rtol=1e-5)
    assert torch.allclose(v_err.float(), (snr_ + 1) * x0_err.float(), rtol=1e-5)

    gamma = 5.0  # SNR at t = 10, 500, 990 is about 97, 0.3, 0.005: both sides of gamma.
    expected = (snr_.clamp(max=gamma) * x0_err.float()).mean()
    for prediction_type in PREDICTION_TYPES:
        target = training_target(prediction_type, x0, eps, ac, t)
        weights = min_snr_weights(snr_, gamma, prediction_type)
        loss = weighted_mse(predictions[prediction_type], target, weights)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), prediction_type


# --- weighted_mse ---------------------------------------------------------------------------


def test_weighted_mse_without_weights_is_mse_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 4, 8, 8, generator=generator),
    )
    assert torch.equal(weighted_mse(a, b, None), F.mse_loss(a, b))
    loss = weighted_mse(a.bfloat16(), b.bfloat16(), None)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, F.mse_loss(a.bfloat16().float(), b.bfloat16().float()))
    assert torch.allclose(weighted_mse(a, b, torch.ones(2)), F.mse_loss(a, b), rtol=1e-6)


def test_weighted_mse_by_hand() -> None:
    # Sample 0: errors 1 and 3 -> mean 5; sample 1: errors 2 and 0 -> mean 2.
    prediction = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    target = torch.zeros(2, 2)
    # weights [2, 0.5]: (2 * 5 + 0.5 * 2) / 2 = 5.5.
    assert weighted_mse(prediction, target, torch.tensor([2.0, 0.5])).item() == pytest.approx(5.5)
    assert weighted_mse(prediction, target, None).item() == pytest.approx(3.5)


def test_weighted_mse_rejects_misshapen_weights() -> None:
    with pytest.raises(ValueError, match="shape"):
        weighted_mse(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 1))


# --- offset_noise and perturbed_noise -------------------------------------------------------

NOISE_FUNCTIONS = [offset_noise, perturbed_noise]


def _noise(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(123))


def test_offset_noise_is_constant_over_space() -> None:
    noise = _noise()
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    added = out - noise
    assert out.shape == noise.shape
    per_channel = added[:, :, :1, :1]
    assert torch.allclose(added, per_channel.expand_as(added), atol=1e-6)
    assert len(per_channel.flatten().unique()) == 8  # a different value per (b, c)
    # Drawn as N(0, 1) of shape (B, C, 1, 1) from the generator, times strength.
    expected = 0.1 * torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(per_channel, expected, atol=1e-6)


def test_perturbed_noise_is_drawn_per_element() -> None:
    noise = _noise()
    out = perturbed_noise(noise, 0.1, torch.Generator().manual_seed(0))
    expected = 0.1 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape
    assert torch.allclose(out - noise, expected, atol=1e-6)


@pytest.mark.parametrize("function", NOISE_FUNCTIONS)
def test_noise_is_reproducible_from_seed(function) -> None:
    noise = _noise()
    a = function(noise, 0.1, torch.Generator().manual_seed(7))
    b = function(noise, 0.1, torch.Generator().manual_seed(7))
    c = function(noise, 0.1, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(noise, _noise())  # the input is not changed in place


@pytest.mark.parametrize("function", NOISE_FUNCTIONS)
def test_noise_follows_input_dtype_with_the_same_draw(function) -> None:
    noise = _noise()
    out32 = function(noise, 0.1, torch.Generator().manual_seed(3))
    out64 = function(noise.double(), 0.1, torch.Generator().manual_seed(3))
    out16 = function(noise.bfloat16(), 0.1, torch.Generator().manual_seed(3))
    assert out64.dtype == torch.float64 and out16.dtype == torch.bfloat16
    assert torch.allclose(out64.float(), out32, atol=1e-6)
    assert torch.allclose(out16.float(), out32, atol=0.05)


@pytest.mark.parametrize("function", NOISE_FUNCTIONS)
def test_zero_strength_returns_noise_and_draws_nothing(function) -> None:
    noise = _noise()
    generator = torch.Generator().manual_seed(5)
    before = generator.get_state()
    assert function(noise, 0.0, generator) is noise
    assert torch.equal(generator.get_state(), before)
    # A non-zero strength does advance the generator, so the comparison above can fail.
    function(noise, 0.1, generator)
    assert not torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("function", NOISE_FUNCTIONS)
def test_negative_strength_is_rejected(function) -> None:
    with pytest.raises(ValueError, match="strength"):
        function(_noise(), -0.1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("function", "batch"),
    [(offset_noise, 4096), (perturbed_noise, 64)],  # 16384 draws each
)
def test_added_noise_has_the_right_std(function, batch) -> None:
    noise = torch.zeros(batch, 4, 8, 8)
    added = function(noise, 0.3, torch.Generator().manual_seed(0))
    if function is offset_noise:
        added = added[:, :, 0, 0]  # the independent draws
    # Standard error of the std estimate from 16384 draws is about 0.3 * 0.6%; allow 5%.
    assert added.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(added.mean().item()) < 0.3 * 0.05
