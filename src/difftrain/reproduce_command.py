"""`difftrain reproduce RUN_DIR`: train a finished run again and compare it step by step.

    difftrain reproduce outputs/run                 # every step metrics.jsonl holds
    difftrain reproduce outputs/run --steps 5       # the first 5 (same schedule as the run)
    difftrain reproduce outputs/run --force         # compare even on other data or versions

The run's own `config.yaml` (the resolved config) is trained again in a temporary folder
(or `--output-dir`, kept), and its `metrics.jsonl` compared with the run's line by line: every
key but the timings must be equal. It prints "identical", or the first step and key that
differ with both values (exit 1).

A comparison only means something on the same inputs, so it is refused, naming what differs,
when today's data is not what `data_manifest.json` recorded (a file edited, gone or new),
the package versions in `env.json` differ from the ones installed, the hardware class differs
(CPU architecture, GPU model) or the run used another number of processes; `--force` runs it
anyway.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from pathlib import Path

from difftrain.errors import UserError
from difftrain.training.metrics import read_step_records

TIMING_KEYS = frozenset({"step_time_s", "elapsed_s", "compile_s"})
"""metrics.jsonl keys that measure the machine, not the run: never compared."""
VERSION_KEYS = ("difftrain", "torch", "diffusers", "transformers", "accelerate", "peft", "numpy")


def run_reproduce(
    run_dir: Path, *, steps: int | None, force: bool, output_dir: Path | None
) -> tuple[bool, str]:
    """Re-train `run_dir` and compare; returns (identical, the verdict line)."""
    from difftrain.config import load_config

    recorded, env = read_run(run_dir)
    last = max(recorded)
    if steps is not None and not min(recorded) <= steps <= last:
        raise UserError(
            f"--steps {steps}: {run_dir}/metrics.jsonl holds steps {min(recorded)} to {last}; "
            f"pass a number in that range"
        )
    compared = {step: record for step, record in recorded.items() if step <= (steps or last)}
    work = Path(tempfile.mkdtemp(prefix="difftrain-reproduce-")) if output_dir is None else None
    target = output_dir.resolve() if output_dir is not None else work / "run"
    try:
        cfg = load_config(run_dir / "config.yaml", [
            f"train.output_dir={target}", "train.resume_from_checkpoint=null",
            # A reproduction is a check: nothing to publish, track or resume from. None of
            # these changes the numbers (checkpoints and uploads draw no random numbers).
            "train.push_to_hub=false", "hub.push_checkpoints=false", "train.report_to=none",
            "checkpointing.every_steps=0",
        ])  # fmt: skip
        if not force:
            refuse_other_inputs(run_dir, cfg, env)
        from difftrain.training.trainer import train

        train(cfg, stop_after=max(compared), save_outputs=output_dir is not None)
        reproduced, _ = read_step_records(target / "metrics.jsonl")
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    difference = first_difference(compared, reproduced)
    if difference is None:
        return True, f"identical: {len(compared)} steps of {run_dir / 'metrics.jsonl'} reproduced"
    return False, difference


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """The run's metrics lines and env.json, refused in one line when it is not a run."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder; pass the output folder of a training run")
    for name in ("config.yaml", "env.json", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise UserError(
                f"{run_dir} has no {name}, so it is not a finished difftrain run; pass the "
                "folder a `difftrain train` wrote"
            )
    try:
        recorded, _ = read_step_records(run_dir / "metrics.jsonl")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{run_dir}/metrics.jsonl is unreadable ({exc})") from None
    if not recorded:
        raise UserError(f"{run_dir}/metrics.jsonl records no step; there is nothing to compare")
    try:
        env = json.loads((run_dir / "env.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{run_dir}/env.json is unreadable ({exc}); it is not a run") from None
    if not isinstance(env, dict):
        raise UserError(f"{run_dir}/env.json does not hold an object; it is not a run")
    return recorded, env


def refuse_other_inputs(run_dir: Path, cfg, env: dict) -> None:
    """One line naming what differs from the recorded run, unless nothing does."""
    fix = "restore what the run had, or pass --force to compare anyway"
    differences = data_differences(run_dir, cfg)
    if differences:
        raise UserError(f"the data differs from {run_dir}/data_manifest.json: {differences}; {fix}")
    versions = version_differences(env)
    if versions:
        raise UserError(f"package versions differ from {run_dir}/env.json: {versions}; {fix}")
    recorded, current = hardware_class(env), hardware_class(current_hardware())
    if recorded != current:
        raise UserError(f"the run trained on {recorded}, this machine is {current}; {fix}")
    processes = (env.get("processes") or {}).get("num_processes", 1)
    if processes != 1:
        raise UserError(
            f"the run trained on {processes} processes and reproduce trains on one; pass "
            "--force to compare anyway (equal up to float reduction order, not bit for bit)"
        )


def data_differences(run_dir: Path, cfg) -> str | None:
    from difftrain.data.folder import drop_unreadable, scan_image_folder
    from difftrain.data.manifest import MANIFEST_NAME, build_manifest, manifest_differences
    from difftrain.data.sources import scan_sources

    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        return f"the run has no {MANIFEST_NAME} (older than difftrain's data manifests)"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{MANIFEST_NAME} is unreadable ({exc})"
    skip_bad = cfg.data.on_bad_image == "skip"
    examples = scan_sources(cfg.data, check=not skip_bad)
    if skip_bad:
        examples, _ = drop_unreadable(examples)
    validation = []
    if cfg.validation.loss_every_steps:
        validation = scan_image_folder(cfg.validation.loss_dir, cfg.data.caption_column)
    problems = manifest_differences(recorded, build_manifest(examples, cfg.data, validation))
    return ", ".join(problems) or None


def version_differences(env: dict) -> str | None:
    from importlib import metadata

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    recorded = env.get("packages") if isinstance(env.get("packages"), dict) else {}
    changed = [
        f"{name} {recorded.get(name)} then, {installed(name)} now"
        for name in VERSION_KEYS
        if recorded.get(name) != installed(name)
    ]
    python = platform.python_version()
    if env.get("python") != python:
        changed.insert(0, f"python {env.get('python')} then, {python} now")
    return ", ".join(changed) or None


def current_hardware() -> dict:
    import torch

    gpus = []
    if torch.cuda.is_available():
        gpus = [{"name": torch.cuda.get_device_name(i)} for i in range(torch.cuda.device_count())]
    return {"platform": platform.platform(), "gpus": gpus}


def hardware_class(env: dict) -> str:
    """The kind of machine a run's numbers depend on: the GPU model, else the CPU's
    architecture (kernels differ between them; two machines of one class agree)."""
    gpus = [str(g.get("name")) for g in env.get("gpus") or [] if isinstance(g, dict)]
    if gpus:
        return f"{len(gpus)} x {gpus[0]}" if len(set(gpus)) == 1 else ", ".join(gpus)
    machine = str(env.get("platform", "")).split("-")
    architecture = next((part for part in machine if part in _ARCHITECTURES), "unknown")
    return f"a CPU ({architecture})"


_ARCHITECTURES = {"x86_64", "aarch64", "arm64", "AMD64", "ppc64le", "s390x", "i686"}


def first_difference(recorded: dict[int, dict], reproduced: dict[int, dict]) -> str | None:
    """The first step and key whose values differ, in words; None when all are equal."""
    for step in sorted(recorded):
        old, new = recorded[step], reproduced.get(step)
        if new is None:
            return f"the reproduction has no step {step}; the run has it"
        for key in sorted((set(old) | set(new)) - TIMING_KEYS):
            if old.get(key) != new.get(key):
                return (
                    f"differs at step {step}: {key} {old.get(key)!r} in the run, "
                    f"{new.get(key)!r} reproduced"
                )
    return None
