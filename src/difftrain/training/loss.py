"""The denoising loss of one batch, shared by training and (in parts) the validation loss.

Every random draw of a sample (its latent sample, noise, offset noise, timestep and input
perturbation, and its LoRA dropout masks) comes from a generator keyed by (run seed, the
sample's stream position), in that fixed order. So a sample is treated the same whether it
sits in a batch of 4 or in one of two accumulated batches of 2, on one process or another,
in a resumed run or not; and an option that is off draws nothing, leaving every other draw
as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.diffusion import add_noise, sample_timesteps, training_target
from difftrain.diffusion.noise import offset_noise, perturbed_noise
from difftrain.diffusion.weighting import min_snr_weights, snr, weighted_mse
from difftrain.models.latents import encode_posterior
from difftrain.models.sample_dropout import keyed_by
from difftrain.seeds import generator


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


@dataclass
class SampleDraws:
    """The random inputs of a batch, one row per sample, on the CPU."""

    latent_eps: torch.Tensor
    noise: torch.Tensor
    """The target's noise (offset noise included)."""
    model_noise: torch.Tensor
    """The noise that builds the model input (input perturbation included)."""
    timesteps: torch.Tensor


def draw_for_samples(
    positions: list[int], latent_shape: tuple[int, ...], num_timesteps: int, settings: LossSettings
) -> SampleDraws:
    """Each sample's draws from its own generator, (seed, "sample", position)."""
    rows = []
    for position in positions:
        rng = generator(settings.seed, "sample", position)
        latent_eps = torch.randn((1, *latent_shape), generator=rng)
        noise = torch.randn((1, *latent_shape), generator=rng)
        noise = offset_noise(noise, settings.noise_offset, rng)
        timesteps = sample_timesteps(1, num_timesteps, rng)
        model_noise = perturbed_noise(noise, settings.input_perturbation, rng)
        rows.append((latent_eps, noise, model_noise, timesteps))
    latent_eps, noise, model_noise, timesteps = (
        torch.cat(column) for column in zip(*rows, strict=True)
    )
    return SampleDraws(latent_eps, noise, model_noise, timesteps)


def diffusion_loss(
    batch: dict[str, torch.Tensor],
    components,
    unet: torch.nn.Module,
    *,
    alphas_cumprod: torch.Tensor,
    settings: LossSettings,
) -> torch.Tensor:
    """The denoising loss of one batch (latents and text embeddings made on the fly)."""
    positions = [int(p) for p in batch["position"]]
    with keyed_by(settings.seed, positions):  # LoRA dropout masks, per sample
        return _denoising_loss(batch, positions, components, unet, alphas_cumprod, settings)


def _denoising_loss(batch, positions, components, unet, alphas_cumprod, settings):
    device = alphas_cumprod.device
    pixels = batch["pixel_values"].to(device, dtype=settings.weight_dtype, non_blocking=True)
    posterior = encode_posterior(components.vae, pixels)
    with torch.set_grad_enabled(settings.train_text_encoder):
        input_ids = batch["input_ids"].to(device)
        text_embeddings = components.text_encoder(input_ids, return_dict=False)[0]

    draws = draw_for_samples(
        positions, tuple(posterior.mean.shape[1:]), len(alphas_cumprod), settings
    )
    latents = posterior.sample(draws.latent_eps)
    noise, model_noise = draws.noise.to(device), draws.model_noise.to(device)
    timesteps = draws.timesteps.to(device)
    noisy = add_noise(latents, model_noise, alphas_cumprod, timesteps)
    target = training_target(settings.prediction_type, latents, noise, alphas_cumprod, timesteps)
    prediction = unet(noisy, timesteps, text_embeddings, return_dict=False)[0]
    weights = None
    if settings.snr_gamma is not None:
        weights = min_snr_weights(
            snr(alphas_cumprod, timesteps), settings.snr_gamma, settings.prediction_type
        )
    return weighted_mse(prediction, target, weights)
