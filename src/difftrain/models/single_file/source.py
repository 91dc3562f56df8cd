"""Training from a single-file checkpoint: `model.pretrained: path/to/model.safetensors`.

    model:
      pretrained: ~/ComfyUI/models/checkpoints/my_sdxl.safetensors
      single_file_config: stabilityai/stable-diffusion-xl-base-1.0   # or a local folder

The file is loaded with the family pipeline's `from_single_file(path, config=...)`, diffusers'
own reader of the original layouts; `model.single_file_config` (a diffusers folder or hub id)
gives the component configs, tokenizers and scheduler. Without it diffusers picks a config
repository from the checkpoint's keys and fetches it from the Hub, which offline cannot work.
Only `.safetensors` is read: a `.ckpt` / `.pt` / `.bin` is a pickle, and unpickling can run
code. The checks (`check_single_file`) read the file's header and JSON files only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftrain.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SUFFIXES = (".safetensors", ".sft", *PICKLE_SUFFIXES)
LABEL = "model.pretrained"


def is_single_file(name: str) -> bool:
    """`model.pretrained` names one weights file (not a folder, hub id or builtin)."""
    path = Path(name).expanduser()
    return path.is_file() or (name.lower().endswith(SUFFIXES) and not path.is_dir())


@dataclass(frozen=True)
class SingleFile:
    path: Path
    """The checkpoint, absolute."""
    config: str | None
    """`model.single_file_config` resolved: an absolute folder or a hub id (None: inferred)."""
    family: str
    lacks: tuple[str, ...] = ()
    """Components the file does not hold (a transformer-only file, as Flux.1 ships, lacks
    the VAE and text encoders): they load from the config pipeline's own weights."""


COMPONENT_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "vae": {family: ("first_stage_model.", "vae.") for family in ("sd", "sdxl", "sd3", "flux")},
    "text_encoder": {"sd": ("cond_stage_model.",), "sdxl": ("conditioner.embedders.0.",),
                     "sd3": ("text_encoders.clip_l.",), "flux": ("text_encoders.clip_l.",)},
    "text_encoder_2": {"sdxl": ("conditioner.embedders.1.",), "sd3": ("text_encoders.clip_g.",),
                       "flux": ("text_encoders.t5xxl.",)},
    "text_encoder_3": {"sd3": ("text_encoders.t5xxl.",)},
}  # fmt: skip
"""Where each component sits in an original-layout file (what diffusers' reader looks for)."""


def lacked_components(keys: list[str], family: str) -> tuple[str, ...]:
    return tuple(
        name
        for name, where in COMPONENT_KEYS.items()
        if family in where and not any(key.startswith(where[family]) for key in keys)
    )


def check_single_file(cfg, label: str = LABEL) -> SingleFile:
    """Refuse (UserError) a single-file `cfg.pretrained` (a ModelConfig's) that cannot or must
    not be loaded; return it with its config source and family."""
    name = cfg.pretrained
    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{label}: {name} is a {path.suffix} file, a pickle, and loading a pickle can run "
            "code; difftrain reads single-file checkpoints as .safetensors only: use the "
            ".safetensors release of the model (or its diffusers folder)"
        )
    if not path.is_file():
        raise UserError(f"{label}: file {name} does not exist; fix the path")
    keys = header_keys(path, label)
    found = family_of_keys(keys)
    config = resolved_config(cfg.single_file_config)
    if config is None:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise UserError(
                f"model.single_file_config: is not set, and offline (HF_HUB_OFFLINE) diffusers "
                f"cannot fetch the configs of {path.name} from the Hub; set "
                "model.single_file_config to a diffusers folder (or cached hub id) of the same "
                "model, e.g. the pipeline the checkpoint was made from"
            )
        family = cfg.family or found
    else:
        family = check_config_source(config, cfg.single_file_config, cfg.family)
    if found is None or family is None:
        raise UserError(
            f"{label}: {name} has none of the keys of an SD, SDXL, SD3 or Flux checkpoint in "
            "the original layout (model.diffusion_model.*); use a checkpoint of one of these"
        )
    if found != family:
        from difftrain.models.families import family_class

        raise UserError(
            f"{label}: {name} is a {family_class(found).title} checkpoint (by its keys), but "
            f"model.single_file_config / model.family make it {family}; point "
            "model.single_file_config at a pipeline of the same family"
        )
    refuse_twin_encoders(path, keys, label)
    checked = SingleFile(path.resolve(), config, family, lacked_components(keys, family))
    if cfg.vae is not None and config is not None:
        from difftrain.models.loading import check_vae_fits, check_vae_source

        check_vae_fits(check_vae_source(cfg.vae)[2], config, None, cfg, family)
    return checked


