"""Image preprocessing with PIL and torch: resize, crop, flip, scale to [-1, 1].

Randomness comes from the `random.Random` passed in, never from global state, so the same
sample key gives the same pixels in any worker process and after a resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from difftrain.data.folder import open_image, refuse_huge_images, unreadable_image
from difftrain.errors import UserError

_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def load_rgb(path: Path) -> Image.Image:
    """Open an image fully (so a truncated file fails here, naming the file) as 8-bit RGB."""
    try:
        with refuse_huge_images(path), Image.open(open_image(path)) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image), path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(_unreadable(path, exc)) from None


def _unreadable(path, exc: BaseException) -> str:
    # A shard member or dataset row names its own source key; a file is data.train_dir's.
    return unreadable_image(path, exc, getattr(path, "key", "data.train_dir"))


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as `load_rgb` would return it (EXIF rotation applied),
    from its header alone: a cached sample needs its size and crop, not its pixels."""
    try:
        with refuse_huge_images(path), Image.open(open_image(path)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(_unreadable(path, exc)) from None
    # Orientations 5-8 turn the image by 90 degrees: its sides swap.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """`image` as 8-bit RGB with its values kept, or a UserError naming `path`.

    PIL's own `convert("RGB")` clips high-bit-depth modes to 0..255, so a 16-bit PNG would
    train as all white and a float TIFF as all black: those modes are scaled here instead.
    Transparent pixels are composited onto white: the colour hidden under them is arbitrary
    (often black), and white is the common choice for cut-out images.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image)
        if mode == "F":
            grey = _float_to_8_bit(values, path)
        elif mode == "I":
            grey = _int_to_8_bit(values, path)
        else:
            grey = _scale_16_bit(values)
        return _grey(_key_onto_white(grey, values, image.info.get("transparency")))
    try:
        if _has_alpha(image):
            return _onto_white(image)
        return image.convert("RGB")
    except ValueError:  # a mode PIL cannot convert (La has no converter)
        raise UserError(
            f"data.train_dir: image {path} has colour mode {mode}, which difftrain cannot "
            "convert to RGB; save it as 8-bit RGB"
        ) from None


def _has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or (1, L, P, RGB) a transparency key or an RGBA palette instead."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _key_onto_white(grey: np.ndarray, values: np.ndarray, key: object) -> np.ndarray:
    """A transparency key (PNG tRNS: one grey value, in the image's own range) marks fully
    transparent pixels: those whose original value is the key become white."""
    if isinstance(key, bool) or not isinstance(key, (int, float)):
        return grey
    return np.where(values == key, 255, grey)


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


def _scale_16_bit(values: np.ndarray) -> np.ndarray:
    """0..65535 to 0..255, rounded (integer maths: no float copy of a large image)."""
    return (values.astype(np.uint32) * 255 + 32767) // 65535


def _int_to_8_bit(values: np.ndarray, path: Path) -> np.ndarray:
    """Mode I carries no bit depth: values up to 255 are taken as 8-bit, up to 65535 as 16."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise UserError(
            f"data.train_dir: image {path} has 32-bit integer pixels from {low} to {high}, "
            "outside 0..65535; convert the image to 8-bit"
        )
    return values if high <= 255 else _scale_16_bit(values)


def _float_to_8_bit(values: np.ndarray, path: Path) -> np.ndarray:
    """Only 0..1 has an obvious meaning for float pixels; any other range would be a guess."""
    finite = np.isfinite(values).all()
    low, high = (float(values.min()), float(values.max())) if finite else (0.0, 0.0)
    if not finite or low < 0.0 or high > 1.0:
        found = f"from {low:g} to {high:g}" if finite else "that are NaN or infinite"
        raise UserError(
            f"data.train_dir: image {path} has float pixels {found}, not in 0..1; convert the "
            "image to 8-bit"
        )
    return np.rint(values * 255.0)


def _onto_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def preprocess(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    rng: random.Random,
) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, maybe flip; CHW float in [-1, 1]."""
    return preprocess_with_crop(
        image, resolution, center_crop=center_crop, random_flip=random_flip, rng=rng
    )[0]


@dataclass(frozen=True)
class CropBox:
    """Where a sample comes from: the crop's size, the resized image's size, the crop's
    top-left corner in it (as the pixels show it: mirrored when flipped), and the flip."""

    target: tuple[int, int]
    """(width, height) of the crop: the square resolution, or an aspect-ratio bucket."""
    resized: tuple[int, int]
    """(width, height) after scaling the image to just cover `target`."""
    top: int
    left: int
    flipped: bool


def crop_box(
    size: tuple[int, int], target: tuple[int, int], *, center_crop: bool, random_flip: bool,
    rng: random.Random,
) -> CropBox:  # fmt: skip
    """The crop and flip of an image of `size` (width, height) to `target` (width, height),
    drawing from `rng` in a fixed order (crop, then flip): a cached run, which never decodes
    the image, draws the same."""
    (width, height), (target_w, target_h) = size, target
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    if center_crop:
        left = (resized[0] - target_w) // 2
        top = (resized[1] - target_h) // 2
    else:
        left = rng.randint(0, resized[0] - target_w)
        top = rng.randint(0, resized[1] - target_h)
    flipped = random_flip and rng.random() < 0.5
    if flipped:
        left = resized[0] - left - target_w
    return CropBox(target, resized, top, left, flipped)


def mirrored(box: CropBox) -> CropBox:
    """The same crop of the flipped image."""
    left = box.resized[0] - box.left - box.target[0]
    return CropBox(box.target, box.resized, box.top, left, not box.flipped)


def apply_crop(image: Image.Image, box: CropBox) -> torch.Tensor:
    """`image` resized, cropped and flipped as `box` says; CHW float in [-1, 1]."""
    image = image.resize(box.resized, Image.Resampling.BILINEAR)
    (target_w, target_h) = box.target
    left = box.resized[0] - box.left - target_w if box.flipped else box.left
    image = image.crop((left, box.top, left + target_w, box.top + target_h))
    if box.flipped:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def preprocess_with_crop(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    rng: random.Random,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`preprocess`, and the crop's (top, left) in the resized image as the pixels show it.

    A flipped crop is reported mirrored (its left edge counted from the right), so the crop
    box SDXL conditions on describes the image it sees.
    """
    box = crop_box(
        image.size, (resolution, resolution), center_crop=center_crop, random_flip=random_flip,
        rng=rng,
    )  # fmt: skip
    return apply_crop(image, box), (box.top, box.left)
