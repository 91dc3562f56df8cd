"""Find the images of a training folder and their captions.

Two layouts, as users already have them:
- Hugging Face ImageFolder: images plus `metadata.jsonl` (or `metadata.csv`) with a
  `file_name` column and a caption column (`data.caption_column`, default `text`);
- pairs: `name.png` with its caption in `name.txt`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from difftrain.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


def scan_image_folder(
    folder: str | Path, caption_column: str = "text", *, check: bool = True
) -> list[Example]:
    """All (image, caption) pairs of `folder`, in a stable order.

    With `check`, every image is verified now (`check_image_file`), so a broken file fails
    before training starts (`drop_unreadable` is the lenient alternative).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"data.train_dir: folder {folder} does not exist; fix the path or create sample "
            "data with `difftrain make-dummy-data --output-dir DIR`"
        )
    if (folder / "metadata.jsonl").is_file():
        examples = _from_metadata(folder, folder / "metadata.jsonl", caption_column)
    elif (folder / "metadata.csv").is_file():
        examples = _from_metadata(folder, folder / "metadata.csv", caption_column)
    else:
        examples = _from_caption_files(folder)
    if not examples:
        raise UserError(
            f"data.train_dir: no images in {folder} (looked for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}); add images with captions"
        )
    if check:
        for example in examples:
            check_image_file(example.image_path)
    return examples


def drop_unreadable(examples: list[Example]) -> tuple[list[Example], list[tuple[Path, str]]]:
    """Decode every image once; return the readable ones and (path, reason) for the others."""
    from difftrain.data.transforms import load_rgb

    kept, skipped = [], []
    for example in examples:
        try:
            load_rgb(example.image_path)
        except UserError as exc:
            skipped.append((example.image_path, str(exc)))
        else:
            kept.append(example)
    if not kept:
        raise UserError(
            f"data.train_dir: none of the {len(examples)} images could be read (the first: "
            f"{skipped[0][0]}); replace the files"
        )
    return kept, skipped


def check_image_file(path: Path) -> None:
    """Fail now, naming the file, if it is not an image or is cut short.

    PIL's `verify` reads the file without decoding it (about 0.3 ms for a 512 px PNG): it
    catches garbage and truncated PNGs. What it cannot see (a damaged JPEG body) fails when
    the image is decoded, with the same kind of message.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"data.train_dir: cannot read image {path} ({exc}); replace or remove the file"
        ) from None


def _read_rows(metadata: Path) -> list[tuple[int, dict]]:
    if metadata.suffix == ".csv":
        with open(metadata, newline="", encoding="utf-8") as handle:
            return [(i + 2, row) for i, row in enumerate(csv.DictReader(handle))]
    rows = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{metadata} line {number}: invalid JSON ({exc.msg}); fix that line"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{metadata} line {number}: expected a JSON object per line")
        rows.append((number, row))
    return rows


def _from_metadata(folder: Path, metadata: Path, caption_column: str) -> list[Example]:
    examples = []
    for number, row in _read_rows(metadata):
        where = f"{metadata} line {number}"
        if "file_name" not in row:
            raise UserError(f"{where}: no 'file_name' column; each row names its image file")
        if caption_column not in row:
            columns = ", ".join(sorted(k for k in row if k != "file_name")) or "none"
            raise UserError(
                f"{where}: no caption column {caption_column!r}; set data.caption_column to "
                f"one of: {columns}"
            )
        image_path = folder / str(row["file_name"])
        if not image_path.is_file():
            raise UserError(f"{where}: image {image_path} does not exist; fix file_name or add it")
        caption = row[caption_column]
        if not isinstance(caption, str):
            raise UserError(f"{where}: caption {caption_column!r} must be text, got {caption!r}")
        examples.append(Example(image_path, caption))
    return examples


def _from_caption_files(folder: Path) -> list[Example]:
    examples = []
    for image_path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_path = image_path.with_suffix(".txt")
        if not caption_path.is_file():
            raise UserError(
                f"data.train_dir: image {image_path} has no caption file {caption_path.name}; "
                "add one, or describe all images in a metadata.jsonl"
            )
        examples.append(Example(image_path, caption_path.read_text(encoding="utf-8").strip()))
    return examples
