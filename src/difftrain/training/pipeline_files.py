"""The final pipeline's unchanged components, copied from the base model's files.

A full fine-tune changes the denoiser only; the tokenizers, text encoders and VAE are the base
model's. Loading them just to serialise them again costs start-up-sized time and a second copy
in memory, so their files are copied instead: reflinked (copy-on-write, instant) where the file
system can, else copied by the kernel. Never hard-linked: an in-place edit of the base model
would then change the trained pipeline too.

Only what a loader reads is copied (configs, tokenizer files, the default safetensors weights),
and only files inside the model's own folder: a symlink out of it could carry any file of the
machine into an output that may be pushed to the Hub. When a component is not made of such
files (pickled weights only, a variant only, a link out), `unchanged_component_files` says so
and the caller serialises the pipeline the slow way.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

# model.safetensors, diffusion_pytorch_model-00001-of-00002.safetensors, and their index:
# the files from_pretrained reads when no variant is asked for.
DEFAULT_WEIGHTS = re.compile(
    r"^(model|diffusion_pytorch_model)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$"
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx")
LOADER_FILES = (".json", ".txt", ".model", ".tiktoken")  # configs, vocabularies, spiece.model
FICLONE = 0x40049409  # linux/fs.h: share the source's blocks, copy-on-write


def unchanged_component_files(root: Path, components: list[str]) -> dict[str, list[Path]] | None:
    """The files to copy for each of `components` (folders of `root`), or None when one of
    them cannot be copied file by file."""
    chosen = {}
    inside = root.resolve()
    if inside.parent.name == "snapshots" and inside.parent.parent.name.startswith("models--"):
        inside = inside.parent.parent  # a hub snapshot links into its repository's blobs/
    for name in components:
        folder = root / name
        if not folder.is_dir():
            return None
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and _read_by_loader(p.name)]
        if not _weights_complete(folder, files):
            return None  # pickles, a variant only, or weights not here: let diffusers load them
        if not all(p.resolve().is_relative_to(inside) for p in files):
            return None
        chosen[name] = files
    return chosen


def _weights_complete(folder: Path, files: list[Path]) -> bool:
    """Whether `files` hold the component's default weights, whole, when it has any.

    A model's folder (it has a config.json; tokenizers, schedulers and image processors have
    their own config names) must hold them: a hub snapshot holds only what training loaded,
    so a component it never loaded (SD's safety checker) may be there as its config alone.
    A sharded checkpoint's index must find every shard it names."""
    names = {p.name for p in files}
    weights = [name for name in names if DEFAULT_WEIGHTS.match(name)]
    is_model = (folder / "config.json").is_file()
    has_other_weights = any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir())
    if not weights:
        return not (is_model or has_other_weights)
    for index in (name for name in weights if name.endswith(".index.json")):
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        if not shards <= names:
            return False
    return True


def _read_by_loader(name: str) -> bool:
    if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".safetensors.index.json"):
        return bool(DEFAULT_WEIGHTS.match(name))
    return name.endswith(LOADER_FILES)


def copy_components(files: dict[str, list[Path]], staging: Path) -> None:
    for name, paths in files.items():
        (staging / name).mkdir()
        for path in paths:
            clone_file(path, staging / name / path.name)


def clone_file(source: Path, target: Path) -> None:
    """A reflink where the file system shares blocks (btrfs, XFS, overlay on them), else a
    kernel-side copy (`shutil.copyfile` uses sendfile / copy_file_range)."""
    import fcntl

    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(source, target)
