"""Load the pipeline components that training needs, from a hub id, a folder or a builtin.

`model.pretrained` is resolved once (`resolve_pretrained`) and everything loads from that
source with diffusers / transformers `from_pretrained`, so offline mode, the Hugging Face cache
and revisions behave exactly as they do in diffusers. `check_model_source` is the pre-flight:
it refuses, from JSON files and safetensors headers alone, a model difftrain must not or cannot
load (see `pipeline_checks`), before a run writes anything.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from difftrain.config.schema import ModelConfig
from difftrain.errors import UserError
from difftrain.models.pipeline_checks import (
    check_pipeline,
    first_line,
    scheduler_class,
    uses_safetensors,
)
from difftrain.models.tiny import BUILTIN_PREFIX, TINY_MODELS, builtin_model_path
from difftrain.quiet import diffusers_logs_silenced

# What loaders raise for a file the user gave: missing, corrupt, of the wrong shape, a pickle
# that is not plain tensors. Narrower would let a damaged download end in a traceback.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)


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


def resolve_pretrained(name: str, label: str = "model.pretrained") -> str:
    """Turn `model.pretrained` into something `from_pretrained` takes: a folder or a hub id.

    `label` names the setting in error messages (`--model` for `difftrain sample`).
    """
    if name.startswith(BUILTIN_PREFIX):
        size = name.removeprefix(BUILTIN_PREFIX)
        if size not in TINY_MODELS:
            known = ", ".join(BUILTIN_PREFIX + s for s in TINY_MODELS)
            raise UserError(f"{label}: unknown built-in model {name!r}; use one of {known}")
        return str(builtin_model_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{label}: {name} is not a diffusers pipeline folder (no "
                "model_index.json); point it at a folder written by save_pretrained"
            )
        return str(path.resolve())
    if _looks_like_path(name):
        raise UserError(
            f"{label}: folder {name} does not exist; fix the path or use a hub id "
            "(org/name) or builtin:tiny"
        )
    return name


def check_model_source(cfg: ModelConfig, label: str = "model.pretrained") -> str:
    """Pre-flight check of `model.pretrained` before any training: returns the resolved source.

    Refuses (UserError) what training could not load or must not run: a hub id that cannot be
    reached, a pipeline that needs custom code, one that is not Stable Diffusion, an unknown
    scheduler, missing component folders, broken JSON or truncated weights. It reads JSON
    files and safetensors headers only, so it is quick even for a large model.
    """
    source = resolve_pretrained(cfg.pretrained, label)
    check_pipeline(source, _revision(cfg, source), name=cfg.pretrained, label=label)
    return source


def _revision(cfg: ModelConfig, source: str) -> str | None:
    # A folder has no revisions; only a hub id passes through resolve_pretrained unchanged.
    return cfg.revision if source == cfg.pretrained else None


def _looks_like_path(name: str) -> bool:
    # A hub id is `name` or `org/name`; anything else with separators is meant as a folder.
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    )


def load_components(cfg: ModelConfig) -> PipelineComponents:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_pretrained(cfg.pretrained)
    revision = _revision(cfg, source)

    def load(loader: Any, subfolder: str, **kwargs: Any) -> Any:
        if isinstance(loader, type):
            loader = loader.from_pretrained
        try:
            # The libraries log (and warn about) a failure before raising it: the raised error
            # is reported, once, as one line.
            with diffusers_logs_silenced():
                loaded = loader(source, subfolder=subfolder, revision=revision, **kwargs)
        except LOAD_ERRORS as exc:
            raise UserError(
                f"model.pretrained: could not load {subfolder} of {cfg.pretrained!r}: "
                f"{first_line(exc)}; check the hub id or folder, the network, and "
                "HF_HUB_OFFLINE (offline mode needs the model in the local cache)"
            ) from None
        return loaded

    def weights(loader: Any, subfolder: str) -> Any:
        only_safetensors = safetensors_only(source, revision, subfolder)
        model = load(loader, subfolder, use_safetensors=only_safetensors)
        refuse_missing_weights(model, f"model.pretrained: {cfg.pretrained}", subfolder)
        return model

    scheduler_config = load(DDPMScheduler.load_config, "scheduler")
    inference_class = scheduler_class(scheduler_config, f"model.pretrained: {cfg.pretrained}")
    return PipelineComponents(
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        text_encoder=weights(CLIPTextModel, "text_encoder"),
        vae=weights(AutoencoderKL, "vae"),
        unet=weights(UNet2DConditionModel, "unet"),
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        inference_scheduler=inference_class.from_config(scheduler_config),
        source=source,
        revision=revision,
    )


def refuse_missing_weights(model: Any, where: str, part: str) -> None:
    """A weights file that lacks tensors loads as "meta" placeholders, which fail only at the
    first step with a message naming no file: refuse it now."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(
            f"{where}: {part} weights lack {len(missing)} tensors (e.g. {missing[0]}); "
            "re-save or re-download the model"
        )


def safetensors_only(source: str, revision: str | None, subfolder: str) -> bool | None:
    """`use_safetensors` for one component: True when its weights exist as safetensors.

    True makes the loader fail rather than fall back to a pickle (.bin) when the safetensors
    file cannot be had. None keeps the loaders' default (safetensors first, else a pickle read
    with `torch.load(weights_only=True)`, which builds tensors only and runs no code). For a hub
    id this looks at the cached snapshot, if there is one.
    """
    folder: Path | None = Path(source) if os.path.isabs(source) else None
    if folder is None:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
        except (OSError, ValueError):
            return None  # not cached yet: the loader downloads, preferring safetensors
    return True if uses_safetensors(folder, subfolder) else None
