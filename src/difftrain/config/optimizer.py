"""Which optimizer a `train` section asks for: torch-free, so the config loader refuses a
contradiction before any model loads."""

from __future__ import annotations

from difftrain.config.schema import TrainConfig
from difftrain.errors import ConfigError


def optimizer_name(cfg: TrainConfig, source: str | None = None) -> str:
    """`train.optimizer`, with the deprecated `train.use_8bit_adam: true` read as adamw_8bit.

    `use_8bit_adam: true` beside `optimizer: adamw` is the alias at work, not a contradiction:
    adamw is the default, and a run's resolved config.yaml lists every key, so a given
    `adamw` and a default one cannot be told apart. Only another optimizer contradicts it.
    """
    name = _chosen(cfg, source)
    if cfg.fsdp and name != "adamw":
        # FSDP2's parameters are DTensor shards: Prodigy would estimate its rate per shard,
        # and bitsandbytes' 8-bit state is not known to work on them.
        raise ConfigError(
            "train.optimizer",
            f"{name} is not checked with train.fsdp's sharded parameters; use adamw, or turn "
            "off train.fsdp",
            source,
        )
    return name


def _chosen(cfg: TrainConfig, source: str | None) -> str:
    if not cfg.use_8bit_adam:
        return cfg.optimizer
    if cfg.optimizer not in ("adamw", "adamw_8bit"):
        raise ConfigError(
            "train.use_8bit_adam",
            f"true asks for adamw_8bit but train.optimizer is {cfg.optimizer}; keep one "
            "(remove train.use_8bit_adam: it is deprecated, train.optimizer replaces it)",
            source,
        )
    return "adamw_8bit"
