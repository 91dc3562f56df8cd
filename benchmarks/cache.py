"""Seconds per step with the latent + text-embedding cache against without, and the cost of
filling the cache.

    .venv/bin/python benchmarks/cache.py [--model small] [--resolution 128] [--images 64]
        [--batch-size 4] [--steps 12] [--warmup 2] [--repeats 3]

Each repeat runs difftrain's `train(cfg)` three ways on the same generated images, in
alternating order: uncached, cached with every entry already built (the steady state of a
second run), and `difftrain cache build` into an empty cache (timed, reported per 1,000
images). Beside them runs the plain PyTorch loop of `step_time.py` on inputs it encoded once
before timing (`plain, cached inputs`): the floor a cached step can approach. A run's figure
is the median `step_time_s` after the warm-up steps; the table shows the median (min, max)
over repeats and the ratios measured in this process.
The result is a measurement, not a test: the exit code is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_time, beside this file


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="a builtin (tiny, small, tiny-sdxl...)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def config(args, data: Path, out: Path, cache: Path | None):
    from difftrain.config.loader import config_from_dict

    data_cfg = {"train_dir": str(data), "resolution": args.resolution, "center_crop": True}
    if cache is not None:
        data_cfg.update(cache_latents=True, cache_text_embeddings=True, cache_dir=str(cache))
    return config_from_dict({
        "model": {"pretrained": f"builtin:{args.model}"},
        "data": data_cfg,
        "train": {"output_dir": str(out), "max_steps": args.steps,
                  "batch_size": args.batch_size},
        "checkpointing": {"every_steps": 0},
    })  # fmt: skip


def steady_step(cfg, warmup: int) -> float:
    from difftrain.training.metrics import read_metrics
    from difftrain.training.trainer import train

    with contextlib.redirect_stderr(io.StringIO()):
        train(cfg)
    times = [r["step_time_s"] for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")]
    return statistics.median(times[warmup:])


def plain_cached_step(cfg, data: Path, warmup: int) -> float:
    from step_time import time_reference

    from difftrain.models.loading import model_family
    from difftrain.models.tiny import builtin_model_path

    family = model_family(cfg.model, cfg.train).name
    model_dir = builtin_model_path(cfg.model.pretrained.removeprefix("builtin:"))
    times = time_reference(cfg, family, model_dir, data, cached_inputs=True)
    return statistics.median(times[warmup:])


def build_seconds(cfg) -> float:
    from difftrain.cache_command import build

    args = argparse.Namespace(config=None, set=[])
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _build_from(cfg, build, args)
    return time.perf_counter() - started


def _build_from(cfg, build, args) -> None:
    # `build` reads a config file: write this run's config to one.
    from difftrain.config import dump_config

    path = Path(cfg.train.output_dir).with_suffix(".yaml")
    dump_config(cfg, path)
    args.config = str(path)
    build(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    from difftrain.data.dummy import make_dummy_imagefolder
    from difftrain.quiet import quiet_third_party

    quiet_third_party(libraries_loaded_soon=True)
    with tempfile.TemporaryDirectory(prefix="difftrain-cache-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("DIFFTRAIN_CACHE", str(work / "models"))
        data = make_dummy_imagefolder(work / "data", args.images, args.resolution)
        warm = work / "warm-cache"
        build_seconds(config(args, data, work / "warm", warm))  # the steady state's entries
        rows: dict[str, list[float]] = {"uncached": [], "cached": [], "plain": [],
                                        "build_per_1000": []}  # fmt: skip
        for repeat in range(args.repeats):
            runs = ["uncached", "cached", "plain"]
            for name in runs if repeat % 2 == 0 else reversed(runs):
                cache = warm if name == "cached" else None
                cfg = config(args, data, work / f"{name}-{repeat}", cache)
                if name == "plain":
                    rows[name].append(plain_cached_step(cfg, data, args.warmup))
                else:
                    rows[name].append(steady_step(cfg, args.warmup))
            empty = work / f"empty-{repeat}"
            seconds = build_seconds(config(args, data, work / f"build-{repeat}", empty))
            rows["build_per_1000"].append(seconds / args.images * 1000)
            shutil.rmtree(empty, ignore_errors=True)
            print(f"  repeat {repeat + 1}: uncached {rows['uncached'][-1]:.4f} s, cached "
                  f"{rows['cached'][-1]:.4f} s, plain cached {rows['plain'][-1]:.4f} s, "
                  f"build {seconds:.2f} s", flush=True)  # fmt: skip
    median = statistics.median
    print(f"\nbuiltin:{args.model}, {args.resolution} px, batch {args.batch_size}, "
          f"{args.images} images")  # fmt: skip
    print(f"{'':<28}{'median':>9}{'min':>9}{'max':>9}")
    for name, values in rows.items():
        label = {"uncached": "uncached s/step", "cached": "cached s/step",
                 "plain": "plain, cached inputs s/step",
                 "build_per_1000": "cache build s / 1000 images"}[name]  # fmt: skip
        print(f"{label:<28}{median(values):>9.4f}{min(values):>9.4f}{max(values):>9.4f}")
    for label, top, bottom in [("ratio cached / uncached", "cached", "uncached"),
                               ("ratio cached / plain cached", "cached", "plain")]:  # fmt: skip
        print(f"{label:<28}{median(rows[top]) / median(rows[bottom]):>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
