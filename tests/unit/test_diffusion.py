"""Diffusion maths on a 2x4x8x8 tensor: checked against diffusers and against hand values."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from difftrain.diffusion import add_noise, sample_timesteps, training_target, velocity


@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    return x0, noise, torch.tensor([3, 900])


def test_add_noise_matches_diffusers(scheduler, tensors) -> None:
    x0, noise, t = tensors
    expected = scheduler.add_noise(x0, noise, t)
    assert torch.allclose(add_noise(x0, noise, scheduler.alphas_cumprod, t), expected, atol=1e-6)


def test_velocity_matches_diffusers(scheduler, tensors) -> None:
    x0, noise, t = tensors
    expected = scheduler.get_velocity(x0, noise, t)
    assert torch.allclose(velocity(x0, noise, scheduler.alphas_cumprod, t), expected, atol=1e-6)


def test_forward_process_by_hand() -> None:
    # abar = 0.64: x_t = 0.8 x0 + 0.6 eps, v = 0.8 eps - 0.6 x0.
    abar = torch.tensor([0.64])
    x0, eps, t = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 1.0), torch.tensor([0])
    assert add_noise(x0, eps, abar, t).item() == pytest.approx(0.8 * 2 + 0.6 * 1)
    assert velocity(x0, eps, abar, t).item() == pytest.approx(0.8 * 1 - 0.6 * 2)


def test_targets_per_prediction_type(scheduler, tensors) -> None:
    x0, noise, t = tensors
    ac = scheduler.alphas_cumprod
    assert training_target("epsilon", x0, noise, ac, t) is noise
    assert training_target("sample", x0, noise, ac, t) is x0
    assert torch.equal(
        training_target("v_prediction", x0, noise, ac, t), velocity(x0, noise, ac, t)
    )
    with pytest.raises(ValueError, match="unknown prediction type"):
        training_target("flow", x0, noise, ac, t)


def test_timesteps_are_seeded_and_in_range() -> None:
    a = sample_timesteps(1000, 1000, torch.Generator().manual_seed(1))
    b = sample_timesteps(1000, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 1000
    assert len(a.unique()) > 500
