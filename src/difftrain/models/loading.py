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
from difftrain.models.families.base import ModelFamily
from difftrain.models.pipeline_checks import (
    TRUSTED_LIBRARIES,
    check_pipeline,
    first_line,
    scheduler_class,
    uses_safetensors,
)
from difftrain.models.single_file.source import is_single_file
from difftrain.models.tiny import BUILTIN_PREFIX, BUILTINS, builtin_model_path
from difftrain.quiet import diffusers_logs_silenced

# What loaders raise for a file the user gave: missing, corrupt, of the wrong shape, a pickle
# that is not plain tensors. Narrower would let a damaged download end in a traceback.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)


@dataclass
class PipelineComponents:
    """The parts of a pipeline that training touches, and the family that knows them."""

    family: ModelFamily
    parts: dict[str, Any]
    """Tokenizers, text encoders, VAE and denoiser, by the pipeline's component names."""
    noise_scheduler: Any
    """The training scheduler: DDPM with the pipeline's noise schedule (DDPM families), or the
    pipeline's flow-matching scheduler (its sigma table)."""
    inference_scheduler: Any
    """The pipeline's own sampling scheduler (e.g. PNDM for SD 1.x), for validation images."""
    source: str
    """Resolved `model.pretrained`: an absolute folder or a hub id."""
    revision: str | None
    vae_source: str | None = None
    """Resolved `model.vae`, when the run swaps the pipeline's VAE for another."""
    vae_subfolder: str | None = None
    """Where in `vae_source` the VAE is (`vae` when it is a whole pipeline)."""
    device: Any = "cpu"
    """Where the run computes (set once the models are placed)."""
    residency: Any = None
    """An `EncoderResidency` when the VAE and text encoders are released while the cache
    answers for them (training/encoder_residency.py); None keeps them loaded."""
    single_file_config: str | None = None
    """With a single-file `source` (models/single_file/source.py): where its configs come
    from, an absolute folder or a hub id (None: inferred by diffusers)."""

    @property
    def denoiser(self) -> Any:
        return self.parts[self.family.denoiser]

    @denoiser.setter
    def denoiser(self, model: Any) -> None:
        self.parts[self.family.denoiser] = model

    @property
    def vae(self) -> Any:
        return self.parts["vae"]

    @property
    def text_encoders(self) -> dict[str, Any]:
        """The text encoders this run loaded, by component name."""
        return {n: self.parts[n] for n in self.family.text_encoders if n in self.parts}

    def tokenizers(self) -> dict[str, Any]:
        return {n: self.parts[n] for n in self.family.tokenizers if n in self.parts}


