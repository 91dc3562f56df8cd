"""Flux.1: CLIP (pooled) and T5 (sequence) conditioning, a rectified-flow transformer that
works on 2x2-packed latent patches with rotary position ids, and, in guidance-distilled
models (Flux.1-dev), the guidance value as an input rather than classifier-free guidance.

The maths follows diffusers' `train_dreambooth_lora_flux.py` and `FluxPipeline`: latents are
packed as `FluxPipeline._pack_latents` packs them, the transformer takes timesteps in [0, 1],
and its output is unpacked to the latents' (B, C, H, W) layout, where the flow target lives.
"""

from __future__ import annotations

from typing import Any

import torch

from difftrain.errors import UserError
from difftrain.models.families.base import ModelFamily

DEFAULT_GUIDANCE = 3.5
"""The guidance input when `train.guidance_scale` is unset (diffusers' Flux scripts)."""
MAX_T5_TOKENS = 512
"""The longest T5 prompt FluxPipeline takes (and Flux.1 was trained with)."""


class Flux(ModelFamily):
    name = "flux"
    title = "Flux"
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    # diffusers' Flux LoRA format has adapters for the CLIP encoder only, not for T5.
    lora_text_encoders = ("text_encoder",)
    flow_matching = True
    uses_t5 = True
    size_step = 16
    takes_guidance = True
    packed_channels = 4
    # diffusers' Flux scripts sample timesteps uniformly by default (weighting_scheme none).
    default_timestep_sampling = "uniform"
    default_max_sequence_length = MAX_T5_TOKENS

    def encode_prompts(self, parts: dict[str, Any], batch: dict[str, Any], device) -> dict:
        clip = parts["text_encoder"](batch["tokens.tokenizer"].to(device), return_dict=True)
        t5 = parts["text_encoder_2"](batch["tokens.tokenizer_2"].to(device), return_dict=True)
        return {
            "prompt_embeds": t5.last_hidden_state,
            "pooled_prompt_embeds": clip.pooler_output,
        }

    def predict(self, denoiser, noisy, timesteps, conditioning: dict, batch: dict):
        batch_size, _, height, width = noisy.shape
        config = getattr(denoiser, "module", denoiser).config  # DDP wraps the model
        guidance = None
        if config.guidance_embeds:
            value = self.options.guidance_scale
            value = DEFAULT_GUIDANCE if value is None else value
            guidance = torch.full((batch_size,), value, device=noisy.device, dtype=noisy.dtype)
        image_ids = latent_image_ids(height // 2, width // 2, noisy.device, noisy.dtype)
        prompt_embeds = conditioning["prompt_embeds"]
        # Text tokens all sit at position (0, 0, 0) of the rotary embedding, as in FluxPipeline.
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        output = denoiser(
            hidden_states=pack_latents(noisy),
            # The objective's timesteps are sigma * 1000; the transformer scales [0, 1] itself.
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def shard_units(self, denoiser) -> list:
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        resolution = cfg.data.resolution
        if resolution % 16:
            lower = resolution // 16 * 16
            nearest = f"{lower} or {lower + 16}" if lower else "16"
            raise UserError(
                f"data.resolution: {resolution} is not a multiple of 16, which model family "
                "flux needs (the VAE downsamples by 8 and the transformer packs latents in 2x2 "
                f"patches); use {nearest}"
            )

    @classmethod
    def build_tiny(cls, seed: int = 0):
        # The sizes of diffusers' own Flux pipeline tests, with guidance embeddings on so the
        # builtin exercises the guidance input of Flux.1-dev.
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        from difftrain.models.families import tiny_parts
        from difftrain.models.t5_tokenizer import build_t5_tokenizer

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * 4,  # 4 VAE latent channels, packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # the T5 encoder's d_model
            pooled_projection_dim=32,  # the CLIP encoder's hidden size
            axes_dims_rope=[4, 4, 8],  # sums to attention_head_dim
            guidance_embeds=True,
        )
        tokenizer = tiny_parts.clip_tokenizer()
        tokenizer_2 = build_t5_tokenizer(max_length=cls.default_max_sequence_length)
        # Flux.1's own scheduler: the shift depends on the image size at inference, so the
        # training table holds the unshifted sigmas (as diffusers' Flux script trains on).
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )  # fmt: skip
        # Flux.1's VAE constants (16 channels there; 4 here, as in diffusers' tests).
        vae = tiny_parts.vae(
            seed + 3, latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=tiny_parts.clip_text_encoder(tokenizer, seed + 1),
            tokenizer=tokenizer,
            text_encoder_2=tiny_parts.t5_encoder(tokenizer_2, seed + 2, d_model=32),
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 patch one token (`_pack_latents`)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`, for latents of `height` x `width` (not pixels)."""
    b, _, packed_channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, packed_channels // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, packed_channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(height * width, 3) rotary position ids of the packed grid: (0, row, column)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


FAMILY = Flux
