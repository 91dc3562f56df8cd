"""Generate images from a trained pipeline, and lay them out as a captioned grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def generate(
    pipeline,
    prompts: list[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed `seed + i`, so each image is reproducible alone."""
    import torch

    images = []
    for offset, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + offset)
        result = pipeline(
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generator,
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


def load_pipeline(model_dir: str | Path, device: str | None = None):
    """Load a diffusers pipeline folder (the output of `difftrain train`) for sampling."""
    import torch
    from diffusers import DiffusionPipeline

    from difftrain.models.loading import resolve_pretrained

    pipeline = DiffusionPipeline.from_pretrained(resolve_pretrained(str(model_dir)))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_sample(args: argparse.Namespace) -> Path:
    """`difftrain sample`: one image from a pipeline folder (optionally with a LoRA); returns
    the path written."""
    pipeline = load_pipeline(args.model, args.device)
    if args.lora:
        pipeline.load_lora_weights(args.lora)
    (image,) = generate(
        pipeline,
        [args.prompt],
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    return output
