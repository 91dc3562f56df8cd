"""Image preprocessing with PIL and torch: resize, crop, flip, scale to [-1, 1].

Randomness comes from the `random.Random` passed in, never from global state, so the same
sample key gives the same pixels in any worker process and after a resume.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from difftrain.errors import UserError


def load_rgb(path: Path) -> Image.Image:
    """Open an image fully (so a truncated file fails here, naming the file) as RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"data.train_dir: cannot read image {path} ({exc}); replace or remove the file"
        ) from None


def preprocess(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    rng: random.Random,
) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, maybe flip; CHW float in [-1, 1]."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left = (size[0] - resolution) // 2
        top = (size[1] - resolution) // 2
    else:
        left = rng.randint(0, size[0] - resolution)
        top = rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
