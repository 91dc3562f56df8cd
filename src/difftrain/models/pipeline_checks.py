"""Pre-flight checks of a pipeline folder or hub id, before anything is loaded or written.

diffusers and transformers load what a model folder asks for: a custom pipeline class, a
component from the repo's own Python module, an `auto_map` into remote code. difftrain never
runs such code, and it trains only the pipeline families in `models/families`, so both are
refused here with one line, from the JSON files alone. Broken files (JSON that does not parse,
truncated safetensors) are refused here too: the loaders would report them with tracebacks or
log lines, and only after minutes of loading a large model.

A hub id is checked through its snapshot in the Hugging Face cache: its JSON and Python files
are fetched (offline: taken from the cache), never its weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from difftrain.errors import UserError
from difftrain.models.families import FAMILY_NAMES, PIPELINE_CLASSES, family_for_class

TRUSTED_LIBRARIES = ("diffusers", "transformers")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
NEVER_RUN = "which needs trust_remote_code (custom code), and difftrain never runs custom code"


def check_pipeline(
    source: str,
    revision: str | None,
    *,
    name: str,
    label: str,
    family: str | None = None,
    drop_t5: bool = False,
    allow_absent: bool = False,
    need_weights: bool = True,
) -> str:
    """Refuse a pipeline difftrain cannot or must not load; returns its family's name.

    `source` is what `resolve_pretrained` returned (an absolute folder or a hub id), `name`
    what the user wrote and `label` the option that named it (`model.pretrained`, `--model`).
    `family` (model.family) names the family of a pipeline whose class difftrain does not
    know (it may not contradict one it knows); `drop_t5` leaves SD3's T5 out (it need not
    exist). `allow_absent` (sampling) accepts
    components the index sets to null, as diffusers does (SD3 saved without T5).
    `need_weights=False` checks the configs alone (`model.single_file_config`: the weights
    come from the checkpoint file).
    """
    from difftrain.models.families import family_class
    from difftrain.models.families.base import FamilyOptions

    local = os.path.isabs(source)
    folder = Path(source) if local else hub_snapshot(source, revision, name=name, label=label)
    where = f"{label}: {name}"
    index = read_json(folder, "model_index.json", where)
    if index is None:
        raise UserError(f"{where} has no model_index.json; it is not a diffusers pipeline")
    family = _pipeline_family(index, where, family)
    layout = family_class(family)(FamilyOptions(drop_t5=drop_t5))
    dropped = layout.dropped_parts()
    absent = tuple(part for part in layout.required_parts() if index.get(part) == [None, None])
    if absent and not allow_absent:
        missing = [part for part in absent if part not in dropped]
        if missing:
            fix = (
                "set model.drop_t5: true to train without T5"
                if missing[0] in ("text_encoder_3", "tokenizer_3")
                else "re-save the pipeline with it"
            )
            raise UserError(f"{where}: model_index.json sets {missing[0]} to null; {fix}")
    dropped = (*dropped, *absent)
    required = tuple(part for part in layout.required_parts() if part not in dropped)
    weights = tuple(part for part in layout.weight_parts() if part not in dropped)
    components = _check_component_entries(index, where)
    _check_component_kinds(index, layout, dropped, where)
    if local:
        _check_component_folders(folder, where, required, layout.title)
    must_hold = weights if local and need_weights else ()
    _check_component_files(folder, components, where, required, must_hold)
    scheduler_config = read_json(folder, "scheduler/scheduler_config.json", where)
    if scheduler_config is not None:
        scheduler_class(scheduler_config, where)
    return family


def check_single_model(
    source: str, class_name: str, *, name: str, label: str
) -> tuple[str | None, dict[str, Any]]:
    """Refuse a single-model folder or hub id (`model.vae`) that is not a `class_name` in
    diffusers format, ships code, or has damaged weights. A pipeline folder's `vae/` counts.

    Returns the subfolder to load from (`vae` or None) and the model's config.
    """
    local = os.path.isabs(source)
    folder = Path(source) if local else hub_snapshot(source, None, name=name, label=label)
    where = f"{label}: {name}"
    subfolder = None
    if (folder / "vae" / "config.json").is_file():
        folder, subfolder = folder / "vae", "vae"
    config = read_json(folder, "config.json", where)
    if config is None:
        raise UserError(f"{where} has no config.json; point it at a {class_name} folder")
    if config.get("_class_name") != class_name:
        raise UserError(
            f"{where}: config.json names class {config.get('_class_name')!r}, not {class_name}; "
            f"point it at a {class_name} folder"
        )
    code = sorted(folder.glob("*.py"))
    if code or "auto_map" in config:
        found = code[0].name if code else "an auto_map"
        raise UserError(f"{where}: it ships Python code ({found}), {NEVER_RUN}")
    _check_weights(folder, folder.name, where, require=local)
    return subfolder, config


def hub_snapshot(repo_id: str, revision: str | None, *, name: str, label: str) -> Path:
    """The cached snapshot of a hub model holding (at least) its JSON and Python files.

    Offline this is the cache as it is; online the small files are brought up to date. Weights
    are left to the loaders, which download them only once these checks pass.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.py"])
        )
    except (OSError, ValueError) as exc:  # hub errors are OSErrors; a malformed id a ValueError
        raise UserError(
            f"{label}: could not load {name!r}: {whole_message(exc)}; check the hub id, the "
            "network, and HF_HUB_OFFLINE (offline mode needs the model in the local cache)"
        ) from None


