"""Where training images come from: an image folder (`data.train_dir`), a Hugging Face
`datasets` dataset (`data.dataset`: a hub id or a `save_to_disk` folder), or WebDataset tar
shards (`data.shards: "data/shard-{000..099}.tar"`).

Every source gives the same list of `Example`s, so the sample stream, buckets, the cache,
checkpoints and resume work alike for each. An example's image is a `Path`, or a reference
that opens its bytes (`TarMember`, `DatasetRow`): images are never unpacked to disk. Shards
are indexed once (their tar headers only) and each image is read at its offset when drawn, so
any process or data-loader worker reads any sample: the stream stays a function of (seed,
position), and resume stays exact. (Shards must be local or mounted files: a remote stream
cannot be read out of order.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

from difftrain.data.folder import IMAGE_SUFFIXES, Example, scan_image_folder
from difftrain.errors import UserError


@dataclass(frozen=True)
class TarMember:
    """One image inside a tar shard, read at its offset."""

    key: ClassVar[str] = "data.shards"  # the config key its errors name
    shard: Path
    offset: int
    size: int
    name: str

    def open(self) -> BinaryIO:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            return io.BytesIO(handle.read(self.size))

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    def unreadable(self, key: str, reason: str) -> str:
        return (
            f"{key}: cannot read image {self.name} in shard {self.shard} ({reason}); fix or "
            "remove that member of the shard, or set data.on_bad_image: skip to leave it out"
        )


@dataclass(frozen=True)
class DatasetRow:
    """The image of row `index` of a `datasets` dataset, as its stored (encoded) bytes."""

    key: ClassVar[str] = "data.dataset"

    source: str
    index: int
    column: str

    def open(self) -> BinaryIO:
        value = _dataset(self.source, self.column)[self.index][self.column]
        if not value or (value.get("bytes") is None and not value.get("path")):
            # OSError: the image readers report it as an unreadable image, with its row.
            raise OSError(f"column {self.column!r} holds no image")
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        return open(value["path"], "rb")

    def __str__(self) -> str:
        return f"{self.source}[{self.index}]"

    def unreadable(self, key: str, reason: str) -> str:
        return (
            f"{key}: cannot read the image of row {self.index} of {self.source} ({reason}); "
            "fix or drop that row, or set data.on_bad_image: skip to leave it out"
        )


@functools.lru_cache(maxsize=65536)
def _bytes_hash(image) -> str:
    return hashlib.sha256(image.open().read()).hexdigest()


def image_hash(image) -> str:
    """sha256 of the image's bytes (a file's content, a tar member's, a dataset cell's)."""
    from difftrain.data.cache import file_hash

    return file_hash(image) if isinstance(image, Path) else _bytes_hash(image)


def scan_sources(cfg, *, check: bool = True, prefix: str = "data.") -> list[Example]:
    """The examples of whichever source `cfg` (the `data` section) names; with
    `data.sources`, those of each source, repeated as it says, in the listed order.

    Refusals name the option under `prefix`: `data.shards`, or for the second item of
    `data.sources`, `data.sources[1].shards`."""
    if getattr(cfg, "sources", None):
        examples = []
        for number, entry in enumerate(cfg.sources):
            found = scan_sources(entry, check=check, prefix=f"{prefix}sources[{number}].")
            examples += [dataclasses.replace(e, source=number) for e in found] * entry.repeats
        return examples
    if cfg.dataset is None and cfg.shards is None:
        key = f"{prefix}train_dir"
        with _renamed(prefix):  # scan_image_folder's refusals say data.train_dir
            examples = scan_image_folder(cfg.train_dir, cfg.caption_column, check=False)
    elif cfg.dataset is not None:
        key = f"{prefix}dataset"
        examples = scan_dataset(cfg.dataset, cfg.image_column, cfg.caption_column, prefix)
    else:
        key = f"{prefix}shards"
        examples = scan_shards(cfg.shards, cfg.caption_column, prefix)
    if check:  # a broken image fails now, naming it, not mid-run
        from difftrain.data.folder import check_image_file

        for example in examples:
            check_image_file(example.image_path, key)
    return examples


# A source's own options in a message (not `data.` inside a path such as /x/data.shards).
_OPTION = re.compile(r"(?<![\w./-])data\.(?=(?:train_dir|dataset|shards|\w+_column)\b)")


@contextmanager
def _renamed(prefix: str) -> Iterator[None]:
    """Re-raise a refusal that names a source's options as `data.train_dir` (code shared
    with single sources) under `prefix` instead (`data.sources[1].train_dir`)."""
    try:
        yield
    except UserError as exc:
        if prefix == "data.":
            raise
        raise UserError(_OPTION.sub(prefix, str(exc))) from None


@functools.lru_cache(maxsize=8)
def _dataset(source: str, column: str):
    """The dataset with `column` left encoded (bytes), opened once per process."""
    import datasets

    datasets.disable_progress_bars()  # difftrain's own lines only, as for the other libraries
    folder = Path(source).expanduser()
    try:
        if folder.is_dir():
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = _load_hub_dataset(datasets, source)
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise UserError(
            f"data.dataset: cannot open {source!r} ({' '.join(str(exc).split())[:200]}); "
            "point it at a folder written by save_to_disk or a hub dataset id (offline: one "
            "already in the Hugging Face cache, e.g. by hf download --repo-type dataset ID)"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"data.dataset: {source} has no 'train' split ({list(loaded)})")
        loaded = loaded["train"]
    if column in loaded.column_names and isinstance(loaded.features[column], datasets.Image):
        loaded = loaded.cast_column(column, datasets.Image(decode=False))
    return loaded


def _load_hub_dataset(datasets, repo_id: str):
    """`datasets`' own download and cache; when the Hub cannot be reached (offline, no
    network), a snapshot of the repository already in the Hugging Face cache (`hf download
    --repo-type dataset`) is read as the local folder it is."""
    try:
        return datasets.load_dataset(repo_id, split="train")
    except ConnectionError as unreachable:
        from huggingface_hub import snapshot_download

        try:
            snapshot = snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
        except Exception:  # not in the cache (or not a repo id): the Hub's error says more
            raise unreachable from None
        return datasets.load_dataset(snapshot, split="train")


def scan_dataset(
    source: str, image_column: str, caption_column: str, prefix: str = "data."
) -> list[Example]:
    import datasets

    with _renamed(prefix):  # _dataset, cached per process, says data.dataset
        table = _dataset(source, image_column)
    for key, column in ((f"{prefix}image_column", image_column),
                        (f"{prefix}caption_column", caption_column)):  # fmt: skip
        if column not in table.column_names:
            raise UserError(
                f"{key}: {column!r} is not a column of {source} (it has "
                f"{', '.join(table.column_names)}); set {key}"
            )
    if not isinstance(table.features[image_column], datasets.Image):
        raise UserError(
            f"{prefix}image_column: column {image_column!r} of {source} holds "
            f"{table.features[image_column]}, not images; name the image column"
        )
    captions = table[caption_column]
    if not captions:
        raise UserError(f"{prefix}dataset: {source} has no rows; add images with captions")
    return [
        Example(DatasetRow(source, index, image_column), str(caption or ""))
        for index, caption in enumerate(captions)
    ]


def scan_shards(pattern: str, caption_column: str, prefix: str = "data.") -> list[Example]:
    """Index tar shards (WebDataset layout: `key.jpg` + `key.txt` or `key.json`)."""
    from braceexpand import braceexpand

    shards = [Path(name).expanduser() for name in braceexpand(pattern)]
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        raise UserError(
            f"{prefix}shards: {missing[0]} does not exist ({len(missing)} of {len(shards)} "
            "shards missing); fix the pattern (e.g. data/shard-{000..009}.tar)"
        )
    examples = []
    for shard in shards:
        examples += _index_shard(shard, caption_column, prefix)
    if not examples:
        raise UserError(f"{prefix}shards: {pattern} holds no images with captions")
    return examples


def _index_shard(shard: Path, caption_column: str, prefix: str) -> list[Example]:
    images: dict[str, TarMember] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # plain tar: members are read at their offset
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                suffix = "." + extension.lower()
                if suffix in IMAGE_SUFFIXES:
                    images[key] = TarMember(shard, member.offset_data, member.size, member.name)
                elif suffix in (".txt", ".json"):
                    text = tar.extractfile(member).read().decode("utf-8")
                    where = f"{prefix}shards: {shard}:{member.name}"
                    captions[key] = _caption(text, suffix, caption_column, where, prefix)
    except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{prefix}shards: cannot read shard {shard} ({exc}); it must be an uncompressed tar "
            "of WebDataset samples"
        ) from None
    unlabelled = sorted(set(images) - set(captions))
    if unlabelled:
        raise UserError(
            f"{prefix}shards: {shard}: sample {unlabelled[0]!r} has an image but no .txt or "
            ".json caption; add one or remove the image"
        )
    return [Example(images[key], captions[key]) for key in sorted(images)]


def _caption(text: str, suffix: str, column: str, where: str, prefix: str) -> str:
    """The caption of a `.txt` or `.json` member; `where` names it (`data.shards: a.tar:x.json`)."""
    if suffix == ".txt":
        return text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{where} is not valid JSON; fix the shard") from None
    if not isinstance(value, dict) or not isinstance(value.get(column), str):
        raise UserError(
            f"{where} has no string {column!r} ({prefix}caption_column); "
            f"fix the shard or set {prefix}caption_column"
        )
    return value[column]
