"""Images to the latents the UNet sees: VAE encoding with the model's shift and scale."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_latents(
    vae, pixels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """fp32 latents of `pixels` (in [-1, 1]): a sample of the VAE's posterior drawn from
    `generator`, or its mean when there is none (fixed inputs, e.g. a validation loss)."""
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generator=generator) if generator is not None else posterior.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()
