"""Typed, validated configuration: YAML file + `--set` overrides -> `Config`."""

from difftrain.config.loader import (
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
    resolve_run_config,
)
from difftrain.config.schema import (
    CheckpointingConfig,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    ValidationConfig,
)

__all__ = [
    "CheckpointingConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "ValidationConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "resolve_run_config",
]
