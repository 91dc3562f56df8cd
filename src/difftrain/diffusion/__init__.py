"""Diffusion maths as pure functions of tensors: noising, targets, timesteps."""

from difftrain.diffusion.objectives import (
    add_noise,
    sample_timesteps,
    training_target,
    velocity,
)

__all__ = ["add_noise", "sample_timesteps", "training_target", "velocity"]
