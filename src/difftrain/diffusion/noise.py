"""Changes to the sampled noise eps: offset noise and input perturbation.

Both draw from a CPU `torch.Generator` and then move the draw to `noise`'s device and dtype: the
trainer takes all its randomness from one CPU generator, so a run is reproducible on any device.
The draw is always float32, so its values do not depend on the noise dtype either. With
`strength == 0` nothing is drawn and `noise` itself is returned, which leaves the generator's
stream, and therefore every run made without the option, unchanged.
"""

from __future__ import annotations

import torch


def _check_strength(strength: float) -> None:
    if not strength >= 0:  # also rejects NaN
        raise ValueError(f"noise strength must be >= 0, got {strength!r}")


def _draw(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) of `shape`, drawn on the CPU from `generator`, moved to like's device and dtype."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, "Diffusion with Offset Noise").

        eps' = eps + strength * z,    z ~ N(0, 1) of shape (B, C, 1, 1)

    One value per sample and channel, constant over the spatial dims: the plain eps has almost no
    energy in the per-channel mean, so a model trained on it barely learns to change the image's
    overall brightness or colour; the offset adds that low-frequency component. Noise with more
    dims after (B, C) (e.g. video, (B, C, F, H, W)) gets an offset constant over all of them.
    `strength == 0` returns `noise` itself and draws nothing.
    """
    _check_strength(strength)
    if strength == 0:
        return noise
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
    return noise + strength * _draw(shape, generator, noise)


def perturbed_noise(
    noise: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in
    Diffusion Models").

        eps' = eps + strength * z,    z ~ N(0, 1) of noise's shape

    Use eps' only to build the model input x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps'; the target
    stays computed from the original eps. Training on slightly wrong inputs simulates the
    prediction errors the model sees at sampling time (exposure bias). `strength == 0` returns
    `noise` itself and draws nothing.
    """
    _check_strength(strength)
    if strength == 0:
        return noise
    return noise + strength * _draw(tuple(noise.shape), generator, noise)
