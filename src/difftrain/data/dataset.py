"""Captioned images as training tensors, and the data loader that feeds them."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from difftrain.config.schema import DataConfig
from difftrain.data.folder import Example
from difftrain.data.sampler import ResumableSampler, SampleKey
from difftrain.data.transforms import load_rgb, preprocess_with_crop


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Item `SampleKey` -> {"pixel_values": CHW in [-1, 1], "tokens.<tokenizer>": token ids,
    "original_size" and "crop_top_left": (height, width) of the image as read and (top, left)
    of the crop in the resized image (SDXL conditions on both), "position": the sample's
    stream position (keys the loss's random draws)}.

    `tokenize` maps a caption to its token ids (the model family's `tokenize`, bound to the
    tokenizers): the data code never knows which model it feeds.
    """

    def __init__(
        self,
        examples: list[Example],
        tokenize: Callable[[str], dict[str, torch.Tensor]],
        cfg: DataConfig,
    ):
        self.examples = examples
        self.tokenize = tokenize
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        example = self.examples[key.index]
        rng = random.Random(key.augment_seed)
        image = load_rgb(example.image_path)
        pixels, crop_top_left = preprocess_with_crop(
            image,
            self.cfg.resolution,
            center_crop=self.cfg.center_crop,
            random_flip=self.cfg.random_flip,
            rng=rng,
        )
        caption = example.caption
        # Drawn only when on, so runs without caption dropout keep their exact stream.
        if self.cfg.caption_dropout and rng.random() < self.cfg.caption_dropout:
            caption = ""
        return {
            "pixel_values": pixels,
            **self.tokenize(caption),
            "original_size": torch.tensor((image.height, image.width), dtype=torch.int64),
            "crop_top_left": torch.tensor(crop_top_left, dtype=torch.int64),
            "position": torch.tensor(key.position, dtype=torch.int64),
        }


def build_dataloader(
    dataset: CaptionedImageDataset,
    *,
    batch_size: int,
    seed: int,
    start_position: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """An endless loader over `dataset`, starting at stream position `start_position`."""
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
