"""Checkpoints: `OUTPUT_DIR/checkpoint-N`, written atomically with a manifest.

A checkpoint is written under `.checkpoint-N.partial`, gets `manifest.json` (every file with
its size and sha256) last, and only then is renamed to `checkpoint-N`. A folder without a
manifest that matches its files is never taken for a checkpoint (resuming checks the hashes
too), so a run killed mid-write leaves at worst a `.partial` folder, removed when the run
starts again.

Every process writes its own RNG state; only the main process writes the rest, the manifest
and the rename (one process and DDP; FSDP / DeepSpeed need sharded model saving, not written
yet). Nothing is pickled (see `training.state`), and the models are saved in diffusers
formats, so a checkpoint's UNet or LoRA loads into the base pipeline on its own.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from difftrain.errors import StorageFull
from difftrain.io import atomic_write_json, replace_path, sha256_file
from difftrain.training.state import FORMAT_VERSION, save_rng_state

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
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)


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
    except (OSError, RuntimeError, *_serialization_errors()) as exc:
        # A full disk shows as OSError from Python, RuntimeError from torch.save
        # ("PytorchStreamWriter failed") or SafetensorError from safetensors.
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise StorageFull(
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


def save_trained_models(folder: Path, *, unet, text_encoder=None, lora: bool, ema=None) -> None:
    """The trained models in diffusers formats, so a checkpoint's weights load on their own.

    Full fine-tune: `unet/` (`UNet2DConditionModel.from_pretrained`); LoRA:
    `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights`); EMA: `unet_ema/`.
    `unet` and `text_encoder` are the unwrapped models; `text_encoder` only when it trains.
    """
    from difftrain.models.lora import save_lora_weights

    if lora:
        save_lora_weights(folder, unet, text_encoder)
    else:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
    if ema is not None:
        ema.save_pretrained(str(folder / "unet_ema"))


def load_trained_models(
    folder: Path, *, unet, text_encoder=None, lora: bool, ema=None, device=None
) -> None:
    """Load what `save_trained_models` wrote into the live models (safetensors only)."""
    from difftrain.models.lora import load_lora_weights_into

    if lora:
        load_lora_weights_into(folder, unet, text_encoder)
    else:
        loaded = type(unet).from_pretrained(folder, subfolder="unet", use_safetensors=True)
        unet.load_state_dict(loaded.state_dict())
        del loaded
    if ema is not None:
        from diffusers.training_utils import EMAModel

        loaded = EMAModel.from_pretrained(str(folder / "unet_ema"), type(unet))
        ema.load_state_dict(loaded.state_dict())
        ema.to(device)
        del loaded
