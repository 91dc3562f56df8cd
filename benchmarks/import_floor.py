"""The floor under any diffusers trainer's start-up: the seconds and memory a fresh process
spends importing only what training a diffusers UNet needs, and nothing else.

    .venv/bin/python benchmarks/import_floor.py [--repeats 5] [--python PATH]

The process imports torch, torch._dynamo (every torch optimizer imports it at its first
`step()`, and diffusers imports it at start), diffusers' UNet2DConditionModel, AutoencoderKL
and DDPMScheduler, and transformers' CLIPTextModel and CLIPTokenizer, then leaves with
os._exit (no interpreter teardown). It is timed from outside, as vs_diffusers.py times the
trainers: spawn to exit, and the peak RSS from os.wait4. No trainer's time to its first step
can go below these seconds, nor its peak memory below this RSS; vs_diffusers.py prints them
beside its table, so a target below the floor shows as such. Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

IMPORTS = (
    "import torch, torch._dynamo\n"
    "from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel\n"
    "from transformers import CLIPTextModel, CLIPTokenizer\n"
    "(AutoencoderKL, DDPMScheduler, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer)\n"
    "import os; os._exit(0)\n"
)


def import_floor(python: str, env: dict | None = None, repeats: int = 5) -> tuple[float, float]:
    """Median seconds (spawn to exit) and median peak RSS in MiB of the imports alone."""
    seconds, peaks = [], []
    for _ in range(repeats + 1):  # the first run only warms the file cache
        started = time.perf_counter()
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
        process = subprocess.Popen(
            [python, "-c", IMPORTS], env=env, stderr=subprocess.DEVNULL, **quiet
        )
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{python} could not import torch, diffusers and transformers")
        seconds.append(time.perf_counter() - started)
        peaks.append(usage.ru_maxrss / 1024)
    return statistics.median(seconds[1:]), statistics.median(peaks[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    seconds, rss = import_floor(args.python, repeats=args.repeats)
    print(f"imports alone ({args.python}): {seconds:.2f} s, peak RSS {rss:.0f} MiB "
          f"(medians of {args.repeats})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
