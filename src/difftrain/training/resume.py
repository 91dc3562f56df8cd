"""Resuming: which checkpoint to continue from, and whether the config still matches it.

A resumed run must be the run that would have happened without the interruption, so a config
that changes anything that shapes training is refused (naming the keys) unless the user allows
those keys explicitly. Settings that only shape the outputs may change freely.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from difftrain.config import Config, config_to_dict
from difftrain.errors import UserError
from difftrain.training.checkpoint import (
    CHECKPOINT_PATTERN,
    checkpoint_folders,
    delete_checkpoint,
    set_aside,
    verify_checkpoint,
)
from difftrain.training.metrics import truncate_metrics
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
    """The checkpoint folder `spec` names (`latest` or a path), or None to start fresh.

    `latest` with no `checkpoint-N` folder at all starts fresh; with some, but none that
    passes verification, it is refused (listing why each failed) rather than starting over
    and replacing the run's files.
    """
    if spec is None:
        return None
    if spec == LATEST:
        failed = []
        # Newest first; the sha256 of every file is checked once, here, before trusting it.
        for _, path in reversed(checkpoint_folders(output_dir)):
            reason = verify_checkpoint(path, verify_hashes=True)
            if reason is None:
                return path.resolve()
            logger.warning("%s cannot be resumed from (%s): skipped", path, reason)
            failed.append(f"{path.name}: {reason}")
        if failed:
            raise UserError(
                f"no checkpoint in {output_dir} passes verification ({'; '.join(failed)}); "
                "resume from a checkpoint-N path that is intact, or move the folders aside "
                "and start again"
            )
        logger.info("no checkpoint in %s: starting fresh", output_dir)
        return None
    path = Path(spec).expanduser()
    if not path.exists() and (output_dir / spec).exists():
        path = output_dir / spec  # `checkpoint-4` relative to the run's own folder
    if not CHECKPOINT_PATTERN.match(path.name) or not path.is_dir():
        reason = "not a checkpoint-N folder"
    else:
        reason = verify_checkpoint(path, verify_hashes=True)
    if reason is not None:
        raise UserError(
            f"train.resume_from_checkpoint: {spec} is not a complete checkpoint ({reason}); "
            "pass a checkpoint-N folder with a valid manifest.json, or `latest`"
        )
    return path.resolve()


def continue_in_place(output_dir: Path, step: int) -> None:
    """Prepare the checkpoint's own folder for the steps after `step`.

    Those steps are about to be trained again: their metrics lines go, and so do later
    checkpoints (a branch this resume abandons), except corrupt ones, which are renamed
    aside (`checkpoint-N.corrupt`) and never deleted.
    """
    truncate_metrics(output_dir / "metrics.jsonl", step)
    for later_step, path in checkpoint_folders(output_dir):
        if later_step <= step:
            continue
        if verify_checkpoint(path, verify_hashes=True) is None:
            delete_checkpoint(path)
            logger.warning("removed %s: it follows the checkpoint resumed from", path)
        else:
            logger.warning("moved corrupt %s aside to %s", path, set_aside(path).name)


def check_resume_steps(checkpoint: Path, max_steps: int) -> None:
    """A checkpoint past `train.max_steps` would publish weights the config does not describe."""
    step = checkpoint_step(checkpoint)
    if max_steps < step:
        raise UserError(
            f"train.max_steps is {max_steps} but {checkpoint.name} is at step {step}; set "
            f"train.max_steps to {step} or more, or resume from an earlier checkpoint"
        )


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
