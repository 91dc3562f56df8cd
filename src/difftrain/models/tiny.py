"""Random-weight pipelines, built locally from a fixed seed: the `builtin:` models.

Tests and the quick start train these instead of downloading a model. `tiny` and `small` are
Stable Diffusion 1.x layouts (`tiny` about the size of diffusers' own test pipelines, `small`
a 3-level UNet for benchmarks that need a step long enough to time); `tiny-sdxl`,
`tiny-sd3` and `tiny-flux` are each family's `build_tiny`. All keep SD's geometry: the VAE
downsamples by 8, so a 64 px image is an 8x8 latent, and the default image size is 64 px.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from difftrain.io import atomic_directory
from difftrain.models.tokenizer import save_clip_tokenizer, write_clip_vocab_files

BUILTIN_PREFIX = "builtin:"
# Bump when a spec changes, so cached builds of the old spec are not reused.
BUILD_VERSION = 2

BUILTINS: dict[str, str] = {
    "tiny": "sd",
    "small": "sd",
    "tiny-sdxl": "sdxl",
    "tiny-sd3": "sd3",
    "tiny-flux": "flux",
}
"""Built-in model name (after `builtin:`) -> its family."""


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    vae_channels: tuple[int, ...]
    text_hidden_size: int
    text_layers: int
    text_heads: int
    norm_groups: int


TINY_MODELS: dict[str, TinySpec] = {
    "tiny": TinySpec(
        unet_channels=(32, 64),
        unet_layers_per_block=1,
        vae_channels=(8, 8, 16, 16),
        text_hidden_size=32,
        text_layers=2,
        text_heads=4,
        norm_groups=8,
    ),
    "small": TinySpec(
        unet_channels=(128, 256, 384),
        unet_layers_per_block=2,
        vae_channels=(32, 32, 64, 64),
        text_hidden_size=128,
        text_layers=4,
        text_heads=4,
        norm_groups=32,
    ),
}


def build_tiny_pipeline(size: str = "tiny", seed: int = 0):
    """A `StableDiffusionPipeline` with random weights from `seed` (same seed, same weights)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = TINY_MODELS[size]
    depth = len(spec.unet_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        cross_attention_dim=spec.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=spec.norm_groups,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=spec.norm_groups,
        sample_size=64,
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden_size,
            intermediate_size=spec.text_hidden_size * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Stable Diffusion 1.x's own noise schedule and inference scheduler.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(
    output_dir: Path, size: str = "tiny", seed: int = 0, *, keep_existing: bool = False
) -> Path:
    """Build and write the pipeline to `output_dir` atomically (diffusers folder layout)."""
    if size in TINY_MODELS:
        pipeline = build_tiny_pipeline(size, seed)
    else:
        from difftrain.models.families import family_class

        pipeline = family_class(BUILTINS[size]).build_tiny(seed)
    with atomic_directory(output_dir, keep_existing=keep_existing) as tmp:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        # Newer transformers save only tokenizer.json; keep CLIP's own files for older readers.
        for tokenizer in sorted(tmp.glob("tokenizer*/tokenizer_config.json")):
            config = json.loads(tokenizer.read_text(encoding="utf-8"))
            if "CLIP" in config.get("tokenizer_class", ""):
                write_clip_vocab_files(tokenizer.parent)
    return output_dir


def builtin_cache_dir() -> Path:
    """Where `builtin:*` models are built once: `$DIFFTRAIN_CACHE` or ~/.cache/difftrain."""
    root = os.environ.get("DIFFTRAIN_CACHE") or Path.home() / ".cache" / "difftrain"
    return Path(root) / "models"


def builtin_model_path(name: str) -> Path:
    """Path of a `builtin:<size>` model, building it on first use."""
    size = name.removeprefix(BUILTIN_PREFIX)
    path = builtin_cache_dir() / f"{size}-v{BUILD_VERSION}"
    if not (path / "model_index.json").is_file():
        # Two processes may race to build it; both builds are identical, the first one stays.
        save_tiny_pipeline(path, size, keep_existing=True)
    return path
