"""The training objective of a run: how a sample's noise and timestep are drawn, how the
denoiser's input is made from them, and what it is trained to predict.

Two objectives share one interface, so the loss, the validation loss and (later) a latent
cache never ask which family trains:
- `DdpmObjective` (sd, sdxl): a DDPM noise schedule, epsilon / v / x0 targets, min-SNR.
- `FlowObjective` (sd3, flux): rectified flow, sigmas from the scheduler's table, SD3's
  timestep densities and loss weightings.
A "timestep" here is what a draw keeps per sample: a DDPM timestep, or an index into the flow
scheduler's sigma table; `noised` turns it into what the denoiser is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.diffusion import add_noise, sample_timesteps, training_target
from difftrain.diffusion.flow import (
    TIMESTEP_SAMPLING_DEFAULTS,
    draw_u,
    flow_loss_weights,
    flow_noisy,
    flow_target,
    table_indices,
)
from difftrain.diffusion.noise import offset_noise, perturbed_noise
from difftrain.diffusion.weighting import min_snr_weights, snr


@dataclass(frozen=True)
class LossSettings:
    """What shapes the loss, from the `train` section (built once per run)."""

    prediction_type: str
    seed: int = 0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    weight_dtype: torch.dtype = torch.float32
    train_text_encoder: bool = False
    timestep_sampling: str = "logit_normal"
    logit_mean: float = TIMESTEP_SAMPLING_DEFAULTS["logit_mean"]
    logit_std: float = TIMESTEP_SAMPLING_DEFAULTS["logit_std"]
    mode_scale: float = TIMESTEP_SAMPLING_DEFAULTS["mode_scale"]
    loss_weighting: str = "none"


@dataclass
class Noised:
    """A batch ready for the denoiser, and what it should output."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    """What the denoiser is given as its timestep."""
    target: torch.Tensor
    weights: torch.Tensor | None
    """Per-sample loss weights (B,), or None for a plain mean."""


class DdpmObjective:
    def __init__(self, scheduler, settings: LossSettings, device: torch.device):
        self.settings = settings
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        self.num_timesteps = len(self.alphas_cumprod)
        self.prediction_type = settings.prediction_type

    def draw(self, rng: torch.Generator, latent_shape: tuple[int, ...]):
        """(target noise, model-input noise, timestep) of one sample, in this fixed order."""
        settings = self.settings
        noise = torch.randn((1, *latent_shape), generator=rng)
        noise = offset_noise(noise, settings.noise_offset, rng)
        timesteps = sample_timesteps(1, self.num_timesteps, rng)
        model_noise = perturbed_noise(noise, settings.input_perturbation, rng)
        return noise, model_noise, timesteps

    def fixed_timestep(self, t: int) -> torch.Tensor:
        """Validation-loss timestep t (0: nearly clean, num_timesteps - 1: nearly noise)."""
        return torch.tensor([t])

    def noised(self, latents, noise, model_noise, timesteps) -> Noised:
        abar = self.alphas_cumprod
        timesteps = timesteps.to(abar.device)
        weights = None
        if self.settings.snr_gamma is not None:
            weights = min_snr_weights(
                snr(abar, timesteps), self.settings.snr_gamma, self.prediction_type
            )
        return Noised(
            model_input=add_noise(latents, model_noise, abar, timesteps),
            timesteps=timesteps,
            target=training_target(self.prediction_type, latents, noise, abar, timesteps),
            weights=weights,
        )


class FlowObjective:
    prediction_type = "flow"

    def __init__(self, scheduler, settings: LossSettings, device: torch.device):
        self.settings = settings
        # The scheduler's table at construction: N sigmas from 1 down to 1/N, shifted by the
        # scheduler's `shift` unless it shifts dynamically at inference (Flux).
        self.sigmas = scheduler.sigmas.float().to(device)
        self.model_timesteps = scheduler.timesteps.float().to(device)
        self.num_timesteps = len(self.sigmas)

    def draw(self, rng: torch.Generator, latent_shape: tuple[int, ...]):
        settings = self.settings
        noise = torch.randn((1, *latent_shape), generator=rng)
        noise = offset_noise(noise, settings.noise_offset, rng)
        u = draw_u(
            settings.timestep_sampling, rng, logit_mean=settings.logit_mean,
            logit_std=settings.logit_std, mode_scale=settings.mode_scale,
        )  # fmt: skip
        return noise, noise, table_indices(u, self.num_timesteps)

    def fixed_timestep(self, t: int) -> torch.Tensor:
        # The table runs from noise to clean: timestep t (as in DDPM, larger is noisier) is
        # entry N - 1 - t, whose sigma is about (t + 1) / N before the shift.
        return torch.tensor([self.num_timesteps - 1 - t])

    def noised(self, latents, noise, model_noise, indices) -> Noised:
        indices = indices.to(self.sigmas.device)
        sigmas = self.sigmas[indices]
        return Noised(
            model_input=flow_noisy(latents, model_noise, sigmas),
            timesteps=self.model_timesteps[indices],
            target=flow_target(latents, noise),
            weights=flow_loss_weights(self.settings.loss_weighting, sigmas),
        )


def build_objective(flow_matching: bool, scheduler, settings: LossSettings, device):
    return (FlowObjective if flow_matching else DdpmObjective)(scheduler, settings, device)