def read_json(folder: Path, relative: str, where: str) -> dict[str, Any] | None:
    """A JSON object from `folder/relative`; None when the file does not exist."""
    path = folder / relative
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{where}: {relative} is not valid JSON ({first_line(exc)}); re-save or "
            "re-download the model"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: {relative} is not a JSON object; re-save or re-download it")
    return data


def scheduler_class(config: dict[str, Any], where: str) -> type:
    """The diffusers scheduler class a scheduler config names (refused if diffusers has none).

    A silent fallback would sample, and report the noise schedule, of a scheduler the model
    was never made for.
    """
    import diffusers
    from diffusers import SchedulerMixin

    name = config.get("_class_name")
    found = (
        getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    )
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise UserError(
            f"{where}: scheduler/scheduler_config.json names scheduler class {name!r}, which "
            f"diffusers {diffusers.__version__} does not have; set its _class_name to a "
            "diffusers scheduler such as PNDMScheduler or DDPMScheduler"
        )
    return found


def uses_safetensors(folder: Path, component: str) -> bool:
    """Whether `folder/component` holds safetensors weights (single file or sharded)."""
    part = folder / component
    return part.is_dir() and any(
        p.name.endswith((".safetensors", ".safetensors.index.json")) for p in part.iterdir()
    )


def _pipeline_family(index: dict[str, Any], where: str, family: str | None) -> str:
    """The family of a pipeline whose class diffusers ships: `family` when given (a layout
    the user vouches for), else the one that trains its class."""
    import diffusers

    name = index.get("_class_name")
    if isinstance(name, list):  # [module, class]: a custom pipeline from the repo's own code
        raise UserError(f"{where}: its pipeline class is {name}, a custom pipeline {NEVER_RUN}")
    if not isinstance(name, str) or not name.isidentifier() or not hasattr(diffusers, name):
        raise UserError(
            f"{where}: pipeline class {name!r} (model_index.json _class_name) is not in "
            f"diffusers {diffusers.__version__}; a pipeline diffusers does not ship is custom "
            f"code, {NEVER_RUN}"
        )
    found = family_for_class(name)
    if family is not None:
        if found is not None and found != family:
            raise UserError(
                f"{where} is a {name} (model family {found}), not a {family} pipeline; remove "
                f"model.family or set it to {found}"
            )
        return family
    if found is None:
        supported = ", ".join(f"{cls} ({f})" for f, cls in PIPELINE_CLASSES.items())
        raise UserError(
            f"{where} is a {name}, which difftrain does not train; it trains {supported}; "
            f"set model.family (one of {', '.join(FAMILY_NAMES)}) if its layout is one of these"
        )
    return found


def _check_component_kinds(index: dict[str, Any], layout, dropped, where: str) -> None:
    """Each component the family loads is named, and is a class of the right kind: a
    tokenizer, a transformers model, or a diffusers model (never another callable of those
    libraries, which the loaders would call with the folder)."""
    import diffusers
    import transformers

    kinds = {name: transformers.PreTrainedTokenizerBase for name in layout.tokenizers}
    kinds.update({name: transformers.PreTrainedModel for name in layout.text_encoders})
    kinds.update({"vae": diffusers.ModelMixin, layout.denoiser: diffusers.ModelMixin})
    for name, kind in kinds.items():
        if name in dropped or index.get(name) == [None, None]:
            continue
        entry = index.get(name)
        found = None
        if isinstance(entry, list) and len(entry) == 2 and entry[0] in TRUSTED_LIBRARIES:
            found = getattr(importlib.import_module(entry[0]), str(entry[1]), None)
        if not (isinstance(found, type) and issubclass(found, kind)):
            raise UserError(
                f"{where}: model_index.json entry {name!r} is {entry!r}, not a "
                f"{kind.__module__.split('.')[0]} {kind.__name__} class a {layout.title} "
                "pipeline needs; re-save the pipeline with save_pretrained"
            )


