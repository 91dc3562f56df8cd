"""Resuming: which checkpoint to continue from, and whether the config still matches it.

A resumed run must be the run that would have happened without the interruption, so a config
that changes anything that shapes training is refused (naming the keys) unless the user allows
those keys explicitly. Settings that only shape the outputs may change freely.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from difftrain.config import Config, config_to_dict
from difftrain.errors import UserError
from difftrain.training.checkpoint import CHECKPOINT_PATTERN, is_complete, list_checkpoints
from difftrain.training.run_dir import differing_keys

logger = logging.getLogger("difftrain")

LATEST = "latest"
# Keys (or key prefixes ending in ".") that may differ between a checkpoint and its resume.
CHANGEABLE_ON_RESUME = (
    "train.max_steps",
    "train.resume_from_checkpoint",
    "train.output_dir",
    "train.on_nonfinite",
    "train.max_nonfinite_steps",
    "data.num_workers",  # augmentation is keyed per sample, so workers do not change the data
    "checkpointing.",
    "validation.",
)


def find_resume_checkpoint(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder `spec` names (`latest` or a path), or None to start fresh."""
    if spec is None:
        return None
    if spec == LATEST:
        # Newest first; the sha256 of every file is checked once, here, before trusting it.
        for _, path in reversed(list_checkpoints(output_dir)):
            if is_complete(path, verify_hashes=True):
                return path.resolve()
            logger.warning("%s does not match its manifest: skipped", path)
        logger.info("no complete checkpoint in %s: starting fresh", output_dir)
        return None
    path = Path(spec).expanduser()
    if not path.exists() and (output_dir / spec).exists():
        path = output_dir / spec  # `checkpoint-4` relative to the run's own folder
    complete = path.is_dir() and is_complete(path, verify_hashes=True)
    if not (CHECKPOINT_PATTERN.match(path.name) and complete):
        raise UserError(
            f"train.resume_from_checkpoint: {spec} is not a complete checkpoint (a checkpoint-N "
            "folder with a valid manifest.json); pass one of those, or `latest`"
        )
    return path.resolve()


def drop_checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Remove `checkpoint-N` folders with N > `step`; returns what went."""
    doomed = [
        path
        for path in output_dir.glob("checkpoint-*")
        if (match := CHECKPOINT_PATTERN.match(path.name)) and int(match.group(1)) > step
    ]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def check_resume_config(checkpoint: Path, cfg: Config, allowed: tuple[str, ...] = ()) -> None:
    """Refuse to resume with a config that changes training, unless `allowed` names the keys."""
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8")) or {}
    changed = [
        key
        for key in differing_keys(saved, config_to_dict(cfg))
        if not _changeable(key) and key not in allowed
    ]
    if changed:
        keys = ",".join(changed)
        raise UserError(
            f"cannot resume from {checkpoint}: the config differs in {', '.join(changed)}; "
            f"restore those values, or pass --allow-config-change {keys} to resume anyway"
        )


def _changeable(key: str) -> bool:
    return any(
        key.startswith(rule) if rule.endswith(".") else key == rule for rule in CHANGEABLE_ON_RESUME
    )
