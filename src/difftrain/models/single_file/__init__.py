"""Single-file checkpoints: a diffusers pipeline folder as one `.safetensors` file in the
original key layout (CompVis / SGM for SD and SDXL, Stability AI's MMDiT for SD3, Black Forest
Labs' for Flux), the file ComfyUI and AUTOMATIC1111 load, and back (`source.py`: training from
such a file).

    tensors, written = original_checkpoint(Path("runs/x"), "sdxl")

One module per layout: `sd_unet`, `vae`, `clip` (OpenAI CLIP and OpenCLIP), `sd3`, `flux`;
`mapping` is the prefix-rule renamer they share. The layouts are those diffusers' own reader
(`diffusers/loaders/single_file_utils.py`, used by `<Pipeline>.from_single_file`) reads back,
so every tensor round-trips exactly. What each family's file holds:

- sd, sdxl: the whole checkpoint (UNet, VAE, text encoders); SD 2.x's OpenCLIP encoder (GELU
  activations) goes in OpenCLIP's layout, SD 1.x's OpenAI CLIP in transformers' own.
- sd3: the transformer and the VAE, as Stability AI ships SD3.5 (text encoders are loaded
  beside it; diffusers' reader would replace CLIP-L's text projection by an identity).
- flux: the transformer, as Black Forest Labs ships Flux.1 (keys without a prefix).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from difftrain.errors import UserError
from difftrain.models.single_file.mapping import LayoutError, with_prefix

UNET, VAE, TRANSFORMER = "model.diffusion_model.", "first_stage_model.", "model.diffusion_model."
FILE_CONTENTS: dict[str, tuple[str, ...]] = {
    "sd": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "sd3": ("transformer", "vae"),
    "flux": ("transformer",),
}
"""Family -> the pipeline components its single file holds."""
DEFAULT_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors")
IMPLEMENTATIONS = {
    "sd": "https://github.com/Stability-AI/generative-models",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "sd3": "https://github.com/Stability-AI/generative-models",
    "flux": "https://github.com/black-forest-labs/flux",
}


def original_checkpoint(folder: Path, family: str) -> tuple[dict[str, Any], list[str]]:
    """The tensors of pipeline `folder` in the family's original layout, and the components
    they come from. Raises UserError for weights it cannot read or a part with no place."""
    from difftrain.models.single_file.clip import clip_to_original, open_clip_to_original
    from difftrain.models.single_file.sd_unet import unet_to_original
    from difftrain.models.single_file.vae import vae_to_original

    def convert(name: str, state: dict, config: dict) -> dict[str, Any]:
        if name == "unet":
            return with_prefix(unet_to_original(state, config), UNET)
        if name == "vae":
            return with_prefix(vae_to_original(state, config), VAE)
        if name == "text_encoder" and family == "sd":
            if uses_open_clip(config):  # SD 2.x
                return open_clip_to_original(state, "cond_stage_model.model.")
            return clip_to_original(state, "cond_stage_model.transformer.")
        if name == "text_encoder":
            return clip_to_original(state, "conditioner.embedders.0.transformer.")
        if name == "text_encoder_2":
            return open_clip_to_original(state, "conditioner.embedders.1.model.")
        if family == "sd3":
            from difftrain.models.single_file.sd3 import sd3_to_original

            return with_prefix(sd3_to_original(state, config), TRANSFORMER)
        from difftrain.models.single_file.flux import flux_to_original

        return flux_to_original(state)

    tensors: dict[str, Any] = {}
    written = []
    for name in FILE_CONTENTS[family]:
        state, config = component_weights(folder, name)
        try:
            tensors.update(convert(name, state, config))
        except LayoutError as exc:
            raise UserError(
                f"RUN_DIR {folder}: cannot be written in the original layout ({exc}); export "
                "a pipeline of the family's standard architecture, or load the folder with "
                "diffusers"
            ) from None
        written.append(name)
    return tensors, written


def uses_open_clip(text_encoder_config: dict[str, Any]) -> bool:
    """SD 2.x's OpenCLIP ViT-H runs GELU; OpenAI's CLIP (SD 1.x) quick-GELU."""
    return text_encoder_config.get("hidden_act") == "gelu"


def component_weights(folder: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A component's tensors (its default safetensors file, or all its shards) and config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    part = folder / name
    config_path = part / "config.json"
    where = f"RUN_DIR {folder}: {name}/"
    state: dict[str, Any] = {}
    try:
        index = [
            part / f"{w}.index.json"
            for w in DEFAULT_WEIGHTS
            if (part / f"{w}.index.json").is_file()
        ]
        weights = [part / w for w in DEFAULT_WEIGHTS if (part / w).is_file()]
        if index:
            shards = shard_names(json.loads(index[0].read_text(encoding="utf-8")), index[0].name)
            weights = sorted({part / shard for shard in shards})
        if not weights or not config_path.is_file():
            raise UserError(
                f"{where} has no config.json and safetensors weights; re-save the pipeline "
                "with save_pretrained(safe_serialization=True)"
            )
        for path in weights:
            state.update(load_file(path))
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("config.json is not a JSON object")
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(
            f"{where}: cannot read it ({' '.join(str(exc).split())[:200]}); re-save or "
            "re-download the pipeline"
        ) from None
    return state, config


def shard_names(index: Any, name: str) -> list[str]:
    """The shard files a `*.safetensors.index.json` maps tensors to; ValueError unless it is
    a `weight_map` of tensor names to file names of its own folder."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise ValueError(f"{name} has no weight_map of tensor names to shard file names")
    # A shard named by the index must be a file of this folder, never a path out of it.
    if any(Path(shard).name != shard for shard in weight_map.values()):
        raise ValueError(f"{name} names a shard outside the folder")
    return list(weight_map.values())


