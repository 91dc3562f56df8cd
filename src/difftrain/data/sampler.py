"""The order in which training sees samples: resumable from any position.

The stream is an endless sequence of epochs, each a permutation of the dataset drawn from
(seed, epoch). Position p of the stream is fully determined by (seed, p), so a run resumed at
position p sees exactly what the uninterrupted run would have seen. Every sample carries its
position, from which all its randomness is derived (augmentation here; latent sample, noise
and timestep in the loss): a sample is the same whichever process, micro-batch or resume
draws it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from difftrain.seeds import derive_seed


@dataclass(frozen=True)
class SampleKey:
    index: int
    """Which dataset item."""
    augment_seed: int
    """Seed of this sample's random crop / flip."""
    position: int = 0
    """Where the sample sits in the stream (all processes together)."""


class ResumableSampler(torch.utils.data.Sampler):
    """Endless, seeded, epoch-wise shuffled stream of `SampleKey`s.

    With several processes, process `rank` takes every `world_size`-th position, so the
    processes together consume the stream in order.
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        *,
        start_position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_items = num_items
        self.seed = seed
        self.start_position = start_position
        self.rank = rank
        self.world_size = world_size

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        position = self.start_position + self.rank
        epoch, order = -1, []
        while True:
            if position // self.num_items != epoch:
                epoch = position // self.num_items
                order = self.permutation(epoch)
            augment_seed = derive_seed(self.seed, "augment", position)
            yield SampleKey(order[position % self.num_items], augment_seed, position)
            position += self.world_size
