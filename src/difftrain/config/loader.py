"""Read a YAML config, apply `--set section.key=value` overrides, validate, and write it back.

Every problem is a `ConfigError` naming the dotted key (`train.max_steps`), what is wrong and,
for a near-miss name, what was probably meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from difftrain.config.checks import INT_LIMIT
from difftrain.config.schema import Config
from difftrain.config.strict_yaml import DuplicateKeyError, safe_load_strict
from difftrain.errors import ConfigError, UserError

_MISSING = object()


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Load `path`, apply `overrides` (each `section.key=value`) and return a validated Config."""
    raw = read_yaml_mapping(path)
    for key, value in parse_overrides(overrides or []):
        section, _, name = key.partition(".")
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict):  # Otherwise validation reports the bad section.
            raw[section][name] = value
    return config_from_dict(raw, source=str(path))


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML file whose top level must be a mapping; errors name the file and line."""
    path = Path(path).expanduser()  # `--config ~/x.yaml` quoted, as data paths are expanded
    if not path.is_file():
        raise UserError(
            f"config file {path} does not exist; pass an existing YAML file to --config"
        )
    try:
        data = safe_load_strict(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}{line}: invalid YAML: {problem}; fix the syntax there") from None
    except DuplicateKeyError as exc:
        raise UserError(f"{path}: {exc}; keep one of them") from None
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deep to be a config; fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a YAML config") from None
    except OSError as exc:
        raise UserError(f"config file {path}: cannot read it ({exc.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return data


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Split `section.key=value` strings; values are parsed as YAML scalars (`4`, `true`, `[a]`)."""
    parsed = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1 or not all(key.split(".")):
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=10")
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text  # Not YAML: keep the text; the key's type decides if that is fine.
        # Remember the raw text so a str-typed key gets exactly what was typed ("007" stays).
        parsed.append((key, _RawText(text, value)))
    return parsed


class _RawText:
    """An override value with its original text, so str keys are not reinterpreted by YAML."""

    def __init__(self, text: str, value: Any):
        self.text, self.value = text, value


def config_from_dict(raw: dict[str, Any], source: str | None = None) -> Config:
    """Build a validated Config from a plain mapping (as read from YAML)."""
    # Unknown keys first, everywhere: a typo explains a "missing" value better than the reverse.
    _reject_unknown_keys(Config, raw, prefix="", source=source)
    cfg = _build(Config, raw, prefix="", source=source)
    _check_combinations(cfg, source)
    _refuse_lora_keys_without_lora(raw, cfg, source)
    return cfg


def _refuse_lora_keys_without_lora(raw: dict[str, Any], cfg: Config, source: str | None) -> None:
    """`lora.rank: 8` without `lora.enabled: true` would silently run a full fine-tune.

    Keys at their defaults pass: a resolved `config.yaml` lists every key.
    """
    section = raw.get("lora")
    if cfg.lora.enabled or not isinstance(section, dict):
        return
    defaults = type(cfg.lora)()
    stray = [
        key
        for key in section
        if key != "enabled" and getattr(cfg.lora, key) != getattr(defaults, key)
    ]
    if stray:
        raise ConfigError(
            f"lora.{stray[0]}",
            "is set but LoRA is off, so a full fine-tune would run and ignore it; set "
            "lora.enabled: true (or remove the lora keys)",
            source,
        )


