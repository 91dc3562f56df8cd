"""Captioned images as training tensors, and the data loader that feeds them."""

from __future__ import annotations

import random
from typing import Any

import torch

from difftrain.config.schema import DataConfig
from difftrain.data.folder import Example
from difftrain.data.sampler import ResumableSampler, SampleKey
from difftrain.data.transforms import load_rgb, preprocess


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Item `SampleKey` -> {"pixel_values": CHW in [-1, 1], "input_ids": token ids,
    "position": the sample's stream position (keys the loss's random draws)}."""

    def __init__(self, examples: list[Example], tokenizer: Any, cfg: DataConfig):
        self.examples = examples
        self.tokenizer = tokenizer
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        example = self.examples[key.index]
        rng = random.Random(key.augment_seed)
        pixels = preprocess(
            load_rgb(example.image_path),
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
            "input_ids": self.tokenize(caption),
            "position": torch.tensor(key.position, dtype=torch.int64),
        }

    def tokenize(self, caption: str) -> torch.Tensor:
        return self.tokenizer(
            caption,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]


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
