"""`difftrain quickstart`: the whole job end to end on the built-in tiny model.

Makes a captioned image folder (and a small held-out one for the validation loss), trains
the random-weight tiny pipeline on it for a few steps (configs/quickstart.yaml), samples an
image from the result and writes the run's report (`run/report.html`: loss and validation
curves, the validation grid, config, data), so a newcomer sees more than a grid of noise.
Everything is local: no download, a couple of minutes at most on a laptop CPU.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from difftrain.config import resolve_run_config
from difftrain.data.dummy import make_dummy_imagefolder
from difftrain.errors import UserError
from difftrain.training.run_dir import run_differences

QUICKSTART_PROMPT = "a red circle on a blue background"


def quickstart_config_path() -> Path:
    return Path(str(resources.files("difftrain") / "presets" / "quickstart.yaml"))


def check_quickstart_dir(output_dir: Path) -> Path:
    """The quick start's folder, made absolute; refused (writing nothing) when it, or the
    nearest folder above it that exists, is a file, or that folder cannot be written."""
    name, output_dir = str(output_dir), output_dir.expanduser().resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {name} is a file; choose a folder")
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--output-dir {name}: {existing} is a file, not a folder; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {name}: cannot write into {existing}; choose a folder")
    return output_dir


def run_quickstart(output_dir: Path, max_steps: int = 30, model: str = "builtin:tiny") -> Path:
    from difftrain.sampling import generate, load_pipeline
    from difftrain.training.trainer import train

    output_dir = check_quickstart_dir(output_dir)
    data_dir, held_out = output_dir / "data", output_dir / "held_out"
    every = max(1, max_steps // 3)  # three validation losses along the run
    overrides = [
        f"data.train_dir={data_dir}",
        f"train.max_steps={max_steps}",
        f"model.pretrained={model}",
        # A validation-loss curve for the report (cheap: a few images at fixed timesteps;
        # more grids along the way would cost seconds and, from a random model, show noise).
        f"validation.loss_dir={held_out}",
        f"validation.loss_every_steps={every}",
    ]
    cfg = resolve_run_config(
        quickstart_config_path(), overrides, output_dir=str(output_dir / "run")
    )
    make_dummy_imagefolder(data_dir, num_images=16, image_size=cfg.data.resolution)
    make_dummy_imagefolder(held_out, num_images=4, image_size=cfg.data.resolution, seed=1)
    # Re-running the quick start replaces its own earlier run, and nothing else.
    result = train(cfg, overwrite=run_differences(output_dir / "run", cfg) == [])

    pipeline = load_pipeline(result.output_dir)
    (image,) = generate(
        pipeline, [QUICKSTART_PROMPT], seed=0, num_inference_steps=20, guidance_scale=3.0
    )
    sample = output_dir / "sample.png"
    image.save(sample)
    print(
        f"\nquickstart done: {result.steps} steps, loss {result.losses[0]:.4f} -> "
        f"{result.losses[-1]:.4f}\n"
        f"  trained pipeline: {result.output_dir}\n"
        f"  validation grid:  {result.output_dir / 'samples'}\n"
        f"  sample image:     {sample}\n"
        f"  run report:       {quickstart_report(result.output_dir)}\n"
        f"  load it with:     {type(pipeline).__name__}.from_pretrained("
        f"{str(result.output_dir)!r})"
    )
    return output_dir


def quickstart_report(run_dir: Path) -> str:
    """The report's path, or why there is none: a missing matplotlib must not fail a quick
    start whose training worked (the line names the install command)."""
    from difftrain.report.run_report import write_run_report

    try:
        return str(write_run_report(run_dir).html)
    except UserError as exc:
        return f"not written: {exc}"
