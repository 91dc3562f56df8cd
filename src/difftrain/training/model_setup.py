"""Getting a run's models ready to train: precision, freezing, LoRA, gradient checkpointing,
EMA, and the objective with its settings. Called by `TrainingRun` (trainer.py) before the
optimizer and accelerate see the models; nothing here names a model family.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from difftrain.config import Config
from difftrain.config.schema import EmaConfig, TrainConfig
from difftrain.diffusion.flow import TIMESTEP_SAMPLING_DEFAULTS
from difftrain.training.compile import compile_denoiser
from difftrain.training.objective import LossSettings, build_objective

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_models(components, cfg: Config, device, weight_dtype: torch.dtype) -> dict:
    """Place, freeze and adapt the models; returns the text encoders that train, by name.

    Frozen weights run in the compute precision (the VAE in `model.vae_dtype` if set). A full
    fine-tune keeps the denoiser in fp32 (the master weights); LoRA freezes it too and trains
    fp32 adapters on top.
    """
    lora, denoiser = cfg.lora, components.denoiser
    text_encoders = components.text_encoders
    vae_dtype = vae_dtype_for(cfg, components, weight_dtype)
    frozen = [*text_encoders.values()] + ([denoiser] if lora.enabled else [])
    for model in [components.vae, *frozen]:
        model.requires_grad_(False)
        _to(model, device, vae_dtype if model is components.vae else weight_dtype)
        model.eval()
    if not lora.enabled:
        denoiser.to(device)  # fp32 master weights; LoRA's frozen denoiser moved above
    trained_text = {
        name: text_encoders[name]
        for name in components.family.lora_text_encoders
        if lora.enabled and lora.train_text_encoder and name in text_encoders
    }
    if lora.enabled:
        from difftrain.models.lora import add_lora_adapters

        add_lora_adapters(denoiser, trained_text, lora)
    if cfg.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for text_encoder in trained_text.values():
            text_encoder.gradient_checkpointing_enable()
    for model in [denoiser, *trained_text.values()]:
        model.train()
    compile_denoiser(denoiser, cfg.train.compile)
    return trained_text


def vae_dtype_for(cfg: Config, components, weight_dtype: torch.dtype) -> torch.dtype:
    """`model.vae_dtype`, else the compute precision; a VAE that asks for it (SDXL's own,
    which overflows in fp16) stays fp32, as in diffusers' pipelines and training scripts."""
    if cfg.model.vae_dtype is not None:
        return DTYPES[cfg.model.vae_dtype]
    if getattr(components.vae.config, "force_upcast", False):
        return torch.float32
    return weight_dtype


def freeze_for_encoding(components, cfg: Config, device, weight_dtype: torch.dtype) -> None:
    """The VAE and text encoders frozen, placed and cast exactly as a run places them (what
    a cache entry's dtype records)."""
    vae_dtype = vae_dtype_for(cfg, components, weight_dtype)
    for model in [components.vae, *components.text_encoders.values()]:
        model.requires_grad_(False)
        _to(model, device, vae_dtype if model is components.vae else weight_dtype)
        model.eval()


def release_encoders(
    components, cfg: Config, cached, trained_text: dict, device, weight_dtype: torch.dtype
) -> None:
    """With both caches on and no text encoder training, free the VAE and text encoders until
    something needs them (`EncoderResidency`); they come back from the model's files, placed
    as `prepare_models` placed them."""
    if cached is None or not (cached.latents and cached.text) or trained_text:
        return
    from difftrain.models.loading import load_components, local_model_folder
    from difftrain.training.encoder_residency import EncoderResidency

    names = ["vae", *components.text_encoders]
    # Reloaded from the files loaded now: a hub id's snapshot, never the Hub again (a
    # network error mid-run, or a new commit on the branch, whose weights the cache keys
    # would not describe).
    model_cfg = cfg.model
    local = local_model_folder(components.source, components.revision)
    if local is not None:
        model_cfg = dataclasses.replace(model_cfg, pretrained=str(local), revision=None)
    if components.single_file_config is not None:  # its hub id's snapshot, likewise
        config = local_model_folder(components.single_file_config, None)
        if config is not None:
            model_cfg = dataclasses.replace(model_cfg, single_file_config=str(config))
    if components.vae_source is not None and os.path.isabs(components.vae_source):
        model_cfg = dataclasses.replace(model_cfg, vae=components.vae_source)

    def reload() -> dict:
        loaded = load_components(model_cfg, components.family, only=tuple(names))
        freeze_for_encoding(loaded, cfg, device, weight_dtype)
        return {name: loaded.parts[name] for name in names}

    components.residency = EncoderResidency(components.parts, names, reload)
    components.residency.release()
    logging.getLogger("difftrain").info(
        "VAE and text encoders released from memory while the cache answers for them"
    )


def build_ema(cfg: EmaConfig, denoiser, device):
    """diffusers' EMAModel of the denoiser's weights, or None when EMA is off."""
    if not cfg.enabled:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(
        denoiser.parameters(),
        decay=cfg.decay,
        use_ema_warmup=cfg.warmup,
        inv_gamma=cfg.inv_gamma,
        power=cfg.power,
        model_cls=type(denoiser),
        model_config=denoiser.config,
    )
    ema.to(device)
    return ema


def run_objective(train_cfg: TrainConfig, components, device, weight_dtype, train_text: bool):
    """The family's objective over the pipeline's scheduler, with the run's loss settings.

    A `train.prediction_type` override switches the training scheduler and the one the saved
    pipeline samples with, so inference matches.
    """
    scheduler = components.noise_scheduler
    if train_cfg.prediction_type is not None:
        for sched in (scheduler, components.inference_scheduler):
            sched.register_to_config(prediction_type=train_cfg.prediction_type)
    defaults = TIMESTEP_SAMPLING_DEFAULTS
    settings = LossSettings(
        prediction_type=scheduler.config.get("prediction_type") or "epsilon",
        seed=train_cfg.seed,
        snr_gamma=train_cfg.snr_gamma,
        noise_offset=train_cfg.noise_offset,
        input_perturbation=train_cfg.input_perturbation,
        weight_dtype=weight_dtype,
        train_text_encoder=train_text,
        timestep_sampling=train_cfg.timestep_sampling
        or components.family.default_timestep_sampling,
        logit_mean=_or(train_cfg.logit_mean, defaults["logit_mean"]),
        logit_std=_or(train_cfg.logit_std, defaults["logit_std"]),
        mode_scale=_or(train_cfg.mode_scale, defaults["mode_scale"]),
        loss_weighting=train_cfg.loss_weighting or "none",
    )
    return build_objective(components.family.flow_matching, scheduler, settings, device)


def _or(value, default):
    return default if value is None else value


def _to(model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    # Cast only when needed: diffusers warns about any dtype cast of its models.
    if model.dtype == dtype:
        model.to(device)
    else:
        model.to(device, dtype=dtype)
