"""The output folder of a run: claim it safely, and write what describes the run.

A folder is only written into when it is new, empty, or holds the same run (the same resolved
config). A folder holding a different run, or a pipeline difftrain did not write, is refused
unless the user says `--overwrite`, so nothing already on disk is lost by accident.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from difftrain.config import Config, config_to_dict, dump_config
from difftrain.errors import UserError
from difftrain.io import atomic_write_json

TRAINING_ARTIFACTS = ("metrics.jsonl", "checkpoint-*", "samples", "skipped_images.txt")
# Left by a process killed mid-write; never part of a valid run, so always safe to remove.
STALE_PARTIALS = (".checkpoint-*.partial", ".final.*", ".*.old")


def prepare_output_dir(
    output_dir: Path, cfg: Config, *, overwrite: bool, training: bool, resuming: bool = False
) -> None:
    """Refuse a folder that holds something else; clear old training artifacts when allowed.

    `training` is False for validate-config, which only writes config.yaml and env.json.
    `resuming` keeps the run's artifacts: the checkpoint's config was checked already.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; choose a folder")
    if output_dir.is_dir() and not overwrite and not resuming:
        _refuse_other_runs(output_dir, cfg, training=training)
    doomed = STALE_PARTIALS + (TRAINING_ARTIFACTS if training and not resuming else ())
    for pattern in doomed:
        for path in output_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def run_differences(output_dir: Path, cfg: Config) -> list[str] | None:
    """Keys in which the run recorded in `output_dir/config.yaml` differs from `cfg`.

    None when the folder records no run. Whether a run was started with
    --resume-from-checkpoint does not make it another run.
    """
    existing_config = output_dir / "config.yaml"
    if not existing_config.is_file():
        return None
    try:
        old = yaml.safe_load(existing_config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        old = {}
    if not isinstance(old, dict):
        old = {}
    return [
        key
        for key in differing_keys(old, config_to_dict(cfg))
        if key != "train.resume_from_checkpoint"
    ]


def _refuse_other_runs(output_dir: Path, cfg: Config, *, training: bool) -> None:
    how = "pass --overwrite to replace it, or choose another --output-dir"
    changed = run_differences(output_dir, cfg)
    if changed is not None:
        if changed:
            raise UserError(
                f"--output-dir {output_dir} holds a different run (differs in "
                f"{', '.join(changed)}); {how}"
            )
        done = [p.name for p in output_dir.glob("checkpoint-*")]
        done += ["metrics.jsonl"] if (output_dir / "metrics.jsonl").exists() else []
        if training and done and cfg.train.resume_from_checkpoint != "latest":
            artifacts = ", ".join(sorted(done))
            raise UserError(
                f"--output-dir {output_dir} already holds a trained run ({artifacts}); "
                f"{how}, or continue it with --resume-from-checkpoint latest"
            )
    elif (output_dir / "model_index.json").exists():
        raise UserError(
            f"--output-dir {output_dir} holds a pipeline difftrain did not write; {how}"
        )


def differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config mappings."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def write_run_description(output_dir: Path, cfg: Config) -> dict[str, object]:
    """`config.yaml` (resolved) and `env.json` (environment snapshot); returns the snapshot."""
    from difftrain.environment import collect_environment

    dump_config(cfg, output_dir / "config.yaml")
    environment = collect_environment()
    atomic_write_json(output_dir / "env.json", environment)
    return environment