def _check_component_entries(index: dict[str, Any], where: str) -> list[str]:
    """The components model_index.json names; refuses any that comes from custom code."""
    components = []
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list):
            continue  # settings such as requires_safety_checker
        if value in ([None, None], [None]):
            continue  # an optional component left out (safety_checker, feature_extractor)
        if len(value) != 2 or not all(isinstance(v, str) for v in value):
            raise UserError(
                f"{where}: model_index.json entry {key!r} is {value}, not [library, class]; "
                "re-save the pipeline with save_pretrained"
            )
        library, class_name = value
        if not _trusted_library(library):
            raise UserError(
                f"{where}: component {key} is {value}, from the model's own module {library!r}, "
                f"{NEVER_RUN}"
            )
        module = importlib.import_module(library) if library in TRUSTED_LIBRARIES else None
        if module is not None and not hasattr(module, class_name):
            raise UserError(
                f"{where}: component {key} is {value}, a class {library} does not have: it is "
                f"custom code ({NEVER_RUN}) or needs a newer {library}"
            )
        components.append(key)
    return components


def _trusted_library(library: str) -> bool:
    """diffusers, transformers, or one of diffusers' own pipeline packages.

    Stable Diffusion 1.x names its safety checker ["stable_diffusion", ...]: that is
    `diffusers.pipelines.stable_diffusion`, diffusers' code, not the model's.
    """
    if library in TRUSTED_LIBRARIES:
        return True
    if not library.isidentifier():
        return False
    return importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None


def _check_component_folders(
    folder: Path, where: str, required: tuple[str, ...], family: str
) -> None:
    for part in required:
        if not (folder / part).is_dir():
            needed = ", ".join(f"{p}/" for p in required)
            raise UserError(
                f"{where} has no {part}/ folder; a {family} pipeline needs {needed} "
                "(write it with save_pretrained)"
            )
        config = _config_file(part)
        if config and not (folder / part / config).is_file():
            raise UserError(f"{where}: {part}/{config} is missing; re-save or re-download it")


def _config_file(part: str) -> str | None:
    """The JSON file a component folder must have (tokenizers vary, so none for them)."""
    if part == "scheduler":
        return "scheduler_config.json"
    return None if part.startswith("tokenizer") else "config.json"


def _check_component_files(
    folder: Path,
    components: list[str],
    where: str,
    required: tuple[str, ...],
    must_hold_weights: tuple[str, ...],
) -> None:
    """No Python files, no `auto_map`, JSON that parses, weights present and complete.

    `must_hold_weights`: a local folder must hold every weight file; a hub snapshot holds
    only what was fetched so far, so only the files it has are checked.
    """
    code = sorted(folder.glob("*.py"))
    if code:
        raise UserError(f"{where}: it ships Python code ({code[0].name}), {NEVER_RUN}")
    for part in dict.fromkeys([*required, *components]):
        part_dir = folder / part
        if not part.isidentifier() or not part_dir.is_dir():
            continue  # a key that is no folder name cannot hold files diffusers reads
        code = sorted(part_dir.glob("*.py"))
        if code:
            raise UserError(f"{where}: it ships Python code ({part}/{code[0].name}), {NEVER_RUN}")
        for config_path in sorted(part_dir.glob("*.json")):
            config = read_json(folder, f"{part}/{config_path.name}", where)
            if config is not None and "auto_map" in config:
                raise UserError(
                    f"{where}: {part}/{config_path.name} has an auto_map into the model's own "
                    f"code, {NEVER_RUN}"
                )
        _check_weights(part_dir, part, where, require=part in must_hold_weights)


def _check_weights(part_dir: Path, part: str, where: str, require: bool) -> None:
    """Every safetensors file opens (header read, no tensor data), and weights exist."""
    from safetensors import SafetensorError, safe_open

    weights = sorted(p for p in part_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if require and not weights:
        raise UserError(
            f"{where}: {part}/ has no weights file (e.g. diffusion_pytorch_model.safetensors "
            "or model.safetensors); re-save or re-download the model"
        )
    for path in weights:
        if path.suffix != ".safetensors":
            continue
        try:
            # safe_open reads the header and checks that it covers the whole file.
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(
                f"{where}: {part}/{path.name} is damaged or truncated ({first_line(exc)}); "
                "re-save or re-download the model"
            ) from None


def first_line(exc: BaseException) -> str:
    """The gist of a library error for a one-line message.

    Its first line, or the first two when the first only introduces a list ("Error(s) in
    loading state_dict for UNet2DConditionModel:"), without a final full stop.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300].rstrip(".")


def whole_message(exc: BaseException) -> str:
    """All of a (short) error message on one line: hub errors put the cause on line one and
    what it means on line two."""
    return " ".join(str(exc).split())[:400].rstrip(".") or type(exc).__name__
