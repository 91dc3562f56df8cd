"""LoRA adapters (peft) on the UNet and, optionally, the text encoder; saved in diffusers' LoRA
format so `pipe.load_lora_weights(folder)` reads them as they are.
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


def add_lora_adapters(unet, text_encoder, cfg: LoraConfig) -> None:
    """Freeze the base weights and add trainable adapters (fp32, whatever the base dtype)."""
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

    unet.requires_grad_(False)
    try:
        unet.add_adapter(adapter(cfg.target_modules))
    except ValueError as exc:  # peft: none of the target modules exist in the model
        raise UserError(
            f"lora.target_modules: {cfg.target_modules} do not name UNet modules ({exc}); "
            "use names such as to_q, to_k, to_v, to_out.0"
        ) from None
    trained = [unet]
    if cfg.train_text_encoder:
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


def save_lora_weights(folder: Path, unet, text_encoder=None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (with each adapter's rank and alpha).

    Written beside its final name and renamed in, so a kill never leaves a torn file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora.", suffix=TEMP_SUFFIX, dir=folder))
    try:
        _write_lora(staging, unet, text_encoder)
        os.replace(staging / LORA_WEIGHTS, folder / LORA_WEIGHTS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / LORA_WEIGHTS


def _write_lora(folder: Path, unet, text_encoder) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model):
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=layers(unet),
        text_encoder_lora_layers=layers(text_encoder) if text_encoder is not None else None,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=(
            text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None
        ),
        safe_serialization=True,
    )


def load_lora_weights_into(folder: Path, unet, text_encoder=None) -> None:
    """Set adapters saved by `save_lora_weights` back into peft-wrapped models (resume)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), "default")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(state, prefix="text_encoder.", text_encoder=text_encoder)