def modelspec(folder: Path, family: str) -> dict[str, str]:
    """Stability AI's model spec fields that depend on the family (ComfyUI and A1111 show
    them): architecture, implementation and, for the noise-prediction families, the
    prediction type."""
    from difftrain.models.families import family_class

    spec = {
        "modelspec.architecture": architecture(family, folder),
        "modelspec.implementation": IMPLEMENTATIONS[family],
    }
    scheduler = json_object(folder / "scheduler" / "scheduler_config.json")
    prediction = {"epsilon": "epsilon", "v_prediction": "v"}.get(scheduler.get("prediction_type"))
    if prediction and not family_class(family).flow_matching:
        spec["modelspec.prediction_type"] = prediction
    return spec


TWIN_ENCODER_KEYS = (
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
    "conditioner.embedders.1.model.positional_embedding",
)


def twin_encoder_width(keys: Iterable[str], shape: Callable[[str], Sequence[int]]) -> int | None:
    """The width SDXL's two text encoders share in an original-layout file, if they do (None:
    they differ, or the file has not both). diffusers' reader tells them apart by width (768
    and 1280 in SDXL): of equal width, it loads the first encoder's weights into the second.
    `shape(key)` is a tensor's shape (from the tensors, or from a file's header)."""
    names = set(keys)
    if not all(key in names for key in TWIN_ENCODER_KEYS):
        return None
    first, second = (shape(key)[-1] for key in TWIN_ENCODER_KEYS)
    return first if first == second else None


def architecture(family: str, folder: Path) -> str:
    """The checkpoint's `modelspec.architecture` (Stability AI's model spec names)."""
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if family == "sd3":
        return "stable-diffusion-3"
    if family == "flux":
        config = json_object(folder / "transformer" / "config.json")
        return "flux-1-dev" if config.get("guidance_embeds") else "flux-1-schnell"
    if not uses_open_clip(json_object(folder / "text_encoder" / "config.json")):
        return "stable-diffusion-v1"
    scheduler = json_object(folder / "scheduler" / "scheduler_config.json")
    return (
        "stable-diffusion-v2-768-v"
        if scheduler.get("prediction_type") == "v_prediction"
        else "stable-diffusion-v2-512"
    )


def json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; empty when it is missing or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
