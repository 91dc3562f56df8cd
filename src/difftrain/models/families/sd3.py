"""Stable Diffusion 3 / 3.5: two CLIP encoders and a T5 encoder condition a rectified-flow
MMDiT transformer.

The maths follows diffusers' `train_dreambooth_lora_sd3.py` and
`StableDiffusion3Pipeline.encode_prompt`: the CLIP-L and CLIP-G penultimate hidden states are
joined feature-wise, zero-padded to the T5 width and put before the T5 tokens; the pooled
vector is both CLIPs' projections joined. With `model.drop_t5` the T5 encoder is never loaded
and its tokens are zeros, exactly what the pipeline conditions on when `text_encoder_3` is None,
so a model trained that way samples the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from difftrain.errors import UserError
from difftrain.models.families.base import ModelFamily, penultimate_clip

VAE_SHIFT, VAE_SCALE = 0.0609, 1.5035
"""SD3's VAE constants (its 16-channel VAE's `shift_factor` / `scaling_factor`)."""


class StableDiffusion3(ModelFamily):
    name = "sd3"
    title = "Stable Diffusion 3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # diffusers' SD3 LoRA format covers the two CLIP encoders, not T5.
    lora_text_encoders = ("text_encoder", "text_encoder_2")
    flow_matching = True
    uses_t5 = True
    size_step = 16
    can_drop_t5 = True
    # diffusers' SD3 scripts default to logit-normal timesteps (as SD3's paper).
    default_timestep_sampling = "logit_normal"
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's default

    def dropped_parts(self) -> tuple[str, ...]:
        return ("text_encoder_3", "tokenizer_3") if self.options.drop_t5 else ()

    def encode_prompts(self, parts: dict[str, Any], batch: dict[str, Any], device) -> dict:
        clip_l, pooled_l = penultimate_clip(
            parts["text_encoder"], batch["tokens.tokenizer"].to(device), with_pooled=True
        )
        clip_g, pooled_g = penultimate_clip(
            parts["text_encoder_2"], batch["tokens.tokenizer_2"].to(device), with_pooled=True
        )
        clip = torch.cat([clip_l, clip_g], dim=-1)
        # The T5 width is the transformer's joint_attention_dim: with drop_t5 there is no T5
        # encoder to read it from. DDP / DeepSpeed wrap the model in `.module`.
        transformer = parts[self.denoiser]
        width = getattr(transformer, "module", transformer).config.joint_attention_dim
        if self.options.drop_t5:
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length(), width)
        else:
            t5 = parts["text_encoder_3"](batch["tokens.tokenizer_3"].to(device))[0]
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat([pooled_l, pooled_g], dim=-1),
        }

    def predict(self, denoiser, noisy, timesteps, conditioning: dict, batch: dict):
        # The objective's timesteps are sigma * 1000, what SD3's transformer embeds.
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def shard_units(self, denoiser) -> list:
        return list(denoiser.transformer_blocks)

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        resolution = cfg.data.resolution
        if resolution % 16:
            raise UserError(
                f"data.resolution: {resolution} is not a multiple of 16, which model family "
                "sd3 needs (the VAE downsamples by 8 and the transformer takes 2x2 patches); "
                f"use {resolution // 16 * 16 or 16} or {(resolution // 16 + 1) * 16}"
            )

    @classmethod
    def build_tiny(cls, seed: int = 0):
        # About the sizes of diffusers' SD3 pipeline tests, with SD3.5's RMS QK-norm and one
        # dual-attention (MMDiT-X) layer, so the builtin has SD3.5 Medium's module names. As
        # in the real models, the CLIPs differ in width (768 / 1280 there) and together are
        # narrower than T5 (4096), so the CLIP features are zero-padded.
        from diffusers import (
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )

        from difftrain.models.families import tiny_parts
        from difftrain.models.t5_tokenizer import build_t5_tokenizer

        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,  # as the real models: 2x2 latent patches
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=96,  # the T5 encoder's d_model
            pooled_projection_dim=80,  # the two CLIP projections joined (32 + 48)
            pos_embed_max_size=32,  # up to 512 px images
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        tokenizer = tiny_parts.clip_tokenizer()
        tokenizer_2 = tiny_parts.clip_tokenizer()
        tokenizer_3 = build_t5_tokenizer(max_length=cls.default_max_sequence_length)
        # Different seeds: CLIP-L and CLIP-G are different models.
        text_encoder = tiny_parts.clip_text_encoder(tokenizer, seed + 1, projection=True)
        text_encoder_2 = tiny_parts.clip_text_encoder(
            tokenizer_2, seed + 2, hidden_size=48, projection=True
        )
        return StableDiffusion3Pipeline(
            transformer=transformer,
            # SD3's own scheduler: a fixed shift of 3, so the training table is shifted too.
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_parts.vae(seed + 4, shift_factor=VAE_SHIFT, scaling_factor=VAE_SCALE),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=tiny_parts.t5_encoder(tokenizer_3, seed + 3, d_model=96),
            tokenizer_3=tokenizer_3,
        )


FAMILY = StableDiffusion3
