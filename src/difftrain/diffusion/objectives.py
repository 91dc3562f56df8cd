"""The DDPM forward process and what the UNet is trained to predict.

With abar_t = alphas_cumprod[t]:
    x_t   = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps
    v_t   = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0      (Salimans & Ho, 2022)
These match diffusers' `DDPMScheduler.add_noise` / `get_velocity`; the tests check that.
"""

from __future__ import annotations

from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (batch,) tensor to broadcast over `like` (batch, C, H, W)."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
    abar = alphas_cumprod.to(timesteps.device)[timesteps]
    return _per_sample(abar.sqrt(), like), _per_sample((1 - abar).sqrt(), like)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    signal, sigma = _coefficients(alphas_cumprod, timesteps, x0)
    return signal * x0 + sigma * noise


def velocity(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    signal, sigma = _coefficients(alphas_cumprod, timesteps, x0)
    return signal * noise - sigma * x0


def training_target(
    prediction_type: PredictionType,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the model should output for `x_t` under the given parameterisation."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, alphas_cumprod, timesteps)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), drawn from `generator`."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
