"""Rectified flow (SD3, Flux) as pure tensor functions.

With sigma in [0, 1] (0: the clean latent, 1: pure noise):
    x_sigma = (1 - sigma) * x_0 + sigma * eps
    target  = eps - x_0                       (the velocity d x_sigma / d sigma)
Training sigmas come from the scheduler's own table (`sigmas`, shifted as the model was
trained), indexed by a draw u in [0, 1) from the timestep density, as diffusers' SD3 and Flux
training scripts do; the density and the loss weights are diffusers' own functions.
"""

from __future__ import annotations

import torch

TIMESTEP_SAMPLING_DEFAULTS = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
"""The parameters of the timestep densities when the config leaves them unset."""


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    sigma = _per_sample(sigmas, x0)
    return (1.0 - sigma) * x0 + sigma * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def table_indices(u: torch.Tensor, table_size: int) -> torch.Tensor:
    """Draws u in [0, 1] as indices into a sigma table of `table_size` entries."""
    return (u * table_size).long().clamp(0, table_size - 1)


def draw_u(
    scheme: str, generator: torch.Generator, *, logit_mean: float, logit_std: float,
    mode_scale: float,
) -> torch.Tensor:  # fmt: skip
    """One draw from the timestep density `scheme` (uniform, logit_normal, mode), on the CPU."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=1, logit_mean=logit_mean, logit_std=logit_std,
        mode_scale=mode_scale, generator=generator,
    )  # fmt: skip


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights (B,) for `scheme`; None for `none` (a plain mean)."""
    if scheme == "none":
        return None
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas).float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
