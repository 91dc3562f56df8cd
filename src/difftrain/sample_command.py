"""`difftrain sample`: check every option, load the pipeline, write one image atomically.

difftrain sample --model runs/shapes --prompt "a red circle" --output red.png [--lora DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from PIL import Image

from difftrain.errors import UserError
from difftrain.models.pipeline_checks import first_line
from difftrain.sampling import diffusers_logs_silenced, generate, load_pipeline


def run_sample(args: argparse.Namespace) -> Path:
    """`difftrain sample`: one image from a pipeline folder (optionally with a LoRA); returns
    the path written.

    Every option is checked before the model loads (seconds to minutes for a real one), and
    the image is written atomically, so a refused or failed run leaves nothing behind.
    """
    check_sampling_options(args)
    output, image_format = check_output_path(args.output)
    lora = check_lora_path(args.lora) if args.lora else None
    pipeline = load_pipeline(args.model, args.device)
    if lora is not None:
        apply_lora(pipeline, lora, args.lora)
    (image,) = generate(
        pipeline,
        [args.prompt],
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
    )
    save_image_atomically(image, output, image_format, args.output)
    return output


def check_sampling_options(args: argparse.Namespace) -> None:
    """The numeric options and the device, which need no model to judge."""
    for option, value in (("--height", args.height), ("--width", args.width)):
        # The VAE works on 8x8 pixel blocks: other sizes fail deep inside the UNet.
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"{option}: must be a positive multiple of 8, got {value}")
    if args.steps < 1:
        raise UserError(f"--steps: must be at least 1, got {args.steps}")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise UserError(f"--guidance-scale: must be a finite number, got {args.guidance_scale}")
    if args.device is not None:
        check_device(args.device)


def check_device(name: str) -> None:
    """Refuse a device torch does not know, or one this machine does not have."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: unknown device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UserError(f"--device {name}: no {device.type} device on this machine; use cpu")
    count = getattr(getattr(torch, device.type, None), "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise UserError(
            f"--device {name}: this machine has {count()} {device.type} device(s), "
            f"numbered from 0; use {device.type}:0 .. {device.type}:{count() - 1}"
        )


def check_output_path(name: str) -> tuple[Path, str]:
    """The image file to write and its PIL format; refuses a path that cannot be written."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserError(
            f"--output {name} is a folder; give an image file name such as {path / 'sample.png'}"
        )
    Image.init()  # loads every format plugin, so registered_extensions() is complete
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise UserError(
            f"--output {name}: {path.suffix or 'no extension'} is not an image format PIL "
            "can write; use .png, .jpg or .webp"
        )
    # The nearest folder that exists: missing ones below it are made when the image is saved.
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--output {name}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {name}: cannot write into {existing}; choose another path")
    return path, image_format


def check_lora_path(name: str) -> Path:
    """The LoRA safetensors file `--lora` names (a folder with it, or the file itself).

    Read up to its header only: a missing, truncated or foreign file is refused before the
    model is loaded.
    """
    from safetensors import SafetensorError, safe_open

    from difftrain.models.lora import LORA_WEIGHTS

    path = Path(name).expanduser()
    if path.is_dir():
        path = path / LORA_WEIGHTS
        if not path.is_file():
            raise UserError(
                f"--lora {name}: no {LORA_WEIGHTS} in this folder; point --lora at a LoRA "
                "run's output folder or at the weights file"
            )
    elif not path.is_file():
        raise UserError(f"--lora {name}: no such file or folder")
    elif path.suffix != ".safetensors":
        raise UserError(
            f"--lora {name}: not a .safetensors file; difftrain reads LoRA weights from "
            "safetensors only (pickles can run code)"
        )
    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"--lora {name}: {path.name} is damaged or not a safetensors file ({first_line(exc)})"
        ) from None
    if not any("lora" in key for key in keys):
        raise UserError(
            f"--lora {name}: {path.name} holds no LoRA weights (no tensor name contains "
            "'lora'); point --lora at LoRA weights, e.g. from a run with lora.enabled"
        )
    return path


def apply_lora(pipeline, path: Path, name: str) -> None:
    """Load LoRA weights into `pipeline`; refuses weights made for another model."""
    from difftrain.models.loading import LOAD_ERRORS

    try:
        with diffusers_logs_silenced():
            pipeline.load_lora_weights(str(path), use_safetensors=True)
    except LOAD_ERRORS as exc:
        raise UserError(
            f"--lora {name}: these are not LoRA weights for this model ({first_line(exc)})"
        ) from None
    # diffusers skips LoRA keys that name no component it knows, silently.
    if not any(pipeline.get_list_adapters().values()):
        raise UserError(
            f"--lora {name}: none of its weights is for this model's unet or text encoder; "
            "use LoRA weights trained on this model"
        )


def save_image_atomically(image: Image.Image, path: Path, image_format: str, name: str) -> None:
    """Write `image` to a temporary file beside `path`, then rename it in: never a half file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"--output {name}: cannot write there ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format=image_format)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an image is meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"--output {name}: could not write the image ({exc})") from None
        raise
