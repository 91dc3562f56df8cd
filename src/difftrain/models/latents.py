"""Images to the latents the denoiser sees: VAE encoding with the model's shift and scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LatentPosterior:
    """The VAE's posterior N(mean, std^2) of a batch, already in the denoiser's units.

    Kept as (mean, std) rather than as a sample, so the draw can come from each sample's own
    generator (and, later, so a cache can store it without fixing the run's randomness).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """`mean + std * eps`, with eps ~ N(0, 1) of the latents' shape."""
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> LatentPosterior:
    """fp32 posterior of `pixels` (in [-1, 1]) after the VAE's shift and scaling factor.

    The pixels are cast to the VAE's own dtype: it may run in fp32 beside a half-precision
    denoiser (`model.vae_dtype`).
    """
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    return LatentPosterior(
        mean=((posterior.mean - shift) * scale).float(), std=(posterior.std * scale).float()
    )


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The posterior's mean: fixed latents for fixed inputs (e.g. a validation loss)."""
    return encode_posterior(vae, pixels).mean
