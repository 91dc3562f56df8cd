"""The denoising loss of one batch, in two parts shared by training and the validation loss:
`encode_batch` (images to a latent posterior, captions to conditioning) and `denoising_loss`
(given latents, conditioning and the random draws, the weighted error of the denoiser).

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

from difftrain.diffusion.weighting import weighted_mse
from difftrain.models.latents import LatentPosterior, encode_posterior
from difftrain.models.sample_dropout import keyed_by
from difftrain.seeds import generator
from difftrain.training.objective import LossSettings

__all__ = ["LossSettings", "SampleDraws", "denoising_loss", "diffusion_loss", "encode_batch"]


@dataclass
class SampleDraws:
    """The random inputs of a batch, one row per sample, on the CPU."""

    latent_eps: torch.Tensor
    noise: torch.Tensor
    """The target's noise (offset noise included)."""
    model_noise: torch.Tensor
    """The noise that builds the model input (input perturbation included)."""
    timesteps: torch.Tensor
    """Per sample: a DDPM timestep, or an index into the flow scheduler's sigma table."""


def draw_for_samples(positions: list[int], latent_shape: tuple[int, ...], objective) -> SampleDraws:
    """Each sample's draws from its own generator, (seed, "sample", position)."""
    rows = []
    for position in positions:
        rng = generator(objective.settings.seed, "sample", position)
        latent_eps = torch.randn((1, *latent_shape), generator=rng)
        rows.append((latent_eps, *objective.draw(rng, latent_shape)))
    columns = (torch.cat(column) for column in zip(*rows, strict=True))
    return SampleDraws(*columns)


def encode_batch(
    batch: dict, components, settings: LossSettings, cached=None
) -> tuple[LatentPosterior, dict]:
    """The batch's latent posterior and text conditioning (no gradient unless text trains).

    `cached` (an `InputCache`) reads either from the cache, computing what is missing.
    """
    device = components.device
    if cached is not None and cached.latents:
        posterior = cached.posterior(batch)
    else:
        posterior = encode_posterior(
            components.vae, batch["pixel_values"].to(device, non_blocking=True)
        )
    if cached is not None and cached.text:
        return posterior, cached.conditioning(batch)
    with torch.set_grad_enabled(settings.train_text_encoder):
        conditioning = components.family.encode_prompts(components.parts, batch, device)
    return posterior, conditioning


def denoising_loss(
    family, denoiser, objective, latents: torch.Tensor, conditioning: dict, draws, batch: dict,
    *, weighted: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The error of `denoiser` on `latents` noised with `draws`, weighted per sample as the
    objective says (min-SNR, SD3 weighting) unless `weighted` is false."""
    device = latents.device
    noised = objective.noised(
        latents, draws.noise.to(device), draws.model_noise.to(device), draws.timesteps
    )
    prediction = family.predict(denoiser, noised.model_input, noised.timesteps, conditioning, batch)
    return weighted_mse(prediction, noised.target, noised.weights if weighted else None)


def diffusion_loss(batch: dict, components, denoiser, objective, cached=None) -> torch.Tensor:
    """The training loss of one batch (latents and conditioning from the cache, or made on
    the fly)."""
    settings = objective.settings
    positions = [int(p) for p in batch["position"]]
    with keyed_by(settings.seed, positions):  # LoRA dropout masks, per sample
        posterior, conditioning = encode_batch(batch, components, settings, cached)
        draws = draw_for_samples(positions, tuple(posterior.mean.shape[1:]), objective)
        latents = posterior.sample(draws.latent_eps)
        return denoising_loss(
            components.family, denoiser, objective, latents, conditioning, draws, batch
        )
