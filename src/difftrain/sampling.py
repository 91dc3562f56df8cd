"""Generate images from a trained pipeline, and lay them out as a captioned grid."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from difftrain.errors import UserError
from difftrain.models.pipeline_checks import first_line
from difftrain.quiet import diffusers_logs_silenced


def generate(
    pipeline,
    prompts: list[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float | None,
    height: int | None = None,
    width: int | None = None,
    **call_settings,
) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed `seed + i`, so each image is reproducible alone.

    `guidance_scale` None keeps the pipeline's own default (7.5 for SD, 5 for SDXL, 7 for SD3,
    3.5 for Flux, whose value is its distilled-guidance input); `call_settings` are further
    pipeline arguments (the T5 prompt length).
    """
    import torch

    images = []
    for offset, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + offset)
        result = pipeline(
            prompt,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            generator=generator,
            **({} if guidance_scale is None else {"guidance_scale": guidance_scale}),
            **call_settings,
        )
        images.append(result.images[0])
    return images


def image_grid(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """Images in rows of `columns`, each with its caption written underneath."""
    font = ImageFont.load_default()
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    caption_h = 14
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, caption) in enumerate(zip(images, captions, strict=False)):
        x, y = (index % columns) * cell_w, (index // columns) * (cell_h + caption_h)
        grid.paste(image, (x, y))
        draw.text(
            (x + 2, y + cell_h + 1), _fit(draw, caption, font, cell_w - 4), fill="black", font=font
        )
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def load_pipeline(model_dir: str | Path, device: str | None = None, *, label: str = "--model"):
    """Load a diffusers pipeline folder (the output of `difftrain train`) for sampling.

    The folder (or hub id) passes the same checks as a training source first, so a model that
    needs custom code, or a broken one, is refused before anything loads.
    """
    import torch
    from diffusers import DiffusionPipeline

    from difftrain.config.schema import ModelConfig
    from difftrain.models.loading import (
        LOAD_ERRORS,
        model_family,
        refuse_missing_weights,
        resolve_pretrained,
        safetensors_only,
    )

    name = str(model_dir)
    family = model_family(ModelConfig(pretrained=name), label=label, sampling=True)
    source = resolve_pretrained(name, label)
    # Safetensors for the whole pipeline when every weight folder has them: no pickle fallback.
    # (A component the pipeline leaves out, such as SD3's T5, has no folder to look at.)
    local = Path(source).is_absolute()
    parts = [p for p in family.weight_parts() if not local or (Path(source) / p).is_dir()]
    only_safetensors = all(safetensors_only(source, None, part) for part in parts) or None
    try:
        with diffusers_logs_silenced():
            # diffusers loads a component saved as null (SD3 without T5) only when told so.
            index = DiffusionPipeline.load_config(source)
            absent = {
                name: None for name in family.required_parts() if index.get(name) == [None, None]
            }
            pipeline = DiffusionPipeline.from_pretrained(
                source, use_safetensors=only_safetensors, **absent
            )
    except LOAD_ERRORS as exc:
        raise UserError(
            f"{label}: could not load {name}: {first_line(exc)}; re-save or re-download the model"
        ) from None
    for part in parts:
        if getattr(pipeline, part, None) is not None:
            refuse_missing_weights(getattr(pipeline, part), f"{label}: {name}", part)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
