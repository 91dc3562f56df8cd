"""Find the images of a training folder and their captions.

Two layouts, as users already have them:
- Hugging Face ImageFolder: images plus `metadata.jsonl` (or `metadata.csv`) with a
  `file_name` column and a caption column (`data.caption_column`, default `text`);
- pairs: `name.png` with its caption in `name.txt`.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from difftrain.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_DRIVE = re.compile(r"^[A-Za-z]:")
VALUE_CHECKED_MODES = {"I", "F"}


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str
    source: int = 0
    """Which of `data.sources` it came from (0 with a single source): the data manifest's."""


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


def open_image(image):
    """What PIL's `Image.open` takes for an example's image: its path, or (an image inside a
    tar shard or a dataset, see data/sources.py) its bytes."""
    return image if isinstance(image, (str, Path)) else image.open()


def check_image_file(path: Path, key: str = "data.train_dir") -> None:
    """Fail now, naming the image, if it is not an image or is cut short.

    PIL's `verify` reads the file without decoding it (about 0.3 ms for a 512 px PNG): it
    catches garbage and truncated PNGs. What it cannot see (a damaged JPEG body) fails when
    the image is decoded, with the same kind of message. Images whose pixel values decide
    whether they can be used (32-bit int and float modes, rare) are decoded now too.

    `key` is the option that names the source (`data.shards`, `data.sources[1].dataset`);
    an image inside a dataset or shard (data/sources.py) names its row or tar member.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with refuse_huge_images(path), Image.open(open_image(path)) as image:
            mode = image.mode
            image.verify()
        if mode in VALUE_CHECKED_MODES:
            from difftrain.data.transforms import load_rgb

            load_rgb(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(unreadable_image(path, exc, key)) from None
    except UserError as exc:  # too many pixels, unusable pixel values: under this key
        message = str(exc)
        if message.startswith("data.train_dir:"):
            message = key + message.removeprefix("data.train_dir")
        raise UserError(message) from None


def unreadable_image(image, exc: BaseException, key: str = "data.train_dir") -> str:
    """The one-line refusal of an image that cannot be read: a file says to replace it; a
    dataset row or tar member (whose `unreadable` gives the text) names itself and its fix.
    PIL's reason is kept, without the repr of an in-memory file (`<_io.BytesIO object at
    0x7f...>`), which would change from run to run."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        reason = "not an image PIL can read"
    else:
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image data", str(exc))
    if isinstance(image, (str, Path)):
        return f"{key}: cannot read image {image} ({reason}); replace or remove the file"
    return image.unreadable(key, reason)


@contextmanager
def refuse_huge_images(path: Path) -> Iterator[None]:
    """Turn PIL's decompression-bomb guard into a one-line UserError naming `path`.

    PIL raises above 2x `Image.MAX_IMAGE_PIXELS` but only warns between 1x and 2x, and a
    warning would let a 100-megapixel image be decoded at every step: both are refused. The
    warning becomes an error only inside this block, not for the whole process (the user's
    own code and other libraries keep their filters). `catch_warnings` is not thread-safe;
    images are decoded one at a time per process (DataLoader workers are processes).
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = found.group(1) if found else "too many"
            raise UserError(
                f"data.train_dir: image {path} has {pixels} pixels, more than the limit of "
                f"{Image.MAX_IMAGE_PIXELS} (PIL's decompression-bomb guard); downscale it or "
                "remove the file"
            ) from None


def read_utf8(path: Path) -> str:
    """The text of `path`; a file in another encoding fails naming the file and line.

    Decoding with a guessed encoding would train on mojibake captions. A UTF-8 BOM (what
    Windows tools write) is accepted and dropped, so it does not end up in a column name.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 text; save it as UTF-8") from None


def _read_rows(metadata: Path) -> list[tuple[int, dict]]:
    text = read_utf8(metadata)
    if metadata.suffix == ".csv":
        return _read_csv_rows(metadata, text)
    rows = []
    # Not splitlines(): it also splits at U+2028 and friends, which JSON allows inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
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


def _read_csv_rows(metadata: Path, text: str) -> list[tuple[int, dict]]:
    """Rows with the line each ends on (a quoted caption may span lines; blank lines skip)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise UserError(
            f"{metadata} line {reader.line_num}: invalid CSV ({exc}); fix that line"
        ) from None
    return rows


def _image_path(folder: Path, value: object, where: str) -> Path:
    """The image a `file_name` names, checked by its text alone before any filesystem call.

    A metadata file must not make difftrain open (or even look at) a file outside the folder,
    so absolute paths and `..` that climbs out are refused. Backslashes count as separators:
    metadata written on Windows uses them, and `..\\x.png` must not slip through here because
    it is an ordinary name on Linux. The name is normalised lexically (`a/../x.png` is
    `x.png`) and that is what is opened: the OS would resolve `a/..` through `a` when `a` is
    a symlink. Symlinks the user put inside the folder are otherwise followed as usual.
    """
    if not isinstance(value, str):
        raise UserError(
            f"{where}: file_name must be text (a path relative to the folder), got {value!r}"
        )
    if "\0" in value:
        raise UserError(f"{where}: file_name {value!r} contains a NUL byte; remove it")
    name = value.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise UserError(
            f"{where}: file_name {value!r} is an absolute path; give the path relative to "
            f"data.train_dir ({folder})"
        )
    name = posixpath.normpath(name)
    if name == ".." or name.startswith("../"):
        raise UserError(
            f"{where}: file_name {value!r} points outside data.train_dir ({folder}); move the "
            "image into the folder and give its path relative to it"
        )
    if name == ".":
        raise UserError(f"{where}: file_name {value!r} names no file; give the image's name")
    return folder / name


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
        image_path = _image_path(folder, row["file_name"], where)
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
        examples.append(Example(image_path, read_utf8(caption_path).strip()))
    return examples