def resolved_config(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise UserError(
            f"model.single_file_config: folder {value} does not exist; fix the path or use a "
            "hub id (org/name)"
        )
    return value


def check_config_source(config: str, name: str, family: str | None) -> str:
    """The config folder (or hub snapshot) holds a pipeline difftrain trains, made of
    diffusers / transformers classes only, with each component's config; returns its family.
    Weights are not needed there: they come from the checkpoint."""
    from difftrain.models.pipeline_checks import check_pipeline

    return check_pipeline(
        config, None, name=name, label="model.single_file_config", family=family,
        allow_absent=True, need_weights=False,
    )  # fmt: skip


def header_keys(path: Path, label: str = LABEL) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise UserError(
            f"{label}: {path} is not a readable safetensors file ({text}); re-download it"
        ) from None


def family_of_keys(keys: list[str]) -> str | None:
    """The family whose original layout these keys are (None: none of ours)."""
    names = set(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in names)

    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return "sd3"
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        return "flux"
    if has("model.diffusion_model.input_blocks."):
        return "sdxl" if has("conditioner.embedders.1.") else "sd"
    return None


def refuse_twin_encoders(path: Path, keys: list[str], label: str = LABEL) -> None:
    """An SDXL file whose two text encoders diffusers' reader would mix up (of one width)."""
    from safetensors import safe_open

    from difftrain.models.single_file import twin_encoder_width

    with safe_open(str(path), framework="pt") as handle:
        width = twin_encoder_width(keys, lambda key: handle.get_slice(key).get_shape())
    if width is not None:
        raise UserError(
            f"{label}: {path.name}'s two text encoders have the same width ({width}), and "
            "diffusers' single-file reader then loads the first into the second; train from "
            "the diffusers folder instead"
        )


def load_single_file_components(cfg, family, *, only: tuple[str, ...] = ()):
    """`load_components` for a single-file `cfg.pretrained`: the family pipeline's
    `from_single_file`, with what the run does not use (or `only` leaves out) not loaded."""
    import inspect

    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    from difftrain.models.loading import (
        LOAD_ERRORS,
        PipelineComponents,
        check_vae_source,
        first_line,
        refuse_missing_weights,
        schedulers,
    )
    from difftrain.quiet import diffusers_logs_silenced

    checked = check_single_file(cfg)
    where = f"{LABEL}: {cfg.pretrained}"
    cls = family.pipeline_type()
    vae = check_vae_source(cfg.vae)[:2] if cfg.vae is not None else (None, None)
    wanted = [name for name in family.parts_to_load() if not only or name in only]
    if vae[0] is not None:
        wanted = [name for name in wanted if name != "vae"]
    signature = inspect.signature(cls.__init__).parameters
    skipped = {
        name: None
        for name in signature
        if name not in (*wanted, "self", "scheduler")
        and signature[name].kind is signature[name].POSITIONAL_OR_KEYWORD
    }
    try:
        with diffusers_logs_silenced():
            given = from_config(checked, [name for name in wanted if name in checked.lacks])
            pipeline = cls.from_single_file(
                str(checked.path),
                config=checked.config,
                local_files_only=_local_only(checked.config),
                **skipped,
                **given,
            )
            parts: dict[str, Any] = {name: getattr(pipeline, name) for name in wanted}
            if vae[0] is not None and (not only or "vae" in only):
                parts["vae"] = diffusers.AutoencoderKL.from_pretrained(vae[0], subfolder=vae[1])
    except (*LOAD_ERRORS, KeyError, IndexError, SingleFileComponentError) as exc:
        gist = first_line(exc).split(". ")[0]  # diffusers' advice after it does not apply
        raise UserError(
            f"{where}: diffusers could not load it ({gist}); check that "
            "model.single_file_config is a pipeline of the same model (its configs must match "
            "the checkpoint's shapes)"
        ) from None
    for name, part in parts.items():
        if hasattr(part, "named_parameters"):
            refuse_missing_weights(part, where, name)
    return PipelineComponents(
        family=family,
        parts=parts,
        **schedulers(family, dict(pipeline.scheduler.config), where),
        source=str(checked.path),
        revision=None,
        vae_source=vae[0],
        vae_subfolder=vae[1],
        single_file_config=checked.config,
    )


def load_base_pipeline(components, **replaced):
    """The whole base pipeline from the checkpoint, with `replaced` components (the trained
    denoiser, the run's scheduler): what the final save writes, a single file having no
    component files to copy."""
    config = components.single_file_config
    checked = SingleFile(Path(components.source), config, components.family.name)
    keys = header_keys(checked.path)
    lacks = [name for name in lacked_components(keys, checked.family) if name not in replaced]
    return components.family.pipeline_type().from_single_file(
        components.source, config=config, local_files_only=_local_only(config),
        **from_config(checked, lacks), **replaced,
    )  # fmt: skip


def from_config(checked: SingleFile, names: list[str]) -> dict[str, Any]:
    """Components the file lacks, from the config pipeline's weights (diffusers' own fallback
    looks for diffusers' weight names only, not transformers' model.safetensors)."""
    if checked.config is None or not names:
        return {}
    import diffusers

    from difftrain.models.loading import component_class, safetensors_only

    where = f"model.single_file_config: {checked.config}"
    index = diffusers.DiffusionPipeline.load_config(
        checked.config, local_files_only=_local_only(checked.config)
    )
    return {
        name: component_class(index, name, where).from_pretrained(
            checked.config, subfolder=name,
            use_safetensors=safetensors_only(checked.config, None, name),
            local_files_only=_local_only(checked.config),
        )
        for name in names
    }  # fmt: skip


def _local_only(config: str | None) -> bool:
    from huggingface_hub import constants

    return (config is not None and Path(config).is_absolute()) or constants.is_offline_mode()


def check_single_file_options(cfg) -> None:
    """A ModelConfig's single-file settings make sense together (the pre-flight)."""
    if cfg.single_file_config is not None and not is_single_file(cfg.pretrained):
        raise UserError(
            "model.single_file_config: applies only when model.pretrained is a single-file "
            f"checkpoint (.safetensors), not {cfg.pretrained}; remove it"
        )
