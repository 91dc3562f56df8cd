"""The arguments of the longer subcommands, kept apart so cli.py reads as the command table.

Plain argparse only: building the parser must not import torch (`difftrain --help` is fast).
"""

from __future__ import annotations

import argparse


def add_run_options(sub: argparse.ArgumentParser) -> None:
    """--config, --output-dir, --set, --deterministic, --overwrite (train, validate-config)."""
    sub.add_argument("--config", required=True, help="YAML config file")
    sub.add_argument("--output-dir", help="output folder (overrides train.output_dir)")
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=10 (repeatable)",
    )
    sub.add_argument(
        "--deterministic",
        action="store_true",
        help="seed everything and use deterministic kernels (sets train.deterministic)",
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different run already in the output folder",
    )


def add_train_options(sub: argparse.ArgumentParser) -> None:
    """What only `train` takes: resume, processes, allowed config changes."""
    sub.add_argument(
        "--resume-from-checkpoint",
        metavar="PATH|latest",
        help="continue from a checkpoint-N folder, or the newest one (sets "
        "train.resume_from_checkpoint)",
    )
    sub.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="train in N processes on this machine (one per GPU; CPU processes with gloo "
        "when there is no GPU); see docs/distributed.md for accelerate launch and torchrun",
    )
    sub.add_argument(
        "--allow-config-change",
        action="append",
        default=[],
        metavar="KEY[,KEY...]",
        help="resume even though these config keys differ from the checkpoint's",
    )


def add_sample_options(sub: argparse.ArgumentParser) -> None:
    """`sample`: the model, prompt, output and generation settings."""
    sub.add_argument(
        "--model", required=True, help="pipeline folder (e.g. a training output) or hub id"
    )
    sub.add_argument("--prompt", required=True)
    sub.add_argument(
        "--output", default="sample.png", help="image file to write (.png, .jpg, .webp ...)"
    )
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--steps", type=int, default=25, help="inference steps")
    sub.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance (Flux: its distilled-guidance input); default: the "
        "pipeline's own (SD 7.5, SDXL 5, SD3 7, Flux 3.5)",
    )
    sub.add_argument("--height", type=int, help="multiple of 8 (default: the model's size)")
    sub.add_argument("--width", type=int, help="multiple of 8 (default: the model's size)")
    sub.add_argument(
        "--lora", help="folder with pytorch_lora_weights.safetensors (or that file) to apply"
    )
    sub.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_report_options(sub: argparse.ArgumentParser) -> None:
    """`report`: a run folder, or the smoke checklist's --ci-dir / --template."""
    sub.add_argument(
        "run_dir",
        nargs="?",
        metavar="RUN_DIR",
        help="a training output folder: write its report.html and link it from its README.md",
    )
    sub.add_argument("--ci-dir", help="folder the test runs wrote into (default: _ci_tmp)")
    sub.add_argument("--template", help="checklist template (default: docs/mvp_smoke_checklist.md)")


def add_reproduce_options(sub: argparse.ArgumentParser) -> None:
    """`reproduce`: the run, how many steps, --force, where to keep it."""
    sub.add_argument("run_dir", metavar="RUN_DIR", help="the output folder of a training run")
    sub.add_argument("--steps", type=int, metavar="N", help="compare the first N steps only")
    sub.add_argument(
        "--force",
        action="store_true",
        help="compare even when the data, package versions or hardware differ from the run's",
    )
    sub.add_argument("--output-dir", help="keep the reproduction here (default: a temporary "
                     "folder, removed afterwards)")  # fmt: skip


def add_export_options(sub: argparse.ArgumentParser) -> None:
    """`export`: the run, the format and the file to write."""
    sub.add_argument("run_dir", metavar="RUN_DIR", help="the output folder of a full fine-tune")
    # Checked by the command, not argparse: a bad value is then one `difftrain: error:` line.
    sub.add_argument("--format", default="single-file", metavar="{single-file}",
                     help="single-file: one .safetensors in the original key layout")  # fmt: skip
    sub.add_argument("--output", required=True, help="the .safetensors file to write")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --output")
