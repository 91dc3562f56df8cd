"""`difftrain export`: a full fine-tune's pipeline as one original-layout checkpoint.

    difftrain export runs/my-sdxl --format single-file --output my-sdxl.safetensors

The file is what ComfyUI's checkpoint loader and AUTOMATIC1111 read (SD 1.x / 2.x, SDXL: the
whole checkpoint; SD3: transformer and VAE; Flux: the transformer, for a diffusion-model
loader), and what diffusers reads back with `<Pipeline>.from_single_file(path,
config=RUN_DIR)`. The key mapping is in `models/single_file/`. The file is written under a
temporary name beside `--output` and renamed into place, so a crash never leaves half a
checkpoint, and an existing `--output` is replaced only with `--overwrite`.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from pathlib import Path

from difftrain.errors import StorageFull, UserError

FORMATS = ("single-file",)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def run_export(run_dir: str, format: str, output: str, *, overwrite: bool = False) -> str:
    """Write the checkpoint; returns the line the command prints."""
    if format not in FORMATS:
        raise UserError(f"--format: unknown format {format!r}; use one of {', '.join(FORMATS)}")
    folder = Path(run_dir).expanduser()
    family = check_run_dir(folder, run_dir)
    target = check_output(Path(output).expanduser(), folder, overwrite=overwrite)
    from difftrain.models.single_file import original_checkpoint, twin_encoder_width

    tensors, written = original_checkpoint(folder, family)
    write_checkpoint(tensors, checkpoint_metadata(folder, family), target)
    if twin_encoder_width(tensors, lambda key: tensors[key].shape) is not None:
        print(
            "difftrain: warning: the two text encoders have the same width, so diffusers' "
            "from_single_file would load the first into the second (ComfyUI reads the file "
            "right; real SDXL models differ: 768 and 1280)",
            file=sys.stderr,
        )
    return f"wrote {target} ({family}: {', '.join(written)}; {len(tensors)} tensors)"


def check_run_dir(folder: Path, name: str) -> str:
    """The family of the pipeline in `folder`; refuses what is not a full fine-tune's output."""
    from difftrain.models.pipeline_checks import check_pipeline

    if not folder.is_dir():
        raise UserError(f"RUN_DIR {name}: no such folder; give a training run's output folder")
    if (folder / LORA_WEIGHTS).is_file() or _run_config(folder, "lora", "enabled") is True:
        raise UserError(
            f"RUN_DIR {name} is a LoRA run (adapters, no pipeline): a single file is for full "
            "fine-tunes; for ComfyUI / A1111 LoRA files train with lora.export_formats: [kohya]"
        )
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"RUN_DIR {name} is not a diffusers pipeline folder (no model_index.json); give the "
            "output folder of a finished full fine-tune"
        )
    return check_pipeline(
        str(folder.resolve()), None, name=name, label="RUN_DIR", allow_absent=True
    )


def check_output(target: Path, folder: Path, *, overwrite: bool) -> Path:
    """Refuse, before any converting, an `--output` that could not or must not be written."""
    if target.suffix != ".safetensors":
        raise UserError(
            f"--output {target}: name a .safetensors file (the format ComfyUI and A1111 read)"
        )
    if target.is_dir():
        raise UserError(f"--output {target} is a folder; name the .safetensors file to write")
    if target.exists() and not overwrite:
        raise UserError(f"--output {target} exists; pass --overwrite to replace it")
    resolved = target.resolve()
    for part in folder.resolve().iterdir():
        # Resolved both: a component may be a link to a folder elsewhere.
        if part.is_dir() and resolved.is_relative_to(part.resolve()):
            raise UserError(
                f"--output {target} is inside RUN_DIR's {part.name}/, a component of the "
                "pipeline it is made from; write it elsewhere"
            )
    check_writable_folder(target)
    return target


def check_writable_folder(target: Path) -> None:
    """`target`'s folder exists or can be made, and takes new files: a probe file (unnamed
    where the system allows) is made and removed in the nearest folder that exists."""
    existing = next(p for p in target.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(
            f"--output {target}: {existing} is a file, not a folder; name a path in a folder"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(
            f"--output {target}: cannot write in {existing} ({exc.strerror or exc}); name a "
            "path in a folder you can write to"
        ) from None


def checkpoint_metadata(folder: Path, family: str) -> dict[str, str]:
    """safetensors metadata: `format: pt` (what loaders check for) and Stability AI's model
    spec fields, which ComfyUI and A1111 show."""
    import difftrain
    from difftrain.models.single_file import modelspec

    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        **modelspec(folder, family),
        "modelspec.title": folder.resolve().name,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.description": f"exported by difftrain {difftrain.__version__}",
    }
    resolution = _run_config(folder, "data", "resolution")
    if isinstance(resolution, int):
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    return metadata


def write_checkpoint(tensors: dict, metadata: dict[str, str], target: Path) -> None:
    from safetensors.torch import save_file

    from difftrain.io import TEMP_SUFFIX, storage_failure

    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = storage_failure(exc)
        if reason is not None:
            raise StorageFull(f"--output {target}: could not write it ({reason})") from None
        raise


def _run_config(folder: Path, section: str, key: str):
    """`section.key` of the config.yaml of the run that wrote `folder`; None without one."""
    import yaml

    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        return config[section][key]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
