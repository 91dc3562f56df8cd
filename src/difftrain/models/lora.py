"""LoRA adapters (peft) on the denoiser and, optionally, the CLIP text encoders; saved in
diffusers' LoRA format so the family pipeline's `load_lora_weights(folder)` reads them as they
are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from difftrain.config.schema import LoraConfig
from difftrain.errors import UserError
from difftrain.io import TEMP_SUFFIX

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora_adapters(denoiser, text_encoders: dict, cfg: LoraConfig) -> None:
    """Freeze the base weights and add trainable adapters (fp32, whatever the base dtype).

    `text_encoders`: the encoders that get adapters too (empty unless
    `lora.train_text_encoder`), by component name.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig as PeftLoraConfig

    def adapter(targets: list[str]) -> PeftLoraConfig:
        return PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    denoiser.requires_grad_(False)
    try:
        denoiser.add_adapter(adapter(cfg.target_modules))
    except ValueError as exc:  # peft: none of the target modules exist in the model
        raise UserError(
            f"lora.target_modules: {cfg.target_modules} do not name modules of the "
            f"{type(denoiser).__name__} ({exc}); use names such as to_q, to_k, to_v, to_out.0"
        ) from None
    trained = [denoiser]
    for text_encoder in text_encoders.values():
        text_encoder.requires_grad_(False)
        _add_text_encoder_adapter(text_encoder, adapter(TEXT_ENCODER_TARGETS))
        trained.append(text_encoder)
    # Adapters train in fp32 even when the frozen base runs in half precision.
    cast_training_params(trained, dtype=torch.float32)
    if cfg.dropout:
        from difftrain.models.sample_dropout import key_lora_dropout

        for model in trained:
            key_lora_dropout(model)


def _add_text_encoder_adapter(text_encoder, config) -> None:
    """What transformers' `add_adapter` does, with peft directly.

    transformers 5 refuses `add_adapter` below peft 0.22, a release that may not exist yet;
    peft's own `inject_adapter_in_model` does the same work with any peft we support.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": config}


def save_lora_weights(folder: Path, family, denoiser, text_encoders: dict | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (with each adapter's rank and alpha) in the
    family pipeline's LoRA format, so its `load_lora_weights` reads it.

    Written beside its final name and renamed in, so a kill never leaves a torn file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora.", suffix=TEMP_SUFFIX, dir=folder))
    try:
        _write_lora(staging, family, denoiser, text_encoders or {})
        os.replace(staging / LORA_WEIGHTS, folder / LORA_WEIGHTS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / LORA_WEIGHTS


def _write_lora(folder: Path, family, denoiser, text_encoders: dict) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model, convert: bool = True):
        state = get_peft_model_state_dict(model)
        return convert_state_dict_to_diffusers(state) if convert else state

    # The denoiser's adapters keep peft's keys (diffusers' loaders read them for every
    # family). Converting them, as diffusers' SD scripts do, renames only the attention
    # projections: a file with adapters on convolutions or feed-forwards too then mixes two
    # key formats, and the loader, which reads the format from the first key, silently drops
    # the rest. CLIP adapters are attention projections only: diffusers' format, complete.
    name = family.denoiser
    kwargs = {
        f"{name}_lora_layers": layers(denoiser, convert=False),
        f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
    }
    for part, text_encoder in text_encoders.items():
        kwargs[f"{part}_lora_layers"] = layers(text_encoder)
        kwargs[f"{part}_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    family.pipeline_type().save_lora_weights(
        save_directory=str(folder), safe_serialization=True, **kwargs
    )


def load_lora_weights_into(folder: Path, family, denoiser, text_encoders: dict | None = None):
    """Set adapters saved by `save_lora_weights` back into peft-wrapped models (resume)."""
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = family.pipeline_type().lora_state_dict(str(folder))
    state = state[0] if isinstance(state, tuple) else state  # SD's also returns network alphas
    prefix = f"{family.denoiser}."
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(own), "default")
    for part, text_encoder in (text_encoders or {}).items():
        _set_state_dict_into_text_encoder(state, prefix=f"{part}.", text_encoder=text_encoder)