def _check_combinations(cfg: Config, source: str | None) -> None:
    """Keys that are fine alone but not together."""
    from difftrain.config.optimizer import optimizer_name

    optimizer_name(cfg.train, source)
    _check_one_source(cfg.data, "data.", source, allow_list=True)
    for index, entry in enumerate(cfg.data.sources):
        _check_one_source(entry, f"data.sources[{index}].", source, allow_list=False)
    if cfg.validation.loss_every_steps and not cfg.validation.loss_dir:
        raise ConfigError(
            "validation.loss_dir",
            "is required when validation.loss_every_steps > 0 (a folder of held-out images)",
            source,
        )
    if cfg.train.fsdp and (cfg.lora.enabled or cfg.ema.enabled):
        raise ConfigError(
            "train.fsdp",
            "shards full fine-tunes without EMA only (LoRA adapters are small enough to "
            "replicate); turn off train.fsdp, or lora.enabled / ema.enabled",
            source,
        )
    if cfg.train.fsdp and cfg.train.compile:
        raise ConfigError(
            "train.compile",
            "is not checked with train.fsdp's sharded denoiser yet; turn one of them off",
            source,
        )
    if cfg.data.cache_latents and not cfg.data.center_crop:
        raise ConfigError(
            "data.cache_latents",
            "needs data.center_crop: true (a random crop changes every epoch, so its latents "
            "could never be reused); set data.center_crop: true or turn off the cache",
            source,
        )
    if cfg.data.cache_text_embeddings and cfg.lora.enabled and cfg.lora.train_text_encoder:
        raise ConfigError(
            "data.cache_text_embeddings",
            "cannot cache the output of a text encoder that trains (lora.train_text_encoder); "
            "turn off one of them",
            source,
        )
    if cfg.data.cache_text_embeddings and (cfg.data.shuffle_tags or cfg.data.tag_dropout):
        raise ConfigError(
            "data.cache_text_embeddings",
            "would miss almost every step with data.shuffle_tags / data.tag_dropout (each "
            "draw is a new caption) and grow without bound; turn off one of them",
            source,
        )
    if cfg.ema.enabled and cfg.lora.enabled:
        raise ConfigError(
            "ema.enabled",
            "works with full fine-tuning only (the adapters are what trains under LoRA); "
            "turn off ema.enabled or lora.enabled",
            source,
        )


def _check_one_source(section, prefix: str, source: str | None, *, allow_list: bool) -> None:
    """Exactly one of train_dir, dataset, shards (or, for `data`, a list of sources)."""
    keys = ("train_dir", "dataset", "shards", "sources") if allow_list else SOURCE_KEYS
    named = [key for key in keys if getattr(section, key, None)]
    if len(named) != 1:
        raise ConfigError(
            f"{prefix}{named[0] if named else 'train_dir'}",
            "is required (or dataset, shards"
            + (", or a list of sources" if allow_list else "")
            + ": exactly one source)"
            if not named
            else f"and {prefix}{named[1]} both name the training data; keep one",
            source,
        )


