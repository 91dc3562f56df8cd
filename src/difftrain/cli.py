"""The `difftrain` command line: one thin function per subcommand.

    difftrain train --config configs/quickstart.yaml --output-dir runs/x --set train.max_steps=10
    difftrain quickstart

Nothing heavy is imported at module level: `difftrain --help` answers without torch.
Errors the user can fix print one line on stderr and exit 2; a training run that fails
(e.g. a non-finite loss) exits 1; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from difftrain import __version__
from difftrain.cli_options import (
    add_export_options,
    add_report_options,
    add_reproduce_options,
    add_run_options,
    add_sample_options,
    add_train_options,
)
from difftrain.errors import TrainingStopped, UserError
from difftrain.quiet import quiet_third_party


def cmd_train(args: argparse.Namespace) -> int:
    from difftrain.config import resolve_run_config
    from difftrain.launch import launch_processes, process_rank

    if args.num_processes is not None and not os.environ.get("DIFFTRAIN_LAUNCHED"):
        return launch_processes(args.num_processes, without_option(args.argv, "--num-processes"))
    from difftrain.training.trainer import train

    overrides = list(args.set)
    if args.resume_from_checkpoint:
        overrides.append(f"train.resume_from_checkpoint={args.resume_from_checkpoint}")
    cfg = resolve_run_config(
        args.config, overrides, output_dir=args.output_dir, deterministic=args.deterministic
    )
    allowed = tuple(key for item in args.allow_config_change for key in item.split(",") if key)
    result = train(cfg, overwrite=args.overwrite, allow_config_change=allowed)
    final = f"; final loss {result.losses[-1]:.6f}" if result.losses else ""
    if process_rank() == 0:
        print(f"trained {result.steps} steps{final}; outputs in {result.output_dir}")
    return 0


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` (after the subcommand) without `option VALUE` / `option=VALUE`."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            kept.append(item)
    return kept


def cmd_validate_config(args: argparse.Namespace) -> int:
    from difftrain.config import resolve_run_config
    from difftrain.training.run_dir import claim_output_dir, write_run_description

    cfg = resolve_run_config(
        args.config, args.set, output_dir=args.output_dir, deterministic=args.deterministic
    )
    print(f"config OK: {args.config}")
    if args.output_dir is not None:
        output_dir = Path(cfg.train.output_dir)
        with claim_output_dir(output_dir, cfg, overwrite=args.overwrite, training=False):
            if cfg.train.deterministic:
                from difftrain.training.determinism import configure_determinism

                configure_determinism(True)  # so env.json records the flags the run will use
            write_run_description(output_dir, cfg)
        print(f"wrote {output_dir / 'config.yaml'} and {output_dir / 'env.json'}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from difftrain.cache_command import cmd_cache as run_cache_command

    return run_cache_command(args)


def cmd_make_dummy_data(args: argparse.Namespace) -> int:
    from difftrain.data.dummy import make_dummy_imagefolder

    path = make_dummy_imagefolder(args.output_dir, args.num_images, args.image_size, args.seed)
    print(f"wrote {args.num_images} images of {args.image_size} px with captions to {path}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from difftrain.models.tiny import save_tiny_pipeline

    output_dir = Path(args.output_dir).resolve()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(
            f"--output-dir {args.output_dir} is not empty; choose a new or empty folder"
        )
    path = save_tiny_pipeline(output_dir, args.size, args.seed)
    print(f"wrote a random-weight {args.size} pipeline to {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from difftrain.sample_command import run_sample

    output = run_sample(args)
    print(f"wrote {output}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from difftrain.environment import collect_environment

    print(json.dumps(collect_environment(), indent=2))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from difftrain.quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), max_steps=args.steps, model=args.model)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.run_dir is not None:
        if args.ci_dir is not None or args.template is not None:
            raise UserError(
                "report RUN_DIR writes a run's report.html; --ci-dir and --template fill the "
                "smoke checklist: give RUN_DIR or those options, not both"
            )
        from difftrain.report.run_report import report_run

        return report_run(Path(args.run_dir))
    from difftrain.report import write_report

    ci_dir = Path(args.ci_dir or "_ci_tmp")
    path = write_report(ci_dir, template=Path(args.template) if args.template else None)
    print(f"wrote {path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from difftrain.reproduce_command import run_reproduce

    identical, verdict = run_reproduce(
        Path(args.run_dir),
        steps=args.steps,
        force=args.force,
        output_dir=Path(args.output_dir) if args.output_dir else None,
    )
    print(verdict)
    return 0 if identical else 1


def cmd_export(args: argparse.Namespace) -> int:
    from difftrain.export_command import run_export

    print(run_export(args.run_dir, args.format, args.output, overwrite=args.overwrite))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftrain",
        description="Fine-tune text-to-image diffusion pipelines from a YAML config.",
    )
    parser.add_argument("--version", action="version", version=f"difftrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler, help_text: str, *, loads_models: bool = False):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler, loads_models=loads_models)
        return sub

    sub = add("train", cmd_train, "fine-tune a pipeline as a config describes", loads_models=True)
    add_run_options(sub)
    add_train_options(sub)
    add_run_options(
        add(
            "validate-config",
            cmd_validate_config,
            "check a config; with --output-dir also write the resolved config and env.json",
        )
    )

    sub = add(
        "cache",
        cmd_cache,
        "build, inspect or clear the latent / text-embedding cache (data.cache_latents)",
        loads_models=True,
    )
    sub.add_argument("action", choices=["build", "info", "clear"])
    sub.add_argument("--config", help="the run's YAML config (build: required)")
    sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    sub.add_argument("--cache-dir", help="the cache folder (default: data.cache_dir or "
                     "$DIFFTRAIN_CACHE/latents)")  # fmt: skip

    sub = add("make-dummy-data", cmd_make_dummy_data, "write a small captioned image folder")
    sub.add_argument("--output-dir", required=True)
    sub.add_argument("--num-images", type=int, default=8)
    sub.add_argument("--image-size", type=int, default=64)
    sub.add_argument("--seed", type=int, default=0)

    sub = add(
        "make-tiny-model",
        cmd_make_tiny_model,
        "write a random-weight Stable Diffusion pipeline (no download)",
        loads_models=True,
    )
    sub.add_argument("--output-dir", required=True)
    sub.add_argument(
        "--size",
        choices=["tiny", "small", "tiny-sdxl", "tiny-sd3", "tiny-flux"],
        default="tiny",
        help="tiny / small: Stable Diffusion 1.x layout; tiny-sdxl, tiny-sd3, tiny-flux: "
        "those families",
    )
    sub.add_argument("--seed", type=int, default=0)

    sub = add("sample", cmd_sample, "generate one image from a pipeline folder", loads_models=True)
    add_sample_options(sub)

    sub = add(
        "report",
        cmd_report,
        "fill the smoke checklist from the logs, JUnit XML and artifacts under --ci-dir; "
        "with RUN_DIR, write RUN_DIR/report.html (plots, samples, config, data) instead",
    )
    add_report_options(sub)

    sub = add(
        "reproduce",
        cmd_reproduce,
        "train a finished run again from its config.yaml and compare metrics.jsonl step by step",
        loads_models=True,
    )
    add_reproduce_options(sub)

    sub = add(
        "export",
        cmd_export,
        "write a full fine-tune's pipeline as one original-layout checkpoint (ComfyUI, A1111)",
        loads_models=True,
    )
    add_export_options(sub)

    add("env", cmd_env, "print the environment snapshot (versions, GPU, determinism) as JSON")

    sub = add(
        "quickstart",
        cmd_quickstart,
        "train the built-in tiny model on generated data and sample an image",
        loads_models=True,
    )
    sub.add_argument("--output-dir", default="quickstart-output")
    sub.add_argument("--steps", type=int, default=30)
    sub.add_argument(
        "--model",
        default="builtin:tiny",
        help="the model to train: builtin:tiny (default), builtin:tiny-sdxl, builtin:tiny-sd3, "
        "builtin:tiny-flux, or any pipeline folder / hub id",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1 :] if args.command in argv else []
    # Under a launcher every process runs this. An error all processes share (the checks'
    # verdict, a signal) is said once, by the main process; one only this process hit is
    # said by it, with its number.
    rank = _process_rank()
    try:
        # Inside the try: importing the libraries takes seconds, and Ctrl-C may land there.
        quiet_third_party(libraries_loaded_soon=args.loads_models)
        return args.handler(args)
    except UserError as exc:
        _say(rank, exc, f"error: {exc}")
        return exc.exit_code
    except TrainingStopped as exc:
        _say(rank, exc, f"training stopped: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        if rank == 0:
            print("difftrain: interrupted", file=sys.stderr)
        return 130


def _say(rank: int, exc: BaseException, text: str) -> None:
    if rank == 0:
        print(f"difftrain: {text}", file=sys.stderr)
    elif not getattr(exc, "shared", False):
        print(f"difftrain: process {rank}: {text}", file=sys.stderr)


def _process_rank() -> int:
    from difftrain.launch import process_rank

    return process_rank()


def run(argv: list[str] | None = None) -> None:
    """The `difftrain` command: `main`, then exit with its code.

    Once torch is loaded, or after a Ctrl-C, the exit is immediate (`os._exit`):
    - with torch, diffusers and transformers imported, the interpreter's own shutdown (tearing
      down thousands of modules and the objects they hold) takes about a second, and every
      file a command writes is closed before `main` returns;
    - under a launcher, a training process leaves its process group up (see
      training.distributed.release_accelerator): tearing it down, then or at interpreter
      shutdown, can hang in torch's gloo destructor. A run that finished has passed its last
      barrier on every process, so nothing is left to say to the others; a process that
      failed is noticed by the others through the group ("lost contact"), as a killed one is;
    - CPython re-raises SIGINT at shutdown when an interrupt landed inside certain library
      imports, and the process would die by the signal, whatever `main` returned.
    """
    code = main(argv)
    if code == 130 or "torch" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
