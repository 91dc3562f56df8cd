"""The floors under any diffusers trainer on this machine: the start-up and memory that no
trainer doing the same work can go below.

    .venv/bin/python benchmarks/floors.py [--repeats 5] [--model tiny] [--resolution 64]

- imports alone: a fresh process that imports torch, torch._dynamo (every torch optimizer
  imports it at its first `step()`, and diffusers imports it at start), diffusers'
  UNet2DConditionModel, AutoencoderKL and DDPMScheduler, and transformers' CLIPTextModel and
  CLIPTokenizer, then leaves with os._exit (no interpreter teardown). No trainer's time to its
  first step can be shorter, nor its peak RSS lower.
- plain loop: a fresh process running the plain PyTorch step of step_time.py
  (reference_loops.py: diffusers / transformers / torch only) for 3 steps on one random batch:
  VAE and text encoding, the UNet's forward and backward, clipping at 1.0, fused AdamW. Its
  peak RSS is what the same arithmetic needs (weights, gradients, Adam's two moments,
  activations and the libraries), with no data pipeline, logging or saving around it.

Both are timed from outside as vs_diffusers.py times the trainers (spawn to exit, peak RSS from
os.wait4), and vs_diffusers.py prints them beside its table, so that a target below a floor
shows as such. Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPORTS = (
    "import torch, torch._dynamo\n"
    "from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel\n"
    "from transformers import CLIPTextModel, CLIPTokenizer\n"
    "(AutoencoderKL, DDPMScheduler, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer)\n"
    "import os; os._exit(0)\n"
)


def timed_process(command: list[str], env: dict | None) -> tuple[float, float]:
    """Seconds from spawn to exit and peak RSS (MiB) of `command`, which must succeed."""
    started = time.perf_counter()
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, **quiet)
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:3]} failed: {err.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def import_floor(python: str, env: dict | None = None, repeats: int = 5) -> tuple[float, float]:
    """Median seconds and median peak RSS (MiB) of the imports alone."""
    runs = [timed_process([python, "-c", IMPORTS], env) for _ in range(repeats + 1)]
    runs = runs[1:]  # the first run only warms the file cache
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def plain_loop_peak(python: str, env: dict | None, model_dir: Path, resolution: int,
                    batch_size: int) -> float:  # fmt: skip
    """Peak RSS (MiB) of the plain PyTorch loop on `model_dir` (an SD-layout folder)."""
    command = [python, __file__, "--run-plain-loop", str(model_dir),
               "--resolution", str(resolution), "--batch-size", str(batch_size)]  # fmt: skip
    return timed_process(command, env)[1]


def describe_floors(imports: tuple[float, float], loop_rss: float, peer_first_step: float | None,
                    peer_rss: float | None) -> str:  # fmt: skip
    """One line: the floors, and what fraction of the peer's first step and peak RSS they are
    (no trainer's first step, or peak RSS for this arithmetic, can be lower)."""
    seconds, rss = imports
    floors = [f"imports alone {seconds:.3f} s, {rss:.0f} MiB", f"plain loop {loop_rss:.0f} MiB"]
    if peer_first_step and peer_rss:
        floors[0] += f" ({seconds / peer_first_step:.3f} of the peer's first step)"
        floors[1] += f" ({loop_rss / peer_rss:.3f} of the peer's peak RSS)"
    return "floors: " + "; ".join(floors)


def run_plain_loop(model_dir: Path, resolution: int, batch_size: int, steps: int = 3) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_loops, beside this
    import reference_loops

    torch.manual_seed(0)
    reference = reference_loops.load("sd", model_dir)
    ids = reference_loops.tokenize("sd", reference.tokenizers, "a red circle")
    batch = {
        "pixel_values": torch.rand(batch_size, 3, resolution, resolution) * 2 - 1,
        **{name: tensor.expand(batch_size, -1) for name, tensor in ids.items()},
    }
    parameters = list(reference.denoiser.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True)
    for _ in range(steps):
        reference.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="tiny", help="a difftrain builtin (SD layout)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--run-plain-loop", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_plain_loop:
        run_plain_loop(args.run_plain_loop, args.resolution, args.batch_size)
    from difftrain.models.tiny import builtin_model_path

    seconds, rss = import_floor(args.python, repeats=args.repeats)
    print(f"imports alone: {seconds:.2f} s, peak RSS {rss:.0f} MiB (medians of {args.repeats})")
    model_dir = builtin_model_path(args.model)
    peak = plain_loop_peak(args.python, None, model_dir, args.resolution, args.batch_size)
    print(f"plain loop, builtin:{args.model} at {args.resolution} px, batch {args.batch_size}: "
          f"peak RSS {peak:.0f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
