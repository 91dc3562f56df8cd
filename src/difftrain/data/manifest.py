"""`data_manifest.json`: what a run trained on, file by file, recorded when it starts.

    {"format": 1,
     "sources": [{"kind": "folder", "id": "/data/cats", "repeats": 1, "files": 8}],
     "files": [{"path": "/data/cats/0001.png", "size": 20431, "sha256": "...", "source": 0}]}

A source's `id` is what the user named (a folder, a `datasets` id or folder, a shard pattern);
a file's `path` is the image as the run read it: a file, `shard.tar:member` or `dataset[row]`.
Each image is listed once, however many times `repeats` puts it in the sample stream.
`difftrain reproduce` builds the manifest of today's data again and compares the two, so an
image edited under the same name is found before any step is trained.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from difftrain.data.folder import Example
from difftrain.data.sources import DatasetRow, TarMember, image_hash
from difftrain.io import atomic_write_json

MANIFEST_NAME = "data_manifest.json"
MANIFEST_FORMAT = 1


def source_entries(data_cfg) -> list[dict[str, object]]:
    """One entry per source of the `data` section, in the order the run reads them."""
    entries = []
    for source in data_cfg.sources or [data_cfg]:
        if source.dataset is not None:
            kind, name = "dataset", source.dataset
        elif source.shards is not None:
            kind, name = "shards", source.shards
        else:
            kind, name = "folder", source.train_dir
        entries.append({"kind": kind, "id": str(name), "repeats": getattr(source, "repeats", 1)})
    return entries


def build_manifest(examples: list[Example], data_cfg) -> dict[str, object]:
    """The manifest of `examples` (the run's checked sample list, repeats included)."""
    sources = source_entries(data_cfg)
    files, seen = [], set()
    for example in examples:
        image = example.image_path
        name = str(image)
        if name in seen:
            continue
        seen.add(name)
        size, digest = _size_and_hash(image)
        files.append(
            {"path": name, "size": size, "sha256": digest, "source": _source_of(image, sources)}
        )
    for number, source in enumerate(sources):
        source["files"] = sum(1 for f in files if f["source"] == number)
    return {"format": MANIFEST_FORMAT, "sources": sources, "files": files}


def write_manifest(output_dir: Path, examples: list[Example], data_cfg) -> dict[str, object]:
    manifest = build_manifest(examples, data_cfg)
    atomic_write_json(Path(output_dir) / MANIFEST_NAME, manifest)
    return manifest


def manifest_differences(recorded: dict, current: dict, limit: int = 3) -> list[str]:
    """What differs between two manifests, in words (empty when the data is the same)."""

    def named(manifest: dict) -> list:  # the sources as configured, not their file counts
        return [{k: v for k, v in s.items() if k != "files"} for s in manifest.get("sources", [])]

    if named(recorded) != named(current):
        return ["the data sources differ"]
    old = {f["path"]: f["sha256"] for f in recorded.get("files", [])}
    new = {f["path"]: f["sha256"] for f in current.get("files", [])}
    problems = [f"{path} is gone" for path in old if path not in new]
    problems += [f"{path} is new" for path in new if path not in old]
    problems += [
        f"{path} has other content" for path in old if path in new and old[path] != new[path]
    ]
    if len(problems) > limit:
        problems = problems[:limit] + [f"{len(problems) - limit} more"]
    return problems


def _size_and_hash(image) -> tuple[int, str]:
    if isinstance(image, Path):
        return image.stat().st_size, image_hash(image)
    if isinstance(image, TarMember):
        return image.size, image_hash(image)
    data = image.open().read()
    return len(data), hashlib.sha256(data).hexdigest()


def _source_of(image, sources: list[dict[str, object]]) -> int:
    """The number of the source `image` came from (0 for a run with one source)."""
    if len(sources) == 1:
        return 0
    for number, source in enumerate(sources):
        if _belongs(image, source):
            return number
    raise ValueError(f"{image} matches none of the sources {sources}")  # a bug, not input


def _belongs(image, source: dict[str, object]) -> bool:
    kind, name = source["kind"], str(source["id"])
    if isinstance(image, DatasetRow):
        return kind == "dataset" and image.source == name
    if isinstance(image, TarMember):
        from braceexpand import braceexpand

        return kind == "shards" and image.shard in {Path(s).expanduser() for s in braceexpand(name)}
    folder = Path(name).expanduser().resolve()
    return kind == "folder" and image.resolve().is_relative_to(folder)