def resolve_pretrained(name: str, label: str = "model.pretrained") -> str:
    """Turn `model.pretrained` into something `from_pretrained` takes: a folder or a hub id.

    `label` names the setting in error messages (`--model` for `difftrain sample`).
    """
    if is_single_file(name):
        raise UserError(
            f"{label}: {name} is a single-file checkpoint, which only training reads "
            "(model.pretrained); load it with the pipeline's from_single_file, or use a "
            "diffusers folder"
        )
    if name.startswith(BUILTIN_PREFIX):
        size = name.removeprefix(BUILTIN_PREFIX)
        if size not in BUILTINS:
            known = ", ".join(BUILTIN_PREFIX + s for s in BUILTINS)
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
    reached, a pipeline that needs custom code, one of a family difftrain does not train, an
    unknown scheduler, missing component folders, broken JSON or truncated weights. It reads
    JSON files and safetensors headers only, so it is quick even for a large model.
    """
    return _checked_source(cfg, label)[0]


def model_family(
    cfg: ModelConfig, train_cfg=None, label: str = "model.pretrained", *, sampling: bool = False
) -> ModelFamily:
    """The family of `cfg.pretrained` (checked as `check_model_source` does), built with the
    run's options; `train_cfg` gives Flux's guidance value. `sampling` accepts components
    the pipeline sets to null."""
    from difftrain.models.families import family_class
    from difftrain.models.families.base import FamilyOptions

    _, name = _checked_source(cfg, label, sampling=sampling)
    options = FamilyOptions(
        max_sequence_length=cfg.max_sequence_length,
        drop_t5=cfg.drop_t5,
        guidance_scale=getattr(train_cfg, "guidance_scale", None),
    )
    return family_class(name)(options)


def _checked_source(cfg: ModelConfig, label: str, sampling: bool = False) -> tuple[str, str]:
    if is_single_file(cfg.pretrained) and label == "model.pretrained":
        from difftrain.models.single_file.source import check_single_file

        checked = check_single_file(cfg, label)
        return str(checked.path), checked.family
    source = resolve_pretrained(cfg.pretrained, label)
    revision = _revision(cfg, source)
    family = check_pipeline(
        source, revision, name=cfg.pretrained, label=label,
        family=cfg.family, drop_t5=cfg.drop_t5, allow_absent=sampling,
    )  # fmt: skip
    if cfg.vae is not None:
        _, _, vae_config = check_vae_source(cfg.vae)
        check_vae_fits(vae_config, source, revision, cfg, family)
    return source, family


def check_vae_source(name: str) -> tuple[str, str | None, dict]:
    """`model.vae`: an AutoencoderKL folder or hub id, checked like a pipeline component.

    Returns (source, subfolder to load from, its config).
    """
    from difftrain.models.pipeline_checks import check_single_model

    path = Path(name).expanduser()
    source = str(path.resolve()) if path.is_dir() else name
    if not path.is_dir() and _looks_like_path(name):
        raise UserError(f"model.vae: folder {name} does not exist; fix the path or use a hub id")
    subfolder, config = check_single_model(source, "AutoencoderKL", name=name, label="model.vae")
    return source, subfolder, config


def check_vae_fits(vae_config: dict, source: str, revision, cfg: ModelConfig, family: str):
    """The replacement VAE makes latents of the channels the denoiser reads."""
    from difftrain.models.families import family_class
    from difftrain.models.pipeline_checks import hub_snapshot, read_json

    layout = family_class(family)
    folder = Path(source) if os.path.isabs(source) else hub_snapshot(
        source, revision, name=cfg.pretrained, label="model.pretrained"
    )  # fmt: skip
    denoiser = read_json(folder, f"{layout.denoiser}/config.json", "model.pretrained") or {}
    wanted = denoiser.get("in_channels")
    channels = vae_config.get("latent_channels")
    if isinstance(wanted, int) and channels is not None:
        wanted //= layout.packed_channels
        if channels != wanted:
            raise UserError(
                f"model.vae: {cfg.vae} makes {channels}-channel latents, but the "
                f"{layout.denoiser} of {cfg.pretrained} reads {wanted}; use a VAE made for "
                "this model family"
            )


def _revision(cfg: ModelConfig, source: str) -> str | None:
    # A folder has no revisions; only a hub id passes through resolve_pretrained unchanged.
    return cfg.revision if source == cfg.pretrained else None


def _looks_like_path(name: str) -> bool:
    # A hub id is `name` or `org/name`; anything else with separators is meant as a folder.
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    )


def load_components(
    cfg: ModelConfig, family: ModelFamily | None = None, *, only: tuple[str, ...] = ()
) -> PipelineComponents:
    """Load the family's tokenizers, text encoders, VAE and denoiser, and its schedulers
    (with `only`, just those components).

    Each component loads with the class its `model_index.json` entry names (checked to be
    diffusers' or transformers' own by the pre-flight).
    """
    import diffusers

    family = family or model_family(cfg)
    if is_single_file(cfg.pretrained):
        from difftrain.models.single_file.source import load_single_file_components

        return load_single_file_components(cfg, family, only=only)
    source = resolve_pretrained(cfg.pretrained)
    revision = _revision(cfg, source)
    where = f"model.pretrained: {cfg.pretrained}"

    def load(loader: Any, subfolder: str | None, origin: str = source, **kwargs: Any) -> Any:
        try:
            # The libraries log (and warn about) a failure before raising it: the raised error
            # is reported, once, as one line.
            with diffusers_logs_silenced():
                return loader(
                    origin, subfolder=subfolder, revision=revision if origin == source else None,
                    **kwargs,
                )  # fmt: skip
        except LOAD_ERRORS as exc:
            label = "model.vae" if origin != source else "model.pretrained"
            what = subfolder or "the VAE"
            raise UserError(
                f"{label}: could not load {what} of {origin!r}: {first_line(exc)}; check the hub "
                "id or folder, the network, and HF_HUB_OFFLINE (offline mode needs the model in "
                "the local cache)"
            ) from None

    index = load(diffusers.DiffusionPipeline.load_config, None)
    parts: dict[str, Any] = {}
    for name in family.parts_to_load():
        if only and name not in only:
            continue
        cls = component_class(index, name, where)
        if name in family.tokenizers:
            parts[name] = load(cls.from_pretrained, name)
            continue
        only_safetensors = safetensors_only(source, revision, name)
        parts[name] = load(cls.from_pretrained, name, use_safetensors=only_safetensors)
        refuse_missing_weights(parts[name], where, name)
    vae_source = vae_subfolder = None
    if cfg.vae is not None and (not only or "vae" in only):
        vae_source, vae_subfolder, _ = check_vae_source(cfg.vae)
        parts["vae"] = load(diffusers.AutoencoderKL.from_pretrained, vae_subfolder, vae_source)
        refuse_missing_weights(parts["vae"], f"model.vae: {cfg.vae}", "vae")

    scheduler_config = load(diffusers.DDPMScheduler.load_config, "scheduler")
    return PipelineComponents(
        family=family,
        parts=parts,
        **schedulers(family, scheduler_config, where),
        source=source,
        revision=revision,
        vae_source=vae_source,
        vae_subfolder=vae_subfolder,
    )


def component_class(index: dict[str, Any], name: str, where: str) -> type:
    """The class `model_index.json` names for component `name` (diffusers or transformers)."""
    import importlib

    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in TRUSTED_LIBRARIES):
        raise UserError(
            f"{where}: model_index.json has no diffusers or transformers class for {name} "
            f"(found {entry!r}); re-save the pipeline with save_pretrained"
        )
    return getattr(importlib.import_module(entry[0]), entry[1])


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
    folder = local_model_folder(source, revision)
    if folder is None:
        return None  # not cached yet: the loader downloads, preferring safetensors
    return True if uses_safetensors(folder, subfolder) else None


def local_model_folder(source: str, revision: str | None) -> Path | None:
    """A resolved `model.pretrained` on this disk: the folder itself, or a hub id's snapshot
    in the Hugging Face cache; None when the hub id is not cached, or `source` is a
    single-file checkpoint (it has no component folders)."""
    if os.path.isabs(source):
        return Path(source) if Path(source).is_dir() else None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except (OSError, ValueError):
        return None


def load_base_pipeline(components: PipelineComponents, **replaced: Any) -> Any:
    """The run's base pipeline as its family's class, with `replaced` components passed in."""
    if is_single_file(components.source):
        from difftrain.models.single_file.source import load_base_pipeline as from_file

        return from_file(components, **replaced)
    return components.family.pipeline_type().from_pretrained(
        components.source, revision=components.revision, **replaced
    )


def schedulers(family, scheduler_config: dict, where: str) -> dict[str, object]:
    """The run's two schedulers from the pipeline's scheduler config: training adds noise
    with DDPM's (flow-matching families: their own), sampling uses the class it names."""
    import diffusers

    inference_class = scheduler_class(scheduler_config, where)
    training_class = inference_class if family.flow_matching else diffusers.DDPMScheduler
    return {
        "noise_scheduler": training_class.from_config(scheduler_config),
        "inference_scheduler": inference_class.from_config(scheduler_config),
    }
