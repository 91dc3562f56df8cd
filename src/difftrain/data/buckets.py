"""Aspect-ratio buckets (`data.buckets`): each image trains at about `data.resolution`²
pixels in the shape nearest its own, and every batch is drawn from one bucket.

Bucket sides are multiples of the model family's size step (8, or 16 where latents are
packed 2x2), with width / height within `data.bucket_max_ratio` of square. An image goes to
the bucket whose aspect ratio is nearest its own (in log scale, so 2:1 and 1:2 are equally
far from square), is scaled to just cover it and cropped (centre or random, as
`data.center_crop` says).

The stream stays a function of (seed, position): epoch e's order is made of blocks of
`batch_size x processes` images of one bucket, shuffled within each bucket and then block by
block from (seed, e). Every process takes its share of a block, so each micro-batch on every
process is one bucket, and a run resumed at position p sees what the uninterrupted one saw.
The rule for what does not fill a block: a bucket's last images that do not make a whole block
sit out that epoch (a different few each epoch, as the bucket is reshuffled); a bucket with
fewer images than one block never trains, and is listed as unused (buckets.json, a warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.data.sampler import ResumableSampler
from difftrain.errors import UserError
from difftrain.seeds import derive_seed


def bucket_sizes(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(width, height) of every bucket: about resolution² pixels, sides multiples of `step`,
    no longer side more than `max_ratio` times the shorter, ordered from tall to wide."""
    area = resolution * resolution
    sizes = set()
    for width in range(step, int(resolution * max_ratio) + step, step):
        height = max(step, round(area / width / step) * step)
        if max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
    return sorted(sizes, key=lambda size: size[0] / size[1])


@dataclass(frozen=True)
class Buckets:
    sizes: list[tuple[int, int]]
    """(width, height) of each bucket that holds at least one image."""
    of_item: list[int]
    """The bucket of each dataset item."""

    def size_of(self, index: int) -> tuple[int, int]:
        return self.sizes[self.of_item[index]]

    def members(self) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in self.sizes]
        for item, bucket in enumerate(self.of_item):
            groups[bucket].append(item)
        return groups

    def table(self, block: int) -> dict[str, object]:
        """What buckets.json holds: images per bucket, those that never fill a block."""
        groups = self.members()
        names = [f"{w}x{h}" for w, h in self.sizes]
        return {
            "buckets": {name: len(group) for name, group in zip(names, groups, strict=True)},
            "block": block,
            "images_per_epoch": sum(len(g) // block * block for g in groups),
            "unused": [name for name, g in zip(names, groups, strict=True) if len(g) < block],
        }


def assign_buckets(
    image_sizes: list[tuple[int, int]], resolution: int, step: int, max_ratio: float
) -> Buckets:
    """Each image (width, height) to its nearest bucket; only buckets in use are kept."""
    candidates = bucket_sizes(resolution, step, max_ratio)
    ratios = [math.log(w / h) for w, h in candidates]
    chosen = []
    for width, height in image_sizes:
        ratio = math.log(width / height)
        chosen.append(min(range(len(candidates)), key=lambda i: abs(ratios[i] - ratio)))
    used = sorted(set(chosen))
    renumber = {old: new for new, old in enumerate(used)}
    return Buckets([candidates[i] for i in used], [renumber[i] for i in chosen])


def bucket_examples(paths: list[Path], cfg, step: int, block: int) -> Buckets:
    """The run's buckets (header reads only); refused when no bucket fills one block."""
    from difftrain.data.transforms import oriented_size

    buckets = assign_buckets(
        [oriented_size(path) for path in paths], cfg.resolution, step, cfg.bucket_max_ratio
    )
    if buckets.table(block)["images_per_epoch"] == 0:
        raise UserError(
            f"data.buckets: no aspect-ratio bucket holds {block} images (train.batch_size x "
            "processes), so nothing would train; lower train.batch_size, raise "
            "data.bucket_max_ratio, add images, or turn data.buckets off"
        )
    return buckets


class BucketSampler(ResumableSampler):
    """Endless, seeded stream of `SampleKey`s in single-bucket blocks (see the module
    docstring): a `ResumableSampler` whose epoch is the bucket plan, not a permutation."""

    def __init__(self, buckets: Buckets, block: int, seed: int, *, start_position: int = 0,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        self.groups = buckets.members()
        self.block = block
        self.epoch_length = sum(len(g) // block * block for g in self.groups)
        super().__init__(
            self.epoch_length, seed, start_position=start_position, rank=rank,
            world_size=world_size,
        )  # fmt: skip

    def permutation(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s order: each bucket shuffled and cut into whole blocks, the blocks
        shuffled."""
        blocks = []
        for number, group in enumerate(self.groups):
            rng = torch.Generator().manual_seed(derive_seed(self.seed, "bucket", epoch, number))
            shuffled = [group[i] for i in torch.randperm(len(group), generator=rng).tolist()]
            usable = len(shuffled) // self.block * self.block
            blocks += [shuffled[i : i + self.block] for i in range(0, usable, self.block)]
        rng = torch.Generator().manual_seed(derive_seed(self.seed, "bucket-blocks", epoch))
        return [item for i in torch.randperm(len(blocks), generator=rng).tolist()
                for item in blocks[i]]  # fmt: skip
