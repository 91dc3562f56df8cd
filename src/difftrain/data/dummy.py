"""A small, deterministic, varied captioned image folder for smoke tests and the quick start.

Each image is one coloured shape on a plain background; its caption says which, so a model
trained on it has something learnable to fit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from difftrain.errors import UserError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
MARKER = ".difftrain-dummy"


def make_dummy_imagefolder(
    output_dir: str | Path, num_images: int, image_size: int, seed: int = 0
) -> Path:
    """Write `num_images` PNGs and `metadata.jsonl` (ImageFolder layout) into `output_dir`."""
    from PIL import Image, ImageDraw

    output_dir = Path(output_dir)
    if num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}")
    if image_size < 8:
        raise UserError(f"--image-size must be at least 8 pixels, got {image_size}")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / MARKER).exists():
        raise UserError(
            f"--output-dir {output_dir} is not empty and was not made by make-dummy-data; "
            "choose an empty or new folder"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MARKER).write_text("made by difftrain make-dummy-data\n", encoding="utf-8")

    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for index in range(num_images):
        # Walk through all shape/colour pairs before repeating, so small sets are varied.
        shape = SHAPES[index % len(SHAPES)]
        colour = names[(index // len(SHAPES) + index) % len(names)]
        background = rng.choice([n for n in names if n != colour])
        image = Image.new("RGB", (image_size, image_size), COLOURS[background])
        draw = ImageDraw.Draw(image)
        size = rng.uniform(0.35, 0.7) * image_size
        cx = rng.uniform(size / 2, image_size - size / 2)
        cy = rng.uniform(size / 2, image_size - size / 2)
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
        else:
            bar = size / 3
            draw.rectangle((box[0], cy - bar / 2, box[2], cy + bar / 2), fill=fill)
            draw.rectangle((cx - bar / 2, box[1], cx + bar / 2, box[3]), fill=fill)
        file_name = f"{index:05d}.png"
        image.save(output_dir / file_name)
        rows.append(
            {"file_name": file_name, "text": f"a {colour} {shape} on a {background} background"}
        )
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (output_dir / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return output_dir
