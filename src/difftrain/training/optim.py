"""Optimizer and learning-rate schedule, each built from the `train` section alone."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from difftrain.config.schema import TrainConfig
from difftrain.errors import UserError


def build_optimizer(
    cfg: TrainConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (bitsandbytes' 8-bit AdamW on request)."""
    adamw = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:
            raise UserError(
                "train.use_8bit_adam: needs the bitsandbytes package (pip install "
                "bitsandbytes, CUDA only); or set train.use_8bit_adam: false"
            ) from None
        adamw = bitsandbytes.optim.AdamW8bit
    return adamw(
        [p for p in params if p.requires_grad],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' schedules; stepped once per optimizer step, so counts are optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
    )
