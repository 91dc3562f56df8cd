"""`data_manifest.json`: what a run trained on, file by file, recorded when it starts.

    {"format": 1,
     "sources": [{"kind": "folder", "id": "/data/cats", "repeats": 1, "files": 8}],
     "files": [{"path": "/data/cats/0001.png", "size": 20431, "sha256": "...",
                "caption_sha256": "...", "source": 0, "signature": [...]}],
     "validation_files": [...]}

A source's `id` is what the user named (a folder, a `datasets` id or folder, a shard pattern);
a file's `path` is the image as the run read it: a file, `shard.tar:member` or `dataset[row]`.
Each image is listed once per source, however many times `repeats` puts it in the sample
stream. `validation_files` are the held-out images of `validation.loss_dir`, whose loss is in
the metrics too. `difftrain reproduce` builds the manifest of today's data again and compares
the two, so an image or caption edited under the same name is found before any step is trained.

Hashing every image costs a read of the data at each start. A resumed run, in its own
folder, reuses the recorded sha256 of each file (or tar member) whose `signature` (the file's
or shard's size, mtime, ctime, inode, device; a member's offset and size) is unchanged, as the
latent cache does; ctime cannot be set back, so an edit is seen. Dataset rows are read again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from difftrain.data.folder import Example
from difftrain.data.sources import TarMember, image_hash
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


def build_manifest(
    examples: list[Example],
    data_cfg,
    validation: list[Example] = (),
    known: dict[str, tuple[list, str]] | None = None,
) -> dict[str, object]:
    """The manifest of `examples` (the run's checked sample list, repeats included) and of the
    `validation` examples; `known` (path -> (signature, sha256)) saves re-hashing."""
    known = known or {}
    sources = source_entries(data_cfg)
    files = _entries(examples, known)
    for number, source in enumerate(sources):
        source["files"] = sum(1 for entry in files if entry["source"] == number)
    manifest = {"format": MANIFEST_FORMAT, "sources": sources, "files": files}
    if validation:
        manifest["validation_files"] = _entries(validation, known)
    return manifest


def write_manifest(
    output_dir: Path, examples: list[Example], data_cfg, validation_cfg
) -> dict[str, object]:
    """Record the run's data (and its held-out images, when it scores a validation loss)."""
    validation = []
    if validation_cfg.loss_every_steps:
        from difftrain.data.folder import scan_image_folder

        validation = scan_image_folder(
            validation_cfg.loss_dir, data_cfg.caption_column, check=False
        )
    path = Path(output_dir) / MANIFEST_NAME
    manifest = build_manifest(examples, data_cfg, validation, known=recorded_hashes(path))
    atomic_write_json(path, manifest)
    return manifest


def recorded_hashes(path: Path) -> dict[str, tuple[list, str]]:
    """path -> (signature, sha256) of the files a manifest already holds ({} without one)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = [*manifest["files"], *manifest.get("validation_files", [])]
        return {e["path"]: (e["signature"], e["sha256"]) for e in entries if e.get("signature")}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {}  # no manifest yet, or an unreadable one: every file is hashed


def manifest_differences(recorded: dict, current: dict, limit: int = 3) -> list[str]:
    """What differs between two manifests, in words (empty when the data is the same)."""

    def named(manifest: dict) -> list:  # the sources as configured, not their file counts
        return [{k: v for k, v in s.items() if k != "files"} for s in manifest.get("sources", [])]

    if named(recorded) != named(current):
        return ["the data sources differ"]
    problems = []
    for key, what in (("files", "image"), ("validation_files", "validation image")):
        old = {(f["source"], f["path"]): f for f in recorded.get(key, [])}
        new = {(f["source"], f["path"]): f for f in current.get(key, [])}
        problems += [f"{what} {path} is gone" for (n, path) in old if (n, path) not in new]
        problems += [f"{what} {path} is new" for (n, path) in new if (n, path) not in old]
        for name, entry in old.items():
            if name in new and entry["sha256"] != new[name]["sha256"]:
                problems.append(f"{what} {name[1]} has other content")
            elif name in new and entry.get("caption_sha256") != new[name].get("caption_sha256"):
                problems.append(f"the caption of {what} {name[1]} changed")
    if len(problems) > limit:
        problems = problems[:limit] + [f"{len(problems) - limit} more"]
    return problems


def _entries(examples: list[Example], known: dict) -> list[dict[str, object]]:
    entries, seen = [], set()
    for example in examples:
        image = example.image_path
        name = str(image)
        if (example.source, name) in seen:
            continue
        seen.add((example.source, name))
        entry = {"path": name, **_size_and_hash(image, known), "source": example.source}
        entry["caption_sha256"] = hashlib.sha256(example.caption.encode("utf-8")).hexdigest()
        entries.append(entry)
    return entries


def _size_and_hash(image, known: dict) -> dict[str, object]:
    """Size and sha256 of an image's bytes, taken from `known` when its file (a tar member:
    its shard, at the same offset) is unchanged since it was recorded."""
    if isinstance(image, Path):
        file, placement = image, []
    elif isinstance(image, TarMember):
        file, placement = image.shard, [image.offset, image.size]
    else:  # a dataset row: its stored bytes, read again
        data = image.open().read()
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    stat = file.stat()
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]
    signature += placement
    previous = known.get(str(image))
    # image_hash is memoised per process, shared with the latent cache's keys and with a
    # reproduction's own manifest: a file is hashed once however many of them ask.
    digest = previous[1] if previous and previous[0] == signature else image_hash(image)
    size = stat.st_size if isinstance(image, Path) else image.size
    return {"size": size, "sha256": digest, "signature": signature}
