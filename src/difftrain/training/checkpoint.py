"""Checkpoints: `OUTPUT_DIR/checkpoint-N`, written atomically with a manifest.

A checkpoint is written under `.checkpoint-N.partial`, gets `manifest.json` (every file with
its size and sha256) last, and only then is renamed to `checkpoint-N`. A folder without a
manifest that matches its files is never taken for a checkpoint (resuming checks the hashes
too), so a run killed mid-write leaves at worst a `.partial` folder, removed when the run
starts again.

The state itself is saved by `accelerator.save_state`: every process writes its own RNG state,
only the main process writes the rest, the manifest and the rename (one process and DDP;
FSDP / DeepSpeed need sharded model saving in the hooks, not written yet). The models are
saved in diffusers formats by a save hook (`register_model_hooks`), so a checkpoint's UNet or
LoRA loads into the base pipeline on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from difftrain.errors import TrainingStopped
from difftrain.io import atomic_write_json, replace_path, sha256_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def write_manifest(folder: Path, step: int) -> None:
    files = {
        str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    atomic_write_json(folder / MANIFEST, {"step": step, "files": files})


def is_complete(folder: Path, verify_hashes: bool = False) -> bool:
    """True when `folder` has a manifest and every file it lists, with matching size (and hash)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        for name, facts in manifest["files"].items():
            path = folder / name
            if path.stat().st_size != facts["bytes"]:
                return False
            if verify_hashes and sha256_file(path) != facts["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints until at most `keep` remain; returns what went.

    Incomplete `checkpoint-N` folders older than the newest complete one go too: they are
    what a kill during an earlier prune left, and can never be resumed from.
    """
    checkpoints = list_checkpoints(output_dir)
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - keep)]]
    if checkpoints:
        complete = {path for _, path in checkpoints}
        doomed += [
            path
            for path in output_dir.glob("checkpoint-*")
            if path not in complete
            and (match := CHECKPOINT_PATTERN.match(path.name))
            and int(match.group(1)) < checkpoints[-1][0]
        ]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    *,
    total_limit: int | None,
    write_extra: Callable[[Path], None],
) -> Path:
    """Save the full training state as `checkpoint-<step>`; `write_extra(folder)` adds files."""
    final = checkpoint_path(output_dir, step)
    partial = output_dir / f".{final.name}.partial"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_extra(partial)
            write_manifest(partial, step)
            replace_path(partial, final)
            # Prune only once the new checkpoint is complete: a failed write must leave the
            # previous checkpoint in place, even with total_limit: 1.
            if total_limit is not None:
                prune_checkpoints(output_dir, keep=total_limit)
        accelerator.wait_for_everyone()
    except (OSError, RuntimeError, *_serialization_errors()) as exc:
        # A full disk shows as OSError from Python, RuntimeError from torch.save
        # ("PytorchStreamWriter failed") or SafetensorError from safetensors.
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise TrainingStopped(
            f"could not write checkpoint {final} ({reason}); earlier checkpoints "
            "are intact; free space or fix permissions, then resume"
        ) from None
    return final


def _serialization_errors() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return ()
    return (SafetensorError,)


def register_model_hooks(accelerator, *, unet, text_encoder=None, lora: bool = False, ema=None):
    """Save / load the trained models in diffusers formats instead of accelerate's blobs.

    Full fine-tune: `unet/` (loads on its own with `UNet2DConditionModel.from_pretrained`).
    LoRA: `pytorch_lora_weights.safetensors` (loads with `pipe.load_lora_weights`).
    EMA: `unet_ema/`, written by diffusers' `EMAModel.save_pretrained`.
    `unet` and `text_encoder` are the unwrapped models; `text_encoder` only when it trains.
    """
    from difftrain.models.lora import load_lora_weights_into, save_lora_weights

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if lora:
                save_lora_weights(Path(output_dir), unet, text_encoder)
            else:
                unet.save_pretrained(os.path.join(output_dir, "unet"))
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        # Every model is in the formats above: accelerate need not save it again.
        weights.clear()

    def load_hook(models, input_dir):
        models.clear()  # loaded here, not by accelerate
        if lora:
            load_lora_weights_into(Path(input_dir), unet, text_encoder)
        else:
            loaded = type(unet).from_pretrained(input_dir, subfolder="unet")
            unet.load_state_dict(loaded.state_dict())
            del loaded
        if ema is not None:
            from diffusers.training_utils import EMAModel

            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), type(unet))
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
