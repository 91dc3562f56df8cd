"""Load the pipeline components that training needs, from a hub id, a folder or a builtin.

`model.pretrained` is resolved once (`resolve_pretrained`) and everything loads from that
source with diffusers / transformers `from_pretrained`, so offline mode, the Hugging Face cache
and revisions behave exactly as they do in diffusers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftrain.config.schema import ModelConfig
from difftrain.errors import UserError
from difftrain.models.tiny import BUILTIN_PREFIX, TINY_MODELS, builtin_model_path


@dataclass
class PipelineComponents:
    """The parts of a Stable-Diffusion-layout pipeline that training touches."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    """A DDPM scheduler with the pipeline's noise schedule (training adds noise with it)."""
    inference_scheduler: Any
    """The pipeline's own sampling scheduler (e.g. PNDM for SD 1.x), for validation images."""
    source: str
    """Resolved `model.pretrained`: an absolute folder or a hub id."""
    revision: str | None


def resolve_pretrained(name: str) -> str:
    """Turn `model.pretrained` into something `from_pretrained` takes: a folder or a hub id."""
    if name.startswith(BUILTIN_PREFIX):
        size = name.removeprefix(BUILTIN_PREFIX)
        if size not in TINY_MODELS:
            known = ", ".join(BUILTIN_PREFIX + s for s in TINY_MODELS)
            raise UserError(
                f"model.pretrained: unknown built-in model {name!r}; use one of {known}"
            )
        return str(builtin_model_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"model.pretrained: {name} is not a diffusers pipeline folder (no "
                "model_index.json); point it at a folder written by save_pretrained"
            )
        return str(path.resolve())
    if _looks_like_path(name):
        raise UserError(
            f"model.pretrained: folder {name} does not exist; fix the path or use a hub id "
            "(org/name) or builtin:tiny"
        )
    return name


def check_model_source(cfg: ModelConfig) -> str:
    """Pre-flight check of `model.pretrained` before any training: returns the resolved source.

    Refuses (UserError) what training could not load or must not run.
    """
    return resolve_pretrained(cfg.pretrained)


def _looks_like_path(name: str) -> bool:
    # A hub id is `name` or `org/name`; anything else with separators is meant as a folder.
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    )


def load_components(cfg: ModelConfig) -> PipelineComponents:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_pretrained(cfg.pretrained)
    revision = cfg.revision if source == cfg.pretrained else None  # folders have no revisions

    def load(loader: Any, subfolder: str) -> Any:
        if isinstance(loader, type):
            loader = loader.from_pretrained
        try:
            return loader(source, subfolder=subfolder, revision=revision)
        except OSError as exc:
            raise UserError(
                f"model.pretrained: could not load {subfolder} of {cfg.pretrained!r}: "
                f"{_first_line(exc)}; check the hub id or folder, the network, and "
                "HF_HUB_OFFLINE (offline mode needs the model in the local cache)"
            ) from None

    scheduler_config = load(DDPMScheduler.load_config, "scheduler")
    inference_class = getattr(diffusers, scheduler_config.get("_class_name", ""), DDPMScheduler)
    return PipelineComponents(
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        text_encoder=load(CLIPTextModel, "text_encoder"),
        vae=load(AutoencoderKL, "vae"),
        unet=load(UNet2DConditionModel, "unet"),
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        inference_scheduler=inference_class.from_config(scheduler_config),
        source=source,
        revision=revision,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
