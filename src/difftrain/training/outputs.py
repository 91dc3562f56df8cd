"""What a run leaves for its users: the final pipeline and validation sample grids."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from difftrain.config import Config
from difftrain.io import TEMP_SUFFIX, replace_path
from difftrain.models.loading import PipelineComponents
from difftrain.sampling import generate, image_grid
from difftrain.training.modes import eval_mode

MODEL_INDEX = "model_index.json"


def save_final_pipeline(
    components: PipelineComponents, denoiser: torch.nn.Module, output_dir: Path
) -> None:
    """Write the base pipeline with the trained denoiser into `output_dir`, in diffusers
    format, as the family's pipeline class.

    The other components are re-read from the base model, so they keep its files and dtype
    (the run may have cast its copies to half precision); a `model.vae` replacement and
    dropped components (SD3 without T5) are saved as the run used them. Everything is written
    beside its final place first and renamed in (`publish_pipeline`), so a crash never leaves
    a half-written component or a `model_index.json` without its components.
    """
    family = components.family
    replaced = {name: None for name in family.dropped_parts()}
    if components.vae_source is not None:
        from diffusers import AutoencoderKL

        replaced["vae"] = AutoencoderKL.from_pretrained(
            components.vae_source, subfolder=components.vae_subfolder
        )
    # The run's own scheduler: it carries a train.prediction_type override, if any.
    pipeline = family.pipeline_type().from_pretrained(
        components.source,
        revision=components.revision,
        scheduler=components.inference_scheduler,
        **{family.denoiser: denoiser},
        **replaced,
    )
    staging = Path(tempfile.mkdtemp(prefix=".final.", suffix=TEMP_SUFFIX, dir=output_dir))
    try:
        pipeline.save_pretrained(str(staging), safe_serialization=True)
        publish_pipeline(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
