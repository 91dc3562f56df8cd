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
    components: PipelineComponents, unet: torch.nn.Module, output_dir: Path
) -> None:
    """Write the base pipeline with the trained UNet into `output_dir`, in diffusers format.

    The other components are re-read from the base model, so they keep its files and dtype
    (the run may have cast its copies to half precision). Everything is written beside its
    final place first and renamed in (`publish_pipeline`), so a crash never leaves a
    half-written component or a `model_index.json` without its components.
    """
    from diffusers import DiffusionPipeline

    # The run's own scheduler: it carries a train.prediction_type override, if any.
    pipeline = DiffusionPipeline.from_pretrained(
        components.source,
        revision=components.revision,
        unet=unet,
        scheduler=components.inference_scheduler,
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


def inference_pipeline(components: PipelineComponents, unet: torch.nn.Module):
    """A sampling pipeline over the live training components (no copies, no disk)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet,
        scheduler=components.inference_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_validation_grid(
    components: PipelineComponents, unet: torch.nn.Module, cfg: Config, step: int
) -> Path:
    """Render `validation.prompts` from fixed seeds into `OUTPUT_DIR/samples/step-N.png`."""
    validation = cfg.validation
    pipeline = inference_pipeline(components, unet)
    compute_dtype = components.text_encoder.dtype
    device_type = unet.device.type
    autocast = (
        torch.autocast(device_type, dtype=compute_dtype)
        if compute_dtype != torch.float32
        else contextlib.nullcontext()
    )
    with eval_mode(unet, components.text_encoder), torch.no_grad(), autocast:
        images = generate(
            pipeline,
            validation.prompts,
            seed=validation.seed,
            num_inference_steps=validation.num_inference_steps,
            guidance_scale=validation.guidance_scale,
            height=cfg.data.resolution,
            width=cfg.data.resolution,
        )
    path = Path(cfg.train.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    image_grid(images, validation.prompts).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
