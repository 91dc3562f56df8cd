"""Per-timestep loss weighting: the signal-to-noise ratio, Min-SNR-gamma and a weighted MSE.

Notation as in `objectives.py`; abar_t = alphas_cumprod[t], a = sqrt(abar_t), s = sqrt(1 - abar_t):
    x_t = a * x_0 + s * eps,   v = a * eps - s * x_0,   SNR(t) = a^2 / s^2 = abar_t / (1 - abar_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftrain.diffusion.objectives import PredictionType


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of the forward process at each sample's timestep.

        SNR(t) = abar_t / (1 - abar_t)

    (Kingma et al. 2021, "Variational Diffusion Models"). Returns a float32 tensor shaped like
    `timesteps`, on `timesteps.device`. Equals diffusers' `training_utils.compute_snr`, which
    computes the same quantity as (sqrt(abar) / sqrt(1 - abar))^2. A zero-terminal-SNR schedule
    (abar_T = 0) gives SNR = 0 there; abar = 1 would give inf.
    """
    # float32 rather than float64: MPS has no float64, and for abar in [0.5, 1] the subtraction
    # 1 - abar is exact in float32 anyway (Sterbenz), so nothing is gained.
    abar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return abar / (1 - abar)


def min_snr_weights(
    snr: torch.Tensor, gamma: float, prediction_type: PredictionType
) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma for an MSE on `prediction_type`'s own target.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", weight the
    loss *in x_0 space* by min(SNR, gamma):

        L = min(SNR, gamma) * ||x_0 - x0_hat||^2.

    The model's output fixes x0_hat, eps_hat and v_hat together through the same x_t:
    x_t = a * x0_hat + s * eps_hat. Subtracting this from x_t = a * x_0 + s * eps,

        eps - eps_hat = -(a / s) * (x_0 - x0_hat)
            => ||eps - eps_hat||^2 = SNR * ||x_0 - x0_hat||^2,
        v - v_hat = a * (eps - eps_hat) - s * (x_0 - x0_hat) = -((a^2 + s^2) / s) * (x_0 - x0_hat)
                  = -(x_0 - x0_hat) / s
            => ||v - v_hat||^2 = ||x_0 - x0_hat||^2 / (1 - abar) = (SNR + 1) * ||x_0 - x0_hat||^2.

    So the same loss L, written as a weighted MSE on each parameterisation's target, needs

        epsilon:       w = min(SNR, gamma) / SNR
        v_prediction:  w = min(SNR, gamma) / (SNR + 1)
        sample (x_0):  w = min(SNR, gamma)

    The epsilon weight is computed as min(1, gamma / SNR), which is the same for SNR > 0 and
    takes its limit 1 at SNR = 0 (zero-terminal-SNR schedules) instead of 0 / 0 = NaN.
    SNR + 1 >= 1, so the v weight cannot divide by zero. Returns float32 weights shaped like `snr`.
    """
    if not gamma > 0:  # also rejects NaN
        raise ValueError(f"min-SNR gamma must be positive, got {gamma!r}")
    snr = snr.float()
    if prediction_type == "epsilon":
        # gamma / 0 = inf, clamped to 1: the SNR -> 0+ limit of min(SNR, gamma) / SNR.
        return (gamma / snr).clamp(max=1.0)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Mean squared error in float32, optionally with one weight per sample.

    Without weights: exactly `F.mse_loss(prediction.float(), target.float())`.
    With weights w of shape (batch,):

        L = 1/B * sum_b w_b * mean_{c,h,w} (prediction_b - target_b)^2.

    Float32 because a bf16/fp16 mean over a large latent loses precision in the loss value.
    """
    prediction, target = prediction.float(), target.float()
    if weights is None:
        return F.mse_loss(prediction, target)
    batch = prediction.shape[0]
    if weights.shape != (batch,):
        # A (B, 1) weight would broadcast against (B,) into a (B, B) matrix and silently give a
        # different loss, so insist on the shape.
        raise ValueError(f"weights must have shape ({batch},), got {tuple(weights.shape)}")
    per_sample = F.mse_loss(prediction, target, reduction="none").reshape(batch, -1).mean(dim=1)
    return (per_sample * weights.to(device=per_sample.device, dtype=torch.float32)).mean()
