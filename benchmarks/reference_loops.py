"""Plain PyTorch training steps, one per model family, for `step_time.py` to time difftrain
against. Imported by step_time.py; not run on its own.

Each step is written out with diffusers / transformers / torch only (no difftrain code), the
way diffusers' own training scripts do it: encode images and captions, draw noise and
timesteps, one denoiser forward and backward, AdamW with clipping. `load(family, folder)`
returns the models and two closures: `encode(batch)` (latents and text conditioning, no
gradient) and `denoise(inputs)` (noise, timesteps, the denoiser's loss), so a loop can also
run on inputs it encoded once (the plain loop's "cache").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TOKENIZERS = {
    "sd": ("tokenizer",),
    "sdxl": ("tokenizer", "tokenizer_2"),
    "sd3": ("tokenizer", "tokenizer_2", "tokenizer_3"),
    "flux": ("tokenizer", "tokenizer_2"),
}
T5_LENGTH = {"sd3": 256, "flux": 512}


@dataclass
class Reference:
    tokenizers: dict[str, Any]
    denoiser: torch.nn.Module
    encode: Any
    """batch -> dict of tensors (batch on dim 0): latents and text conditioning."""
    denoise: Any
    """encoded inputs -> loss tensor."""

    def loss(self, batch) -> torch.Tensor:
        return self.denoise(self.encode(batch))


def _component(folder: str, name: str, index: dict):
    import importlib

    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name).from_pretrained(
        folder, subfolder=name
    )


def load(family: str, model_dir: Path) -> Reference:
    import json

    folder = str(model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    skip = ("scheduler", "safety_checker", "feature_extractor", "image_encoder")
    parts = {
        name: _component(folder, name, index)
        for name, entry in index.items()
        if isinstance(entry, list) and entry[0] is not None and name not in skip
    }
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module) and name not in ("unet", "transformer"):
            part.requires_grad_(False)
            part.eval()
    denoiser = parts.get("unet") or parts["transformer"]
    denoiser.train()
    tokenizers = {name: parts[name] for name in TOKENIZERS[family]}
    builders = {"sd": _sd_loss, "sdxl": _sdxl_loss, "sd3": _sd3_loss, "flux": _flux_loss}
    return Reference(tokenizers, denoiser, *builders[family](folder, parts))


def tokenize(family: str, tokenizers: dict, caption: str) -> dict[str, torch.Tensor]:
    ids = {}
    for i, (name, tokenizer) in enumerate(tokenizers.items()):
        t5 = family in T5_LENGTH and i == len(tokenizers) - 1
        length = T5_LENGTH[family] if t5 else tokenizer.model_max_length
        ids[name] = tokenizer(
            caption, max_length=length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids[0]  # fmt: skip
    return ids


def _latents(vae, pixels):
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample()
    shift = vae.config.shift_factor or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _sd_loss(folder, parts):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    vae, text_encoder, unet = parts["vae"], parts["text_encoder"], parts["unet"]

    def encode(batch):
        with torch.no_grad():
            embeddings = text_encoder(batch["tokenizer"], return_dict=False)[0]
        return {"latents": _latents(vae, batch["pixel_values"]), "embeddings": embeddings}

    def denoise(inputs):
        return _ddpm_loss(
            scheduler, inputs["latents"], lambda noisy, t: unet(noisy, t, inputs["embeddings"])[0]
        )

    return encode, denoise


def _ddpm_loss(scheduler, latents, predict):
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(predict(noisy, timesteps).float(), target.float())


@torch.no_grad()
def _two_clips(parts, batch, with_first: bool = False):
    """SDXL / SD3: both CLIP encoders' penultimate hidden states, joined; their outputs."""
    first = parts["text_encoder"](batch["tokenizer"], output_hidden_states=True)
    second = parts["text_encoder_2"](batch["tokenizer_2"], output_hidden_states=True)
    joined = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return (joined, second, first) if with_first else (joined, second)


def _sdxl_loss(folder, parts):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    vae, unet = parts["vae"], parts["unet"]

    def encode(batch):
        embeddings, second = _two_clips(parts, batch)
        size = batch["pixel_values"].shape[-1]
        # Square images used whole: original size = target size, crop at (0, 0).
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * embeddings.shape[0])
        return {
            "latents": _latents(vae, batch["pixel_values"]),
            "embeddings": embeddings,
            "text_embeds": second.text_embeds,
            "time_ids": time_ids.to(embeddings.dtype),
        }

    def denoise(inputs):
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return _ddpm_loss(
            scheduler, inputs["latents"],
            lambda noisy, t: unet(noisy, t, inputs["embeddings"], added_cond_kwargs=added)[0],
        )  # fmt: skip

    return encode, denoise


def _flow_inputs(scheduler, latents):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], 0.0, 1.0)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    return noisy, timesteps, noise - latents


def _sd3_loss(folder, parts):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    vae, transformer = parts["vae"], parts["transformer"]

    def encode(batch):
        clip, second, first = _two_clips(parts, batch, with_first=True)
        with torch.no_grad():
            t5 = parts["text_encoder_3"](batch["tokenizer_3"])[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "latents": _latents(vae, batch["pixel_values"]),
            "embeddings": torch.cat([clip, t5], dim=-2),
            "pooled": torch.cat([first.text_embeds, second.text_embeds], dim=-1),
        }

    def denoise(inputs):
        noisy, timesteps, target = _flow_inputs(scheduler, inputs["latents"])
        prediction = transformer(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=inputs["embeddings"],
            pooled_projections=inputs["pooled"], return_dict=False,
        )[0]  # fmt: skip
        return F.mse_loss(prediction.float(), target.float())

    return encode, denoise


def _flux_loss(folder, parts):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    vae, transformer = parts["vae"], parts["transformer"]

    def encode(batch):
        with torch.no_grad():
            pooled = parts["text_encoder"](batch["tokenizer"]).pooler_output
            embeddings = parts["text_encoder_2"](batch["tokenizer_2"])[0]
        latents = _latents(vae, batch["pixel_values"])
        return {"latents": latents, "pooled": pooled, "embeddings": embeddings}

    def denoise(inputs):
        pooled, embeddings = inputs["pooled"], inputs["embeddings"]
        noisy, timesteps, target = _flow_inputs(scheduler, inputs["latents"])
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", noisy.dtype)
        text_ids = torch.zeros(embeddings.shape[1], 3)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), 3.5)
        prediction = transformer(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=embeddings, txt_ids=text_ids,
            img_ids=image_ids, return_dict=False,
        )[0]  # fmt: skip
        # Unpack (B, h/2 * w/2, C * 4) back to (B, C, h, w).
        prediction = prediction.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return F.mse_loss(prediction.reshape(b, c, h, w).float(), target.float())

    return encode, denoise
