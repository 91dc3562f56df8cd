"""Switching models between train and eval mode for a moment (validation, sampling)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block (no dropout, so no draws from global RNGs); restored after."""
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, was_training, strict=True):
            model.train(training)
