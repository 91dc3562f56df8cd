"""LoRA adapters in the kohya (sd-scripts) key format, the one ComfyUI, AUTOMATIC1111 and Forge
load: `lora.export_formats: [diffusers, kohya]` writes
`OUTPUT_DIR/pytorch_lora_weights_kohya.safetensors` beside the diffusers file, with kohya's
`ss_*` and `modelspec.*` metadata. SD 1.x/2.x and SDXL only (sd3 / flux are refused up front).

    metadata = kohya_metadata(cfg, family, unet, steps=..., num_images=..., prediction_type=...)
    save_kohya_lora(out, family, unet, text_encoders, metadata)

Use: copy the file into ComfyUI's `models/loras/` (A1111 / Forge: `models/Lora/`); diffusers
reads it too: `pipe.load_lora_weights(out, weight_name=KOHYA_WEIGHTS)`.

`export_formats: [kohya]` alone still writes the diffusers file: difftrain's own readers
(`difftrain sample --lora`, the model card's load code) use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from difftrain.errors import UserError
from difftrain.io import atomic_write_bytes

KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
KOHYA_FAMILIES = ("sd", "sdxl")

# Module names, chosen so that sd-scripts, ComfyUI (comfy/lora.py: model_lora_keys_unet),
# AUTOMATIC1111 (Lora/lora_convert.py) and diffusers (lora_conversion_utils.py) all load them:
# - SD 1.x/2.x: `lora_unet_` + the diffusers module path with `_` (down_blocks_0_attentions_0_...).
#   That is what sd-scripts writes (its SD UNet keeps diffusers' names); ComfyUI maps it through
#   unet_to_diffusers, A1111 through convert_diffusers_name_to_compvis. The original names
#   (input_blocks_...) would not do: StableDiffusionPipeline.lora_state_dict does not renumber
#   them (only the SDXL pipeline passes its unet_config to _maybe_map_sgm_blocks_to_diffusers),
#   so they would land in the wrong blocks.
# - SDXL: the original (sgm) names, input_blocks_4_1_..., middle_block_1_..., output_blocks_...
#   That is what sd-scripts writes for SDXL (it trains the sgm UNet); ComfyUI and A1111 match them
#   to their own module names as they are, diffusers' SDXL pipeline renumbers them from the UNet
#   config. diffusers-style SDXL names would miss in A1111 wherever its SD 1.x-shaped formula
#   differs (an upsampler next to attention).
# - Text encoders keep transformers' CLIP names: `lora_te_` (SD 1.x/2.x, one encoder),
#   `lora_te1_` / `lora_te2_` (SDXL), as sd-scripts and all three readers use.
TEXT_ENCODER_PREFIXES = {
    "sd": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}

# diffusers -> original names inside a ResnetBlock2D, and of the UNet's top-level layers.
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def check_export_formats(lora, family) -> None:
    """Refuse (before anything is written) an export list that is empty, repeats itself, or
    asks for kohya where its key format has no answer (sd3 / flux)."""
    formats = list(lora.export_formats)
    if not formats:
        raise UserError(
            "lora.export_formats: is empty; list at least one of diffusers, kohya "
            "(the diffusers file is written in any case)"
        )
    repeated = sorted({name for name in formats if formats.count(name) > 1})
    if repeated:
        raise UserError(
            f"lora.export_formats: lists {', '.join(repeated)} more than once; name each "
            "format once"
        )
    if lora.enabled and "kohya" in formats and family.name not in KOHYA_FAMILIES:
        raise UserError(
            f"lora.export_formats: kohya is written for SD 1.x/2.x and SDXL UNet LoRAs only, "
            f"not model family {family.name} ({family.title}); remove kohya (the diffusers "
            "file is written for every family)"
        )


def original_unet_names(unet) -> dict[str, str]:
    """diffusers module path (prefix) -> the original (sgm / LDM) one, for this UNet's layout.

    Counted from the blocks themselves, as the original UNet numbers them: input block 0 is
    conv_in, then one per resnet (its attention beside it, `.1`) and one per downsampler;
    output blocks one per resnet, the upsampler inside the block's last one.
    """
    names = dict(_UNET_TOP)

    def resnet(path: str, original: str) -> None:
        for part, original_part in _RESNET_PARTS.items():
            names[f"{path}.{part}"] = f"{original}.{original_part}"

    index = 1
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0")
            if attentions:
                names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if block.downsamplers:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    mid = unet.mid_block
    for j in range(len(mid.resnets)):
        resnet(f"mid_block.resnets.{j}", f"middle_block.{2 * j}")
    for j in range(len(getattr(mid, "attentions", None) or ())):
        names[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
    index = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0")
            if attentions:
                names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == len(block.resnets) - 1 and block.upsamplers:
                slot = 2 if attentions else 1
                names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return names


class KohyaNames:
    """The kohya name (`lora_unet_...`, `lora_te1_...`) of a module of a family's models."""

    def __init__(self, family, unet):
        if family.name not in KOHYA_FAMILIES:
            raise ValueError(f"no kohya key format for model family {family.name}")
        self.text_prefixes = TEXT_ENCODER_PREFIXES[family.name]
        self.original = original_unet_names(unet) if family.name == "sdxl" else None

    def __call__(self, component: str, module: str) -> str:
        if component == "unet":
            return "lora_unet_" + self.unet_path(module).replace(".", "_")
        # transformers 5's CLIPTextModel has no `text_model.` level (its WithProjection model
        # still does); kohya names, and the readers, have it for both encoders.
        if not module.startswith("text_model."):
            module = f"text_model.{module}"
        return f"{self.text_prefixes[component]}_{module.replace('.', '_')}"

    def unet_path(self, module: str) -> str:
        """The UNet module's path in the kohya file's layout, still with its dots."""
        if self.original is None:
            return module
        parts = module.split(".")
        for end in range(len(parts), 0, -1):  # the longest known prefix
            original = self.original.get(".".join(parts[:end]))
            if original is not None:
                return ".".join([original, *parts[end:]])
        raise ValueError(f"UNet module {module} has no name in the original SDXL layout")