SOURCE_KEYS = ("train_dir", "dataset", "shards")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, in schema order (what `config.yaml` holds)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file in the same folder, rename)."""
    from difftrain.io import atomic_write_text

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_text(Path(path), text)


def _reject_unknown_keys(cls: type, raw: Any, prefix: str, source: str | None) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "config", "must be a mapping of keys", source)
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(
                f"{prefix}{key}", "unknown key" + _did_you_mean(str(key), prefix, cls), source
            )
        if dataclasses.is_dataclass(hints[key]):
            _reject_unknown_keys(hints[key], value, f"{prefix}{key}.", source)


def _build(cls: type, raw: dict[str, Any] | None, prefix: str, source: str | None) -> Any:
    raw = raw or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw.get(name), f"{dotted}.", source)
            continue
        if name in raw:
            value = _coerce(raw[name], hints[name], dotted, source)
        else:
            value = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(dotted, problem, source)
        _check_maximum(value, f.metadata.get("maximum", INT_LIMIT), dotted, source)
        values[name] = value
    return cls(**values)


def _check_maximum(value: Any, maximum: int, key: str, source: str | None) -> None:
    """Integers (alone or in a list) at most `maximum`: a value beyond it is a typo, and the
    libraries would fail on it later (an OverflowError, or after a whole training run)."""
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        if isinstance(item, int) and not isinstance(item, bool) and item > maximum:
            where = f"{key}[{index}]" if isinstance(value, list) else key
            raise ConfigError(where, f"must be at most {maximum}, got {item}", source)


def _did_you_mean(key: str, prefix: str, cls: type) -> str:
    """Suggest the closest key of this section, or the same key in another section."""
    here = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    if prefix:  # Maybe the right key in the wrong section (train.resolution -> data.resolution).
        for section, section_cls in typing.get_type_hints(Config).items():
            if key in {f.name for f in dataclasses.fields(section_cls)}:
                return f"; did you mean '{section}.{key}'?"
    return f"; known keys: {', '.join(prefix + name for name in here)}"


def _coerce(value: Any, hint: Any, key: str, source: str | None) -> Any:
    text = value.text if isinstance(value, _RawText) else None
    if isinstance(value, _RawText):
        value = value.value
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value if text is None else _RawText(text, value), inner, key, source)

    if dataclasses.is_dataclass(hint):  # an item of a list of sections (data.sources)
        _reject_unknown_keys(hint, value, f"{key}.", source)
        return _build(hint, value, f"{key}.", source)

    if origin is Literal:
        # `--set train.mixed_precision=no`: YAML reads `no` as False; the typed text is meant.
        if text is not None and text.strip() in [a for a in args if isinstance(a, str)]:
            return text.strip()
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f"; did you mean '{close[0]}'?" if close else ""
        choices = ", ".join(str(a) for a in args)
        raise ConfigError(key, f"must be one of {choices}, got {value!r}{hint_text}", source)

    if origin is list:
        (item_type,) = args
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {_describe(value)}", source)
        return [_coerce(item, item_type, f"{key}[{i}]", source) for i, item in enumerate(value)]

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {_describe(value)}", source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"must be an integer, got {_describe(value)}", source)
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(key, f"must be a number, got {_describe(value)}", source)
        if not math.isfinite(number):  # `.inf`, `inf`, `nan`: no setting means infinity
            raise ConfigError(key, f"must be a finite number, got {value!r}", source)
        return number
    if hint is str:
        if text is not None:
            return text.strip()
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric revision or folder name
        raise ConfigError(key, f"must be a string, got {_describe(value)}", source)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a schema bug, not user input


def _describe(value: Any) -> str:
    kind = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, (list, dict)) else kind


def resolve_run_config(
    config_path: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    output_dir: str | None = None,
    deterministic: bool = False,
) -> Config:
    """The config a run uses: file + overrides + CLI flags, with paths made absolute.

    Relative paths resolve against the current working folder (not the config's folder), so
    `./data/x` in a config means the same thing as `./data/x` typed on the command line.
    """
    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"train.output_dir={output_dir}")
    if deterministic:
        overrides.append("train.deterministic=true")
    cfg = load_config(config_path, overrides)

    def local(name: str | None) -> str | None:  # a hub id or builtin stays as it is
        if name and not name.startswith("builtin:") and Path(name).expanduser().exists():
            return str(Path(name).expanduser().resolve())
        return name

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            pretrained=local(cfg.model.pretrained),
            single_file_config=local(cfg.model.single_file_config),
        ),
        data=dataclasses.replace(
            _absolute_source(cfg.data),
            sources=[_absolute_source(entry) for entry in cfg.data.sources],
        ),
        train=dataclasses.replace(cfg.train, output_dir=_absolute(cfg.train.output_dir)),
        validation=dataclasses.replace(
            cfg.validation,
            loss_dir=_absolute(cfg.validation.loss_dir) if cfg.validation.loss_dir else None,
        ),
    )


def _absolute_source(section):
    """A source's paths made absolute (a dataset only when it is a local folder)."""
    dataset = section.dataset
    return dataclasses.replace(
        section,
        train_dir=section.train_dir and _absolute(section.train_dir),
        shards=section.shards and str(Path(section.shards).expanduser().absolute()),
        dataset=_absolute(dataset) if dataset and Path(dataset).expanduser().is_dir() else dataset,
    )


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())
