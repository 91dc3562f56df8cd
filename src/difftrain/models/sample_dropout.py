"""LoRA dropout drawn per sample, keyed by the sample's stream position.

peft's LoRA dropout is an `nn.Dropout`, which draws from the process's global generator: the
masks then depend on how samples are split into micro-batches and processes. Here each
sample's mask in each layer comes from a generator seeded by (run seed, sample position,
layer name), so a run with LoRA dropout is the same on 1 or N processes and with or without
gradient accumulation, and gradient checkpointing's recomputation sees the same mask.

The trainer says which samples a forward pass holds with `keyed_by(seed, positions)`; outside
it (or in eval mode) the layer behaves like `nn.Dropout`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from difftrain.seeds import derive_seed

_BATCH: contextvars.ContextVar[tuple[int, list[int]] | None] = contextvars.ContextVar(
    "difftrain_sample_keys", default=None
)


@contextmanager
def keyed_by(seed: int, positions: list[int]) -> Iterator[None]:
    """Within the block, per-sample dropout layers key batch row i by `positions[i]`."""
    token = _BATCH.set((seed, positions))
    try:
        yield
    finally:
        _BATCH.reset(token)


class SampleKeyedDropout(torch.nn.Module):
    def __init__(self, p: float, name: str):
        super().__init__()
        self.p, self.name = p, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = _BATCH.get()
        if not self.training or self.p == 0:
            return x
        if batch is None or x.shape[0] != len(batch[1]):
            return torch.nn.functional.dropout(x, self.p, training=True)
        seed, positions = batch
        keep = torch.empty_like(x, dtype=torch.bool)
        for row, position in enumerate(positions):
            generator = torch.Generator(device=x.device)
            generator.manual_seed(derive_seed(seed, "lora-dropout", position, self.name))
            draws = torch.rand(x.shape[1:], generator=generator, device=x.device)
            keep[row] = draws >= self.p
        return x * keep / (1 - self.p)


def key_lora_dropout(model: torch.nn.Module, adapter: str = "default") -> int:
    """Swap every LoRA layer's `nn.Dropout` for a `SampleKeyedDropout`; returns how many."""
    swapped = 0
    for name, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and adapter in dropouts:
            current = dropouts[adapter]
            if isinstance(current, torch.nn.Dropout):
                dropouts[adapter] = SampleKeyedDropout(current.p, name)
                swapped += 1
    return swapped