def kohya_state_dict(family, denoiser, text_encoders: dict | None = None) -> dict:
    """The live peft adapters as kohya tensors: `<name>.lora_down.weight` (peft's lora_A),
    `.lora_up.weight` (lora_B) and `.alpha` (a 0-d tensor: kohya scales by alpha / rank)."""
    import torch
    from peft.utils import get_peft_model_state_dict

    names = KohyaNames(family, denoiser)
    tensors = {}
    models = {family.denoiser: denoiser, **(text_encoders or {})}
    for component, model in models.items():
        config = model.peft_config["default"]
        state = get_peft_model_state_dict(model)
        for key in sorted(state):
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            name = names(component, module)
            tensors[f"{name}.lora_down.weight"] = state[key]
            tensors[f"{name}.lora_up.weight"] = state[f"{module}.lora_B.weight"]
            # One alpha for all: difftrain sets no per-module rank or alpha patterns.
            tensors[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
        if len(state) != 2 * sum(key.endswith(".lora_A.weight") for key in state):
            extra = sorted(k for k in state if ".lora_A." not in k and ".lora_B." not in k)
            raise ValueError(f"{component}: adapter tensors kohya has no place for: {extra}")
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def kohya_metadata(
    cfg,
    family,
    denoiser,
    *,
    steps: int,
    num_images: int,
    prediction_type: str,
    num_processes: int = 1,
) -> dict[str, str]:
    """kohya's `ss_*` training metadata (what A1111's LoRA tab shows) and the modelspec
    basics, all strings, from the run's config. No timestamps or session ids: the same run
    writes the same file."""
    from difftrain import __version__

    lora, train, data = cfg.lora, cfg.train, cfg.data
    sdxl = family.name == "sdxl"
    # SD 2.x conditions on OpenCLIP-H (1024 wide); 1.x on CLIP-L (768).
    v2 = not sdxl and denoiser.config.cross_attention_dim == 1024
    v_pred = prediction_type == "v_prediction"
    base = cfg.model.pretrained
    if Path(base).expanduser().exists():
        base = Path(base).name  # as sd-scripts: the file's name, not the user's local path
    resolution = data.resolution
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": lora.rank,
        "ss_network_alpha": float(lora.alpha),
        "ss_network_dropout": lora.dropout,
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else ("sd_v2" if v2 else "sd_v1"),
        "ss_v2": v2,
        "ss_v_parameterization": v_pred,
        "ss_sd_model_name": base,
        "ss_resolution": (resolution, resolution),
        "ss_enable_bucket": data.buckets,
        "ss_max_train_steps": train.max_steps,
        "ss_steps": steps,
        "ss_learning_rate": train.learning_rate,
        "ss_unet_lr": train.learning_rate,
        "ss_text_encoder_lr": train.learning_rate if lora.train_text_encoder else None,
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": train.lr_warmup_steps,
        "ss_optimizer": train.optimizer,
        "ss_max_grad_norm": train.max_grad_norm,
        "ss_seed": train.seed,
        "ss_num_train_images": num_images,
        "ss_batch_size_per_device": train.batch_size,
        "ss_gradient_accumulation_steps": train.gradient_accumulation_steps,
        "ss_total_batch_size": train.batch_size * train.gradient_accumulation_steps * num_processes,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_mixed_precision": train.mixed_precision,
        "ss_min_snr_gamma": train.snr_gamma,
        "ss_noise_offset": train.noise_offset,
        "ss_caption_dropout_rate": data.caption_dropout,
        "ss_caption_tag_dropout_rate": data.tag_dropout,
        "ss_shuffle_caption": data.shuffle_tags,
        "ss_keep_tokens": data.keep_tokens,
        "ss_flip_aug": data.random_flip,
        "ss_random_crop": not data.center_crop,
        "ss_cache_latents": data.cache_latents,
        "ss_output_name": Path(train.output_dir).name,
        "ss_training_comment": f"difftrain {__version__}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _architecture(sdxl, v2, v_pred) + "/lora",
        # sd-scripts' values: its SDXL LoRAs name sgm modules, its SD ones diffusers modules.
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if sdxl
        else "diffusers",
        "modelspec.title": Path(train.output_dir).name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    # kohya writes str() of every value (None as "None"); safetensors takes strings only.
    return {key: str(value) for key, value in metadata.items()}


def _architecture(sdxl: bool, v2: bool, v_pred: bool) -> str:
    if sdxl:
        return "stable-diffusion-xl-v1-base"
    if v2:
        return "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def save_kohya_lora(
    folder: Path, family, denoiser, text_encoders: dict | None, metadata: dict[str, str]
) -> Path:
    """Write `KOHYA_WEIGHTS` into `folder` (atomically: a kill never leaves a torn file)."""
    from safetensors.torch import save

    tensors = kohya_state_dict(family, denoiser, text_encoders)
    # A1111 reads the hash from here instead of hashing the file (sd-scripts' "addnet" hash:
    # sha256 of the tensor data after the header, so the metadata does not change it).
    blob = save(tensors)
    header = int.from_bytes(blob[:8], "little")
    digest = hashlib.sha256(blob[8 + header :]).hexdigest()
    blob = save(tensors, metadata={**metadata, "sshs_model_hash": digest})
    path = Path(folder) / KOHYA_WEIGHTS
    atomic_write_bytes(path, blob)
    return path
