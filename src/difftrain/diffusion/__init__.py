"""Diffusion maths as pure functions of tensors: noising, targets, timesteps, loss weighting."""

from difftrain.diffusion.noise import offset_noise, perturbed_noise
from difftrain.diffusion.objectives import (
    add_noise,
    sample_timesteps,
    training_target,
    velocity,
)
from difftrain.diffusion.weighting import min_snr_weights, snr, weighted_mse

__all__ = [
    "add_noise",
    "min_snr_weights",
    "offset_noise",
    "perturbed_noise",
    "sample_timesteps",
    "snr",
    "training_target",
    "velocity",
    "weighted_mse",
]
