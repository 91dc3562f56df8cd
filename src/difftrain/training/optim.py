"""Optimizer and learning-rate schedule, each built from the `train` section alone."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable
from typing import Literal

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from difftrain.config.optimizer import optimizer_name
from difftrain.config.schema import TrainConfig
from difftrain.errors import UserError

logger = logging.getLogger("difftrain")

PRODIGY_USUAL_LR = 1.0
"""Prodigy estimates the rate itself; `learning_rate` scales that estimate (its README: 1.0)."""


def adamw_implementation(
    params: Iterable[torch.Tensor], *, grad_scaler: bool = False
) -> Literal["fused", "foreach"]:
    """Which of torch's AdamW kernels `build_optimizer` uses for these parameters.

    `fused` (one kernel per device and dtype) when torch has it for every parameter: float
    tensors on the CPU, CUDA, MPS, XPU, ...; else `foreach` (multi-tensor). Both compute what
    the plain for-loop AdamW does, within float rounding.

    Under fp16's grad scaler (`grad_scaler=True`) it is `foreach`: the scaler hands a fused
    step the overflow flag to skip the update inside the kernel, so accelerate would never
    report the step as skipped, and the schedule, the EMA and the non-finite count would
    advance over updates that did not happen.
    """
    supported = _get_fused_kernels_supported_devices()
    if not grad_scaler and all(
        p.device.type in supported and torch.is_floating_point(p) for p in params
    ):
        return "fused"
    return "foreach"


def build_optimizer(
    cfg: TrainConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """`train.optimizer` over the parameters that train, with the adam_* hyperparameters."""
    params = [p for p in params if p.requires_grad]
    hyper = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "weight_decay": cfg.adam_weight_decay,
        "eps": cfg.adam_epsilon,
    }
    name = optimizer_name(cfg)
    if cfg.use_8bit_adam:
        logger.warning("train.use_8bit_adam is deprecated; set train.optimizer: adamw_8bit")
    if name == "adamw_8bit":
        return _adamw_8bit(cfg, params, hyper)
    if name == "prodigy":
        return _prodigy(params, hyper)
    kernel = adamw_implementation(params, grad_scaler=cfg.mixed_precision == "fp16")
    return _described(
        torch.optim.AdamW(params, **hyper, **{kernel: True}), f"torch AdamW ({kernel})"
    )


def _described(optimizer: torch.optim.Optimizer, text: str) -> torch.optim.Optimizer:
    # Said in the run's "training N steps ..." line: a line logged now would stand before the
    # one-line refusals that start-up can still give (a resume, the validation settings).
    optimizer.description = text
    return optimizer


def describe_optimizer(optimizer) -> str:
    """What `build_optimizer` built, e.g. "torch AdamW (fused)" (unwrapping accelerate's)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return getattr(inner, "description", type(inner).__name__)


def _adamw_8bit(cfg: TrainConfig, params: list, hyper: dict) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit: blockwise 8-bit moments (tensors under 4096 values keep fp32)."""
    key, off = (
        ("train.use_8bit_adam:", "train.use_8bit_adam: false")
        if cfg.use_8bit_adam
        else ("train.optimizer: adamw_8bit", "train.optimizer: adamw")
    )
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            f"{key} needs the bitsandbytes package (pip install bitsandbytes); or set {off}"
        ) from None
    if any(p.device.type == "cpu" for p in params):
        _check_8bit_runs_on_cpu(bitsandbytes, key, off)
    optimizer = bitsandbytes.optim.AdamW8bit(params, **hyper)
    return _described(optimizer, f"bitsandbytes AdamW8bit {bitsandbytes.__version__}")


def _check_8bit_runs_on_cpu(bitsandbytes, key: str, off: str) -> None:
    """Older bitsandbytes releases run 8-bit AdamW on a GPU only and fail at the first step,
    after the models loaded, with an error that names no setting: a probe step says it first."""
    probe = torch.zeros(4096, requires_grad=True)  # the smallest tensor with 8-bit state
    probe.grad = torch.ones_like(probe)
    try:
        bitsandbytes.optim.AdamW8bit([probe]).step()
    except Exception:  # noqa: BLE001 - whatever it raises, it cannot run here
        raise UserError(
            f"{key} needs a CUDA GPU with this bitsandbytes ({bitsandbytes.__version__}: it "
            f"has no CPU kernels); train on a CUDA GPU, upgrade bitsandbytes, or set {off}"
        ) from None


def _prodigy(params: list, hyper: dict) -> torch.optim.Optimizer:
    """prodigyopt's Prodigy with its README's settings for diffusion models: bias correction
    on, and the warmup safeguard (a schedule's warmup would otherwise inflate its estimate)."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError(
            "train.optimizer: prodigy needs the prodigyopt package (pip install prodigyopt); "
            "or set train.optimizer: adamw"
        ) from None
    if hyper["lr"] < 0.1 * PRODIGY_USUAL_LR:
        logger.warning(
            "train.optimizer: prodigy estimates the learning rate itself and "
            "train.learning_rate (%g) scales it; set train.learning_rate: 1.0 unless a "
            "smaller rate is meant",
            hyper["lr"],
        )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
        optimizer = Prodigy(params, **hyper, use_bias_correction=True, safeguard_warmup=True)
    return _described(optimizer, f"Prodigy (train.learning_rate {hyper['lr']:g} scales its rate)")


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' schedules; stepped once per optimizer step, so counts are optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
    )
