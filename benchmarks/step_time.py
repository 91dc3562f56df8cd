"""Seconds per optimizer step: difftrain's training loop against a plain PyTorch loop.

    .venv/bin/python benchmarks/step_time.py [--family sd|sdxl|sd3|flux] [--model small]
        [--batch-size 4] [--resolution 64] [--steps 12] [--warmup 2] [--repeats 5]
        [--help-runs 10]

`--family sd` trains `builtin:<--model>` (tiny or small); the other families their tiny
built-in (`builtin:tiny-sdxl`, ...). The reference loop of each family is written out in
`reference_loops.py`. Both loops train the same model on the same generated images
with the same batch size, resolution and AdamW / clipping settings, in this one process, so
other load on the machine shifts both. Each repeat runs difftrain's real `train(cfg)` (per-step
`step_time_s` read back from metrics.jsonl) and the reference loop, in alternating order; a
repeat's figure is the median over its steps after the warm-up ones, and the table shows the
median (min, max) over repeats. It also times `difftrain --help` against `python -c pass`.

The result is a measurement, not a test: the exit code is 0 whether or not a target is met.
Models are built into $DIFFTRAIN_CACHE, or into a temporary folder when that is unset.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_loops, beside this file

import reference_loops  # noqa: E402

from difftrain.models.tiny import TINY_MODELS  # noqa: E402

RATIO_TARGET = 1.05
HELP_TARGET_S = 0.5
# The expectation for `small` at 64 px, batch 4 on a CPU runner.
SMALL_STEP_RANGE_S = (0.3, 1.0)
# Share of all cores used by other processes above which the run is flagged as disturbed.
OTHER_LOAD_LIMIT = 0.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "sd3", "flux"])
    parser.add_argument(
        "--model",
        default="small",
        choices=sorted(TINY_MODELS),
        help="the sd built-in (other families use their tiny built-in)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a run not counted")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop")
    parser.add_argument("--help-runs", type=int, default=10, help="timed `difftrain --help` runs")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    args.builtin = f"builtin:{args.model}" if args.family == "sd" else f"builtin:tiny-{args.family}"
    return args


# ---------------------------------------------------------------- difftrain's own loop


def make_config(args: argparse.Namespace, data_dir: Path, output_dir: Path):
    from difftrain.config.loader import config_from_dict

    return config_from_dict(
        {
            "model": {"pretrained": args.builtin},
            "data": {"train_dir": str(data_dir), "resolution": args.resolution},
            "train": {
                "output_dir": str(output_dir),
                "max_steps": args.steps,
                "batch_size": args.batch_size,
            },
            # Only the steps are timed, but a checkpoint or sampling between them would still
            # disturb the next step (caches, allocator), so neither happens.
            "checkpointing": {"every_steps": 0},
            "validation": {"prompts": []},
        }
    )


def time_difftrain(cfg, log: io.StringIO) -> tuple[list[float], list[float]]:
    """Run `train(cfg)`; per-step `step_time_s`, and the wall time between logged steps."""
    from difftrain.training.metrics import read_metrics
    from difftrain.training.trainer import train

    # train() logs every step to stderr; keep it (and library warnings) out of the table.
    with contextlib.redirect_stderr(log):
        train(cfg)
    records = read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
    step_times = [float(r["step_time_s"]) for r in records]
    elapsed = [float(r["elapsed_s"]) for r in records]
    # Wall between records also counts what happens outside `step_time_s` (metrics and log
    # writes, the checkpoint check): if it differs much from step_time_s, that is why.
    between = [elapsed[0]] + [b - a for a, b in pairwise(elapsed)]
    return step_times, between


# ---------------------------------------------------------------- the plain PyTorch reference


class ImageCaptionDataset:
    """The generated folder read the plain way: PIL -> [-1, 1] tensor, caption -> token ids."""

    def __init__(self, folder: Path, family: str, tokenizers: dict, resolution: int):
        rows = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        self.items = [(folder / r["file_name"], r["text"]) for r in map(json.loads, rows)]
        self.family = family
        self.tokenizers = tokenizers
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        import numpy as np
        import torch
        from PIL import Image

        path, caption = self.items[index]
        image = Image.open(path).convert("RGB")
        if image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
        # Tokenized per item, as difftrain's dataset (and diffusers' example script) does.
        ids = reference_loops.tokenize(self.family, self.tokenizers, caption)
        return {"pixel_values": pixels, **ids}


def endless(loader):
    while True:
        yield from loader


def time_reference(
    cfg, family: str, model_dir: Path, data_dir: Path, cached_inputs: bool = False
) -> list[float]:
    """The same step as difftrain's, written out with diffusers / torch only; seconds per step.

    With `cached_inputs`, every batch is encoded once before the clock starts and the steps
    run on those tensors: the floor a cached difftrain step is compared with.
    """
    import torch

    torch.manual_seed(cfg.train.seed)
    reference = reference_loops.load(family, model_dir)
    train = cfg.train
    optimizer = torch.optim.AdamW(
        reference.denoiser.parameters(),
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
        fused=True,  # torch's fastest AdamW here, as difftrain picks: the loops differ elsewhere
    )
    dataset = ImageCaptionDataset(data_dir, family, reference.tokenizers, cfg.data.resolution)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train.batch_size, shuffle=True, drop_last=True
    )
    step = reference.loss
    if cached_inputs:
        loader = [reference.encode(batch) for batch in loader]
        step = reference.denoise
    batches = endless(loader)
    times = []
    for _ in range(train.max_steps):
        started = time.perf_counter()  # Before the data fetch, as difftrain's step_time_s.
        loss = step(next(batches))
        loss.backward()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(reference.denoiser.parameters(), train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # difftrain reads the loss every step (to log it); so does the reference.
        times.append(time.perf_counter() - started)
    return times


# ---------------------------------------------------------------- start-up time of the CLI


def time_once(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_help(runs: int) -> tuple[list[float], list[float]]:
    """`difftrain --help` (the console script next to this Python) and `python -c pass`."""
    script = Path(sys.executable).parent / ("difftrain.exe" if os.name == "nt" else "difftrain")
    if not script.exists():
        raise SystemExit(f"no console script {script}; install difftrain into this environment")
    help_command = [str(script), "--help"]
    pass_command = [sys.executable, "-c", "pass"]
    # One untimed run of each first, so the file cache is warm for every timed one.
    time_once(help_command)
    time_once(pass_command)
    help_times, pass_times = [], []
    # Interleaved, so a burst of other load on the machine hits both lists.
    for _ in range(runs):
        help_times.append(time_once(help_command))
        pass_times.append(time_once(pass_command))
    return help_times, pass_times


# ---------------------------------------------------------------- measurement and report


def steady(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    from difftrain.data.dummy import make_dummy_imagefolder
    from difftrain.models.tiny import builtin_model_path

    model_dir = builtin_model_path(args.builtin)  # built once, outside the timing
    # Enough images for every step of a run to get fresh ones, without an epoch boundary.
    num_images = args.steps * args.batch_size
    data_dir = make_dummy_imagefolder(workdir / "data", num_images, args.resolution)
    log = io.StringIO()
    result: dict[str, list[float]] = {"difftrain": [], "between": [], "reference": []}
    for repeat in range(args.repeats):
        cfg = make_config(args, data_dir, workdir / f"run-{repeat}")
        # Alternate which loop goes first, so a trend in machine load favours neither.
        order = ("difftrain", "reference") if repeat % 2 == 0 else ("reference", "difftrain")
        for name in order:
            try:
                if name == "difftrain":
                    step_times, between = time_difftrain(cfg, log)
                    result["difftrain"].append(steady(step_times, args.warmup))
                    result["between"].append(steady(between, args.warmup))
                else:
                    result["reference"].append(
                        steady(time_reference(cfg, args.family, model_dir, data_dir), args.warmup)
                    )
            except Exception:
                sys.stderr.write(log.getvalue())
                raise
        print(
            f"  repeat {repeat + 1}/{args.repeats}: difftrain {result['difftrain'][-1]:.4f} s, "
            f"reference {result['reference'][-1]:.4f} s",
            flush=True,
        )
    return result


def row(name: str, median: float, values: list[float], target: str = "", ok=None) -> str:
    verdict = "" if ok is None else ("OK" if ok else "ABOVE TARGET")
    line = f"{name:<34}{median:>9.4f}{min(values):>9.4f}{max(values):>9.4f}  {target:<9}{verdict}"
    return line.rstrip()


def report(args: argparse.Namespace, result: dict[str, list[float]], help_runs) -> None:
    median = statistics.median
    difftrain, reference, between = result["difftrain"], result["reference"], result["between"]
    # The ratio is of the two medians; its min / max are over the per-repeat pairs.
    ratio = median(difftrain) / median(reference)
    per_repeat = [d / r for d, r in zip(difftrain, reference, strict=True)]
    help_times, pass_times = help_runs

    print()
    print(f"{'':<34}{'median':>9}{'min':>9}{'max':>9}  target")
    print(row("difftrain s/step", median(difftrain), difftrain))
    print(row("reference s/step", median(reference), reference))
    print(
        row(
            "ratio difftrain/reference",
            ratio,
            per_repeat,
            f"<= {RATIO_TARGET}",
            ratio <= RATIO_TARGET,
        )
    )
    print(row("difftrain wall between steps, s", median(between), between))
    help_median = median(help_times)
    print(
        row(
            "difftrain --help, s",
            help_median,
            help_times,
            f"< {HELP_TARGET_S}",
            help_median < HELP_TARGET_S,
        )
    )
    print(row("python -c pass, s", median(pass_times), pass_times))
    if (args.family, args.model, args.batch_size, args.resolution) == ("sd", "small", 4, 64):
        low, high = SMALL_STEP_RANGE_S
        step = median(reference)
        if step < low:
            verdict = f"OUTSIDE ({low / step:.2f}x too fast)"
        elif step > high:
            verdict = f"OUTSIDE ({step / high:.2f}x too slow)"
        else:
            verdict = "OK"
        print(
            f"small model, 64 px, batch 4 (reference loop): {step:.3f} s/step; issue expects "
            f"{low}-{high} s: {verdict}"
        )


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process and its children)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None  # Not Linux: no way to tell other load apart; skip the check.
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return machine, own.user + own.system + own.children_user + own.children_system


def print_other_load(before, after, wall_s: float) -> None:
    # torch uses every core, so another busy process makes its threads wait for each other and
    # single steps take several times longer: say how much CPU others took while we measured.
    if before is None or after is None:
        return
    cores = os.cpu_count() or 1
    others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (wall_s * cores)
    print(f"other processes used {others:.0%} of the CPU ({cores} cores) during the run")
    if others > OTHER_LOAD_LIMIT:
        print("  that is enough to skew single runs: rerun on an idle machine to trust the ratio")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from difftrain.quiet import quiet_third_party

    quiet_third_party(libraries_loaded_soon=True)
    with tempfile.TemporaryDirectory(prefix="difftrain-bench-") as tmp:
        workdir = Path(tmp)
        if not os.environ.get("DIFFTRAIN_CACHE"):  # An empty value means unset to difftrain.
            os.environ["DIFFTRAIN_CACHE"] = str(workdir / "cache")
        print(
            f"model {args.builtin}, batch {args.batch_size}, {args.resolution} px, "
            f"{args.steps} steps (first {args.warmup} not counted), {args.repeats} repeats; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"cache {os.environ['DIFFTRAIN_CACHE']}",
            flush=True,
        )
        started, cpu_before = time.perf_counter(), cpu_seconds()
        help_runs = time_help(args.help_runs)
        result = run_benchmark(args, workdir)
    report(args, result, help_runs)
    print_other_load(cpu_before, cpu_seconds(), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
