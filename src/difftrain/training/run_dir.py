"""The output folder of a run: claim it safely, and write what describes the run.

difftrain deletes only what it wrote itself, in a folder that records a difftrain run, while
it holds that folder's lock. A folder is written into when it is new, empty, or records the
same run (the same resolved config). A folder holding a different run, a pipeline difftrain
did not write, or anything else is refused unless the user says `--overwrite`; and in a
folder that records no run, even `--overwrite` deletes and replaces nothing: it is refused
when the folder already has a name difftrain writes. An output folder that is,
contains or sits inside the training data, the base model or a model cache is always
refused; so is a folder where a name difftrain writes is a symbolic link.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from difftrain.config import Config, config_to_dict, dump_config
from difftrain.errors import UserError
from difftrain.io import OLD_SUFFIX, TEMP_SUFFIX, atomic_write_json
from difftrain.run_folder import RUN_MARKER, records_a_run
from difftrain.training.checkpoint import CHECKPOINT_PATTERN
from difftrain.training.output_lock import LOCK_FILE, OutputLock

# Left by a process killed mid-write; never part of a valid run, and never a user's name.
STALE_PARTIALS = (
    ".checkpoint-*.partial", ".checkpoint-*.deleting", f".*{TEMP_SUFFIX}", f".*{OLD_SUFFIX}"
)  # fmt: skip
TRAINING_ARTIFACTS = (
    "metrics.jsonl", "skipped_images.txt", "buckets.json", "logs/wandb-run-id",
    "data_manifest.json", "timings.json", "report.html", "report",
)  # fmt: skip
FINAL_OUTPUTS = (
    "model_index.json",  # first: without it the folder no longer looks like a pipeline
    "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
    "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights_kohya.safetensors", "README.md",
)  # fmt: skip
OWNED_NAMES = (
    *FINAL_OUTPUTS, "config.yaml", "env.json", *TRAINING_ARTIFACTS, "samples",
    "logs", RUN_MARKER, LOCK_FILE,
)  # fmt: skip
"""Top-level names a run writes (or, in its own folder, replaces); `checkpoint-N` too."""
HOW_TO_REPLACE = "pass --overwrite to replace it, or choose another --output-dir"


def claim_output_dir(
    output_dir: Path, cfg: Config, *, overwrite: bool, training: bool, resuming: bool = False
) -> OutputLock:
    """Check the folder, lock it, mark it as a run and clear what the new run replaces.

    `training` is False for validate-config, which only writes config.yaml and env.json.
    `resuming` (in the checkpoint's own folder) keeps the run's artifacts. Every check runs
    before anything is written, so a refused folder is left exactly as it was. The caller
    releases the returned lock when the run ends.
    """
    is_run = check_output_dir(
        output_dir, cfg, overwrite=overwrite, training=training, resuming=resuming
    )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--output-dir {output_dir}: cannot create it ({exc.strerror or exc}); choose a "
            "folder you can write to"
        ) from None
    lock = OutputLock(output_dir).acquire()
    try:
        if not (output_dir / RUN_MARKER).exists():
            from difftrain import __version__

            atomic_write_json(output_dir / RUN_MARKER, {"difftrain": __version__})
        if is_run:
            _remove(output_dir, STALE_PARTIALS)
            if training and not resuming:
                _remove_training_artifacts(output_dir)
                if overwrite:
                    _remove(output_dir, FINAL_OUTPUTS)
    except OSError as exc:
        lock.release()
        raise UserError(
            f"--output-dir {output_dir}: cannot write there ({exc.strerror or exc}); choose a "
            "folder you can write to"
        ) from None
    except BaseException:
        lock.release()
        raise
    return lock


def check_output_dir(
    output_dir: Path, cfg: Config, *, overwrite: bool, training: bool, resuming: bool
) -> bool:
    """Refuse a folder the run must not use (writing nothing); True when it records a run."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; choose a folder")
    _refuse_overlap_with_inputs(output_dir, cfg)
    if not output_dir.is_dir():
        return False
    _refuse_links(output_dir)
    is_run = records_a_run(output_dir)
    if is_run:
        if not (overwrite or resuming):
            _refuse_other_runs(output_dir, cfg, training=training)
        return True
    if (output_dir / "model_index.json").exists():
        raise UserError(
            f"--output-dir {output_dir} holds a pipeline difftrain did not write; choose "
            "another --output-dir (difftrain never replaces files it did not write)"
        )
    others = [p for p in output_dir.iterdir() if not (p.name == LOCK_FILE and p.is_file())]
    if others and not overwrite:
        raise UserError(
            f"--output-dir {output_dir} is not empty and holds no difftrain run; choose a new "
            "or empty folder, or pass --overwrite to write into it (nothing in it is deleted)"
        )
    taken = sorted(p.name for p in others if _owned(p.name))
    if taken:
        raise UserError(
            f"--output-dir {output_dir} holds no difftrain run but has {', '.join(taken)}, "
            "which a run writes; move them, or choose another --output-dir"
        )
    return False


def _owned(name: str) -> bool:
    return name in OWNED_NAMES or CHECKPOINT_PATTERN.match(name) is not None


