"""What a run leaves for its users: the final pipeline and validation sample grids."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from difftrain.config import Config
from difftrain.io import TEMP_SUFFIX, replace_path
from difftrain.models.loading import PipelineComponents, load_base_pipeline, local_model_folder
from difftrain.sampling import generate, image_grid
from difftrain.training.modes import eval_mode

MODEL_INDEX = "model_index.json"


def save_final_pipeline(
    components: PipelineComponents, denoiser: torch.nn.Module, output_dir: Path
) -> None:
    """Write the base pipeline with the trained denoiser into `output_dir`, in diffusers
    format, as the family's pipeline class.

    The trained denoiser and the run's scheduler (it carries a train.prediction_type override)
    are serialised; the other components keep the base model's files and dtype (the run may
    have cast its copies to half precision), copied as they are (`pipeline_files`), or
    re-read and saved when they cannot be. A `model.vae` replacement and dropped components
    (SD3 without T5) are saved as the run used them. Everything is written beside its final
    place first and renamed in (`publish_pipeline`), so a crash never leaves a half-written
    component or a `model_index.json` without its components.
    """
    staging = Path(tempfile.mkdtemp(prefix=".final.", suffix=TEMP_SUFFIX, dir=output_dir))
    try:
        if not _save_changed_parts(components, denoiser, staging):
            _save_whole_pipeline(components, denoiser, staging)
        publish_pipeline(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replaced_parts(components: PipelineComponents) -> dict:
    replaced = {name: None for name in components.family.dropped_parts()}
    if components.vae_source is not None:
        from diffusers import AutoencoderKL

        replaced["vae"] = AutoencoderKL.from_pretrained(
            components.vae_source, subfolder=components.vae_subfolder
        )
    return replaced


def _save_changed_parts(components: PipelineComponents, denoiser, staging: Path) -> bool:
    """Serialise what the run changed and copy the rest; False (nothing written) when the
    base model's files cannot simply be copied."""
    import diffusers

    from difftrain.training.pipeline_files import copy_components, unchanged_component_files

    # The base model's folder (a hub id's snapshot: training loaded it, so it is cached).
    family = components.family
    root = local_model_folder(components.source, components.revision)
    if root is None:
        return False
    index = json.loads((root / MODEL_INDEX).read_text(encoding="utf-8"))
    changed = {family.denoiser, "scheduler", *family.dropped_parts()}
    if components.vae_source is not None:
        changed.add("vae")
    unchanged = [
        name
        for name, entry in index.items()
        if isinstance(entry, list) and entry[0] is not None and name not in changed
    ]
    files = unchanged_component_files(root, unchanged)
    if files is None:
        return False
    copy_components(files, staging)
    saved = {
        family.denoiser: denoiser,
        "scheduler": components.inference_scheduler,
        **_replaced_parts(components),
    }
    for name, part in saved.items():
        if part is None:
            index[name] = [None, None]
            continue
        part.save_pretrained(str(staging / name), **_weights_format(part))
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    # What DiffusionPipeline.save_pretrained writes: the class that loads it, this version,
    # the base model it came from.
    index.update(
        _class_name=family.pipeline_class,
        _diffusers_version=diffusers.__version__,
        _name_or_path=components.source,
    )
    (staging / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return True


def _weights_format(part) -> dict:
    return {"safe_serialization": True} if isinstance(part, torch.nn.Module) else {}


def _save_whole_pipeline(components: PipelineComponents, denoiser, staging: Path) -> None:
    # From the base model's files (a folder, a hub id, or a single-file checkpoint).
    pipeline = load_base_pipeline(
        components,
        scheduler=components.inference_scheduler,
        **{components.family.denoiser: denoiser},
        **_replaced_parts(components),
    )
    pipeline.save_pretrained(str(staging), safe_serialization=True)


def publish_pipeline(staging: Path, output_dir: Path) -> None:
    """Move a saved pipeline from `staging` into `output_dir` so that a folder with a
    `model_index.json` is always a complete pipeline, whenever the process dies.

    An old `model_index.json` goes first (the folder stops being a pipeline), each component
    folder is renamed in whole, and the new `model_index.json` comes last.
    """
    index = MODEL_INDEX
    (output_dir / index).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        if item.name != index:
            replace_path(item, output_dir / item.name)
    os.replace(staging / index, output_dir / index)


def save_validation_grid(
    components: PipelineComponents, parts: dict, denoiser: torch.nn.Module, cfg: Config, step: int
) -> Path:
    """Render `validation.prompts` from fixed seeds into `OUTPUT_DIR/samples/step-N.png`.

    `parts` are the run's live (unwrapped) components; the family's pipeline samples them.
    """
    validation = cfg.validation
    family = components.family
    pipeline = family.sampling_pipeline(parts, denoiser, components.inference_scheduler)
    encoders = [parts[name] for name in family.text_encoders if name in parts]
    compute_dtype = encoders[0].dtype
    device_type = denoiser.device.type
    autocast = (
        torch.autocast(device_type, dtype=compute_dtype)
        if compute_dtype != torch.float32
        else contextlib.nullcontext()
    )
    with eval_mode(denoiser, *encoders), torch.no_grad(), autocast:
        images = generate(
            pipeline,
            validation.prompts,
            seed=validation.seed,
            num_inference_steps=validation.num_inference_steps,
            guidance_scale=validation.guidance_scale,
            height=cfg.data.resolution,
            width=cfg.data.resolution,
            **family.sampling_call_settings(),
        )
    path = Path(cfg.train.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    image_grid(images, validation.prompts).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
