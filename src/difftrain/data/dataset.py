"""Captioned images as training tensors, and the data loader that feeds them."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.config.schema import DataConfig
from difftrain.data.buckets import Buckets, BucketSampler
from difftrain.data.captions import transform_caption
from difftrain.data.folder import Example
from difftrain.data.sampler import ResumableSampler, SampleKey
from difftrain.data.transforms import (
    CropBox,
    apply_crop,
    crop_box,
    load_rgb,
    mirrored,
    oriented_size,
)


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Item `SampleKey` -> {"pixel_values": CHW in [-1, 1], "tokens.<tokenizer>": token ids,
    "original_size", "crop_top_left" and "target_size": (height, width) of the image as read,
    (top, left) of the crop in the resized image and (height, width) of the crop (SDXL
    conditions on all three), "position": the sample's
    stream position (keys the loss's random draws)}.

    `tokenize` maps a caption to its token ids (the model family's `tokenize`, bound to the
    tokenizers): the data code never knows which model it feeds.
    """

    def __init__(
        self,
        examples: list[Example],
        tokenize: Callable[[str], dict[str, torch.Tensor]],
        cfg: DataConfig,
        latent_keys: LatentKeys | None = None,
        buckets: Buckets | None = None,
    ):
        self.examples = examples
        self.tokenize = tokenize
        self.cfg = cfg
        self.buckets = buckets
        """With `data.buckets`: each item's aspect-ratio bucket (its crop size)."""
        self.latent_keys = latent_keys
        """With a latent cache: items carry the cache key of their latents instead of pixels
        (the image is never decoded); `pixels` makes them on a cache miss."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        example = self.examples[key.index]
        rng = random.Random(key.augment_seed)
        if self.latent_keys is None:
            image = load_rgb(example.image_path)
            size = image.size
            box = self._crop_box(size, rng, key.index)
            item = {"pixel_values": apply_crop(image, box)}
        else:
            size = oriented_size(example.image_path)
            box = self._crop_box(size, rng, key.index)
            item = {
                "latent_key": self.latent_keys.key(example.image_path, box),
                "sample_index": torch.tensor(key.index, dtype=torch.int64),
                "augment_seed": torch.tensor(key.augment_seed, dtype=torch.int64),
            }
        crop_top_left = (box.top, box.left)
        cfg = self.cfg
        caption = transform_caption(
            example.caption, rng, shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
            tag_dropout=cfg.tag_dropout,
        )  # fmt: skip
        # Drawn only when on, so runs without caption dropout keep their exact stream.
        if self.cfg.caption_dropout and rng.random() < self.cfg.caption_dropout:
            caption = ""
        return {
            **item,
            **self.tokenize(caption),
            "original_size": torch.tensor((size[1], size[0]), dtype=torch.int64),
            "crop_top_left": torch.tensor(crop_top_left, dtype=torch.int64),
            "target_size": torch.tensor(box.target[::-1], dtype=torch.int64),
            "position": torch.tensor(key.position, dtype=torch.int64),
        }

    def target(self, index: int) -> tuple[int, int]:
        """(width, height) item `index` is cropped to: its bucket, or the square resolution."""
        if self.buckets is not None:
            return self.buckets.size_of(index)
        return (self.cfg.resolution, self.cfg.resolution)

    def _crop_box(self, size: tuple[int, int], rng: random.Random, index: int) -> CropBox:
        cfg = self.cfg
        return crop_box(
            size, self.target(index), center_crop=cfg.center_crop,
            random_flip=cfg.random_flip, rng=rng,
        )  # fmt: skip

    def pixels(self, index: int, augment_seed: int) -> torch.Tensor:
        """The pixels of sample (index, augment_seed), exactly as an uncached item has them
        (the same draws from the same seed): what a latent cache miss encodes."""
        image = load_rgb(self.examples[index].image_path)
        box = self._crop_box(image.size, random.Random(augment_seed), index)
        return apply_crop(image, box)

    def centre_boxes(self, index: int) -> list[CropBox]:
        """The crops a cached run can draw for image `index`: the centre, and its mirror
        when `data.random_flip` is on (what `difftrain cache build` fills)."""
        size = oriented_size(self.examples[index].image_path)
        box = crop_box(size, self.target(index), center_crop=True, random_flip=False,
                       rng=random.Random(0))  # fmt: skip
        return [box, mirrored(box)] if self.cfg.random_flip else [box]

    def pixels_in_box(self, index: int, box: CropBox) -> torch.Tensor:
        return apply_crop(load_rgb(self.examples[index].image_path), box)


@dataclass(frozen=True)
class LatentKeys:
    """Cache keys of latents: everything a latent depends on (see `data.cache_latents`)."""

    vae_hash: str
    vae_dtype: str

    def key(self, image_path: Path, box: CropBox) -> str:
        from difftrain.data.cache import entry_key
        from difftrain.data.sources import image_hash

        return entry_key(
            "latent", image=image_hash(image_path), target=list(box.target),
            resized=list(box.resized), top=box.top, left=box.left, flipped=box.flipped,
            vae=self.vae_hash, dtype=self.vae_dtype,
        )  # fmt: skip


def build_dataloader(
    dataset: CaptionedImageDataset,
    *,
    batch_size: int,
    seed: int,
    start_position: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """An endless loader over `dataset`, starting at stream position `start_position`; with
    buckets, every batch (on every process) is one bucket."""
    if dataset.buckets is not None:
        sampler = BucketSampler(
            dataset.buckets, batch_size * world_size, seed, start_position=start_position,
            rank=rank, world_size=world_size,
        )  # fmt: skip
    else:
        sampler = ResumableSampler(
            len(dataset), seed, start_position=start_position, rank=rank, world_size=world_size
        )
    workers = dataset.cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        # Workers draw nothing from global RNGs (augmentation is keyed per sample), but seed
        # their base seed anyway so any third-party randomness is reproducible too.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
