"""Resuming: which checkpoint to continue from, and whether the config still matches it.

A resumed run must be the run that would have happened without the interruption, so a config
that changes anything that shapes training is refused (naming the keys) unless the user allows
those keys explicitly. Settings that only shape the outputs may change freely.
"""

from __future__ import annotations

import json
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
from difftrain.training.state import STATE_FILE

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
    # A cached run trains on what an uncached run would: the cache may come and go.
    "data.cache_latents",
    "data.cache_text_embeddings",
    "data.cache_dir",
    "checkpointing.",
    "validation.",
    # Where and in which formats the results go, not what trains.
    "train.report_to",
    "train.push_to_hub",
    "hub.",
    "lora.export_formats",
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
                for skipped in failed:  # said only when the run goes on: else the error says it
                    logger.warning("skipped %s", skipped)
                return path.resolve()
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


def check_resume_config(
    checkpoint: Path, cfg: Config, allowed: tuple[str, ...] = (), *, num_processes: int = 1
) -> None:
    """Refuse to resume with a config that changes training, unless `allowed` names the keys.

    On another number of processes, `train.batch_size` and `train.gradient_accumulation_steps`
    may change as long as the global batch (batch x accumulation x processes) stays the same:
    every sample draws its randomness by its stream position, so that is the same run.
    """
    saved = _with_defaults(_saved_config(checkpoint))
    changed = [
        key
        for key in differing_keys(saved, config_to_dict(cfg))
        if not _changeable(key) and key not in allowed
    ]
    if _same_global_batch(checkpoint, saved, cfg, num_processes) and not (
        # Bucketed batches are blocks of batch_size x processes: another split is another plan.
        cfg.data.buckets and not _same_block(checkpoint, saved, cfg, num_processes)
    ):
        changed = [key for key in changed if key not in PER_PROCESS_BATCH_KEYS]
    elif not set(PER_PROCESS_BATCH_KEYS) & set(changed + list(allowed)):
        _refuse_other_process_count(checkpoint, saved, cfg, num_processes)
    if changed:
        keys = ",".join(changed)
        raise UserError(
            f"cannot resume from {checkpoint}: the config differs in {', '.join(changed)}; "
            f"restore those values, or pass --allow-config-change {keys} to resume anyway"
        )


def _saved_config(checkpoint: Path) -> dict:
    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise UserError(
            f"{checkpoint / 'config.yaml'} is not a config difftrain wrote; resume from "
            "another checkpoint"
        )
    return saved


PER_PROCESS_BATCH_KEYS = ("train.batch_size", "train.gradient_accumulation_steps")


def _saved_batch(checkpoint: Path, saved: dict) -> tuple[int, int, int] | None:
    """(batch_size, gradient_accumulation_steps, processes) of the run that wrote it."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        train = saved["train"]
        return (
            int(train["batch_size"]), int(train["gradient_accumulation_steps"]),
            int(state.get("num_processes", 1)),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refuse_other_process_count(
    checkpoint: Path, saved: dict, cfg: Config, num_processes: int
) -> None:
    """The config is unchanged but the process count is not, so each step would take another
    number of images (and bucket batches another block): no config key says so, this does."""
    before = _saved_batch(checkpoint, saved)
    if before is None or before[2] == num_processes:
        return
    batch, accumulation, processes = before
    raise UserError(
        f"cannot resume from {checkpoint}: it was trained on {processes} process(es) x batch "
        f"{batch} x {accumulation} accumulation = {batch * accumulation * processes} images per "
        f"step, this run has {num_processes} process(es); set train.batch_size (or "
        "train.gradient_accumulation_steps) so the images per step stay the same, or pass "
        "--allow-config-change train.batch_size to resume anyway"
    )


def _same_global_batch(checkpoint: Path, saved: dict, cfg: Config, num_processes: int) -> bool:
    before = _saved_batch(checkpoint, saved)
    now = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * num_processes
    return before is not None and before[0] * before[1] * before[2] == now


def _same_block(checkpoint: Path, saved: dict, cfg: Config, num_processes: int) -> bool:
    before = _saved_batch(checkpoint, saved)
    return before is not None and before[0] * before[2] == cfg.train.batch_size * num_processes


def _with_defaults(saved: dict) -> dict:
    """A checkpoint's config with keys added since it was written at their defaults (their
    default is what that run did), so only real changes count."""
    from difftrain.config import Config

    def fill(defaults: dict, values: dict) -> dict:
        merged = dict(defaults)
        for key, value in values.items():
            both = isinstance(value, dict) and isinstance(defaults.get(key), dict)
            merged[key] = fill(defaults[key], value) if both else value
        return merged

    return fill(config_to_dict(Config()), saved)


def _changeable(key: str) -> bool:
    return any(
        key.startswith(rule) if rule.endswith(".") else key == rule for rule in CHANGEABLE_ON_RESUME
    )
