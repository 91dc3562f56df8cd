"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDPM noise (epsilon or v)."""

from __future__ import annotations

from typing import Any

from difftrain.models.families.base import ModelFamily


class StableDiffusion(ModelFamily):
    name = "sd"
    title = "Stable Diffusion"
    pipeline_class = "StableDiffusionPipeline"

    def encode_prompts(self, parts: dict[str, Any], batch: dict[str, Any], device) -> dict:
        ids = batch["tokens.tokenizer"].to(device)
        return {"prompt_embeds": parts["text_encoder"](ids, return_dict=False)[0]}

    def predict(self, denoiser, noisy, timesteps, conditioning: dict, batch: dict):
        return denoiser(noisy, timesteps, conditioning["prompt_embeds"], return_dict=False)[0]

    def sampling_settings(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def shard_units(self, denoiser) -> list:
        return unet_blocks(denoiser)

    @classmethod
    def build_tiny(cls, seed: int = 0):
        from difftrain.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline("tiny", seed)


def unet_blocks(unet) -> list:
    """A UNet's down, mid and up blocks (FSDP units)."""
    return [block for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if block]


FAMILY = StableDiffusion
