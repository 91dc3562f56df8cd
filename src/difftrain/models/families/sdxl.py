"""Stable Diffusion XL: two CLIP text encoders, a UNet with SDXL's micro-conditioning, DDPM
noise (epsilon or v).

The UNet reads the two encoders' penultimate hidden states side by side, plus "added
conditions": the second encoder's pooled projection and six time ids (the image's original
size, the crop's top-left corner and the target size), as diffusers'
`train_text_to_image_sdxl.py` computes them.
"""

from __future__ import annotations

from typing import Any

import torch

from difftrain.models.families.base import ModelFamily, penultimate_clip
from difftrain.models.families.sd import unet_blocks


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser = "unet"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    # diffusers' SDXL LoRA format holds adapters for both encoders.
    lora_text_encoders = ("text_encoder", "text_encoder_2")
    flow_matching = False

    def encode_prompts(self, parts: dict[str, Any], batch: dict[str, Any], device) -> dict:
        hidden = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = batch[f"tokens.{tokenizer}"].to(device)
            # Only the last encoder (CLIPTextModelWithProjection) gives the pooled embedding.
            last = encoder == self.text_encoders[-1]
            states, pooled_here = penultimate_clip(parts[encoder], ids, with_pooled=last)
            hidden.append(states)
            pooled = pooled_here if last else pooled
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def predict(self, denoiser, noisy, timesteps, conditioning: dict, batch: dict):
        prompt_embeds = conditioning["prompt_embeds"]
        added = {
            "text_embeds": conditioning["pooled_prompt_embeds"],
            "time_ids": time_ids(batch, dtype=prompt_embeds.dtype, device=noisy.device),
        }
        return denoiser(
            noisy, timesteps, prompt_embeds, added_cond_kwargs=added, return_dict=False
        )[0]

    def sampling_settings(self) -> dict[str, Any]:
        # No invisible watermark on validation images (it also needs an optional package).
        return {"add_watermarker": False}

    def shard_units(self, denoiser) -> list:
        return unet_blocks(denoiser)

    @classmethod
    def build_tiny(cls, seed: int = 0):
        from diffusers import (
            EulerDiscreteScheduler,
            StableDiffusionXLPipeline,
            UNet2DConditionModel,
        )

        from difftrain.models.families import tiny_parts

        tokenizer, tokenizer_2 = tiny_parts.clip_tokenizer(), tiny_parts.clip_tokenizer()
        text_encoder = tiny_parts.clip_text_encoder(tokenizer, seed + 2)
        text_encoder_2 = tiny_parts.clip_text_encoder(tokenizer_2, seed + 3, projection=True)
        hidden = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        pooled = text_encoder_2.config.projection_dim
        time_embed_dim = 8
        torch.manual_seed(seed)
        # The layout of diffusers' own SDXL pipeline tests, at the tiny builtin's widths.
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=pooled + 6 * time_embed_dim,
            cross_attention_dim=hidden,
            norm_num_groups=8,
        )
        # SDXL base's own noise schedule and inference scheduler.
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        return StableDiffusionXLPipeline(
            vae=tiny_parts.vae(seed + 1, scaling_factor=0.13025),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )


def time_ids(batch: dict[str, Any], *, dtype, device) -> torch.Tensor:
    """SDXL's (B, 6) time ids: original (h, w), crop (top, left), target (h, w) per sample.

    The target is the size of the pixels the batch trains on (the training resolution), as
    the pipeline's default `target_size` is the size it generates.
    """
    original = batch["original_size"].reshape(-1, 2)
    crop = batch["crop_top_left"].reshape(-1, 2)
    target = batch["target_size"].reshape(-1, 2)
    return torch.cat([original, crop, target], dim=1).to(device=device, dtype=dtype)


FAMILY = StableDiffusionXL