def _refuse_links(output_dir: Path) -> None:
    """difftrain writes and deletes under the names it owns: never through a link out."""
    candidates = [p for p in output_dir.iterdir() if _owned(p.name)]
    for folder in ("samples", "logs"):
        if (output_dir / folder).is_dir() and not (output_dir / folder).is_symlink():
            candidates += list((output_dir / folder).iterdir())
    for path in candidates:
        if path.is_symlink():
            raise UserError(
                f"--output-dir {output_dir}: {path.relative_to(output_dir)} is a symbolic link; "
                "difftrain writes and deletes there and never through a link, so remove it"
            )


def _refuse_overlap_with_inputs(output_dir: Path, cfg: Config) -> None:
    """The run writes (and with --overwrite deletes) in its folder: never among its inputs,
    and never in a model cache (a builtin model or a hub snapshot is someone's base model)."""
    from huggingface_hub import constants

    from difftrain.models.tiny import builtin_cache_dir

    inputs = {"data.train_dir": cfg.data.train_dir, "validation.loss_dir": cfg.validation.loss_dir}
    if Path(cfg.model.pretrained).exists():  # a folder, or a single-file checkpoint
        inputs["model.pretrained"] = cfg.model.pretrained
    single_file_config = cfg.model.single_file_config
    if single_file_config and Path(single_file_config).expanduser().is_dir():
        inputs["model.single_file_config"] = single_file_config
    if cfg.data.dataset and Path(cfg.data.dataset).expanduser().is_dir():
        inputs["data.dataset"] = cfg.data.dataset
    for index, entry in enumerate(cfg.data.sources):
        inputs[f"data.sources[{index}].train_dir"] = entry.train_dir
    if cfg.data.cache_dir:
        inputs["data.cache_dir"] = cfg.data.cache_dir
    inputs["the model cache (DIFFTRAIN_CACHE)"] = str(builtin_cache_dir())
    inputs["the Hugging Face cache"] = str(constants.HF_HUB_CACHE)
    out = output_dir.resolve()
    for key, value in inputs.items():
        if not value:
            continue
        folder = Path(value).resolve()
        if out == folder or folder.is_relative_to(out) or out.is_relative_to(folder):
            relation = (
                "is" if out == folder else "contains" if folder.is_relative_to(out) else "is inside"
            )
            raise UserError(
                f"--output-dir {output_dir} {relation} {key} {value}: the run would write among "
                "its own inputs; choose an output folder outside it"
            )


def _refuse_other_runs(output_dir: Path, cfg: Config, *, training: bool) -> None:
    changed = run_differences(output_dir, cfg)
    if changed:
        raise UserError(
            f"--output-dir {output_dir} holds a different run (differs in "
            f"{', '.join(changed)}); {HOW_TO_REPLACE}"
        )
    done = [p.name for p in output_dir.glob("checkpoint-*")]
    done += ["metrics.jsonl"] if (output_dir / "metrics.jsonl").exists() else []
    if training and done and cfg.train.resume_from_checkpoint != "latest":
        raise UserError(
            f"--output-dir {output_dir} already holds a trained run ({', '.join(sorted(done))}); "
            f"{HOW_TO_REPLACE}, or continue it with --resume-from-checkpoint latest"
        )


def run_differences(output_dir: Path, cfg: Config) -> list[str] | None:
    """Keys in which the run recorded in `output_dir/config.yaml` differs from `cfg`.

    None when the folder records no config. Whether a run was started with
    --resume-from-checkpoint does not make it another run.
    """
    existing_config = output_dir / "config.yaml"
    if not existing_config.is_file():
        return None
    try:
        old = yaml.safe_load(existing_config.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        old = {}
    if not isinstance(old, dict):
        old = {}
    return [
        key
        for key in differing_keys(old, config_to_dict(cfg))
        if key != "train.resume_from_checkpoint"
    ]


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


def _remove_training_artifacts(output_dir: Path) -> None:
    """What a fresh start replaces: metrics, checkpoints, sample grids, tracker files."""
    _remove(output_dir, TRAINING_ARTIFACTS)
    for path in output_dir.glob("checkpoint-*"):
        if CHECKPOINT_PATTERN.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    samples = output_dir / "samples"
    tensorboard = output_dir / "logs" / "tensorboard"
    for folder, pattern in ((samples, "step-*.png"), (tensorboard, "events.out.tfevents.*")):
        if folder.is_dir() and not folder.is_symlink():
            for path in folder.glob(pattern):
                if not path.is_symlink():
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def _remove(output_dir: Path, patterns: tuple[str, ...]) -> None:
    """Delete what `patterns` match in `output_dir`, never following a link (a link itself,
    which `_refuse_links` keeps out of the owned names, is left alone)."""
    for pattern in patterns:
        for path in output_dir.glob(pattern):
            if path.is_symlink() or any(
                parent.is_symlink() for parent in _between(output_dir, path)
            ):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _between(root: Path, path: Path) -> list[Path]:
    """The folders from `root` (excluded) down to `path`'s parent."""
    return [
        root / Path(*path.relative_to(root).parts[:i])
        for i in range(1, len(path.relative_to(root).parts))
    ]


def write_run_description(
    output_dir: Path, cfg: Config, processes: dict[str, object] | None = None
) -> dict[str, object]:
    """`config.yaml` (resolved) and `env.json` (environment snapshot, and how many processes
    train); returns the snapshot."""
    from difftrain.environment import collect_environment

    dump_config(cfg, output_dir / "config.yaml")
    environment = collect_environment()
    if processes is not None:
        environment["processes"] = processes
    atomic_write_json(output_dir / "env.json", environment)
    return environment
