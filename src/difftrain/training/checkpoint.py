"""Checkpoints: `OUTPUT_DIR/checkpoint-N`, written atomically with a manifest.

A checkpoint is written under `.checkpoint-N.partial`, gets `manifest.json` (every file with
its size and sha256) last, and only then is renamed to `checkpoint-N`. A folder without a
manifest that matches its files is never taken for a checkpoint (resuming checks the hashes
too), so a run killed mid-write leaves at worst a `.partial` folder, removed when the run
starts again. A corrupt checkpoint is never deleted: at most renamed aside.

Every process writes its own RNG state; only the main process writes the rest, the manifest
and the rename (one process and DDP; FSDP / DeepSpeed need sharded model saving, not written
yet). Nothing is pickled (see `training.state`), and the models are saved in diffusers
formats, so a checkpoint's UNet or LoRA loads into the base pipeline on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from difftrain.errors import StorageFull
from difftrain.io import atomic_write_json, replace_path, sha256_file, storage_failure
from difftrain.training.state import FORMAT_VERSION, OPTIMIZER_FILE, STATE_FILE, save_rng_state

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
REQUIRED_FILES = ("config.yaml", STATE_FILE, OPTIMIZER_FILE)


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def write_manifest(folder: Path, step: int) -> None:
    files = {
        str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)


def verify_checkpoint(folder: Path, verify_hashes: bool = True) -> str | None:
    """Why `folder` is not a checkpoint to resume from, or None when it is one.

    Checks that the manifest lists files that are all there with their sizes (and, with
    `verify_hashes`, their sha256), and that the checkpoint's format is this difftrain's.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        version = manifest.get("format_version", 1)
        if version != FORMAT_VERSION:
            return f"format {version}, and this difftrain resumes format {FORMAT_VERSION} only"
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            return f"{MANIFEST} does not list {missing[0]}"
        for name, facts in files.items():
            # Checked by its text first: a manifest must not make us open files elsewhere.
            if not _inside(name):
                return f"{MANIFEST} names a file outside the checkpoint ({name!r})"
            path = folder / name
            if path.is_symlink():
                return f"{name} is a symbolic link"
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != facts["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {facts['bytes']}"
            if verify_hashes and sha256_file(path) != facts["sha256"]:
                return f"{name} does not match its sha256"
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    return None


def _inside(name: object) -> bool:
    """A relative name that stays in its folder (no absolute path, no `..`)."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    parts = Path(name).parts
    return not Path(name).is_absolute() and ".." not in parts and not name.startswith("/")


def is_complete(folder: Path, verify_hashes: bool = False) -> bool:
    """True when `folder` has a manifest and every file it lists, with matching size (and hash)."""
    return verify_checkpoint(folder, verify_hashes) is None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (sizes checked, not hashes), oldest first."""
    return [(step, path) for step, path in checkpoint_folders(output_dir) if is_complete(path)]


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder, complete or not, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints until at most `keep` remain; returns what went.

    Each is renamed to `.checkpoint-N.deleting` before it is deleted, so a kill mid-delete
    leaves a name that is never taken for a checkpoint (and is cleared when a run starts).
    An incomplete `checkpoint-N` is never deleted: it may be the only copy of something.
    """
    checkpoints = list_checkpoints(output_dir)
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - keep)]]
    for path in doomed:
        delete_checkpoint(path)
    return doomed


def delete_checkpoint(path: Path) -> None:
    going = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(going, ignore_errors=True)
    os.replace(path, going)
    shutil.rmtree(going)


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to `checkpoint-N.corrupt` (never deleted, never resumed)."""
    target = path.with_name(f"{path.name}.corrupt")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.corrupt-{number}")
    os.replace(path, target)
    return target


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    *,
    total_limit: int | None,
    write_main: Callable[[Path], None],
) -> Path:
    """Save the full training state as `checkpoint-<step>`.

    Every process writes its RNG state; the main process calls `write_main(folder)` for the
    models, optimizer, schedule and config, then the manifest, the rename and the pruning.
    """
    final = checkpoint_path(output_dir, step)
    partial = output_dir / f".{final.name}.partial"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        accelerator.wait_for_everyone()
        save_rng_state(partial, accelerator.process_index)
        if accelerator.is_main_process:
            write_main(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(partial, step)
            replace_path(partial, final)
            # Prune only once the new checkpoint is complete: a failed write must leave the
            # previous checkpoint in place, even with total_limit: 1.
            if total_limit is not None:
                prune_checkpoints(output_dir, keep=total_limit)
        accelerator.wait_for_everyone()
    except Exception as exc:
        reason = storage_failure(exc)
        if reason is None:
            raise
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise StorageFull(
            f"could not write checkpoint {final} ({reason}); earlier checkpoints "
            "are intact; free space or fix permissions, then resume"
        ) from None
    return final


def save_trained_models(
    folder: Path, *, family, denoiser, text_encoders: dict | None = None, lora: bool, ema=None
) -> None:
    """The trained models in diffusers formats, so a checkpoint's weights load on their own.

    Full fine-tune: `unet/` or `transformer/` (the denoiser's `from_pretrained`); LoRA:
    `pytorch_lora_weights.safetensors` (the pipeline's `load_lora_weights`); EMA: `unet_ema/`
    (`transformer_ema/`). The models are unwrapped; `text_encoders` only those that train.
    """
    from difftrain.models.lora import save_lora_weights

    name = family.denoiser
    if lora:
        save_lora_weights(folder, family, denoiser, text_encoders)
    else:
        denoiser.save_pretrained(folder / name, safe_serialization=True)
    if ema is not None:
        ema.save_pretrained(str(folder / f"{name}_ema"))


def load_trained_models(
    folder: Path, *, family, denoiser, text_encoders: dict | None = None, lora: bool, ema=None,
    device=None,
) -> None:  # fmt: skip
    """Load what `save_trained_models` wrote into the live models (safetensors only)."""
    from difftrain.models.lora import load_lora_weights_into

    name = family.denoiser
    if lora:
        load_lora_weights_into(folder, family, denoiser, text_encoders)
    else:
        loaded = type(denoiser).from_pretrained(folder, subfolder=name, use_safetensors=True)
        denoiser.load_state_dict(loaded.state_dict())
        del loaded
    if ema is not None:
        from diffusers.training_utils import EMAModel

        loaded = EMAModel.from_pretrained(str(folder / f"{name}_ema"), type(denoiser))
        ema.load_state_dict(loaded.state_dict())
        ema.to(device)
        del loaded
