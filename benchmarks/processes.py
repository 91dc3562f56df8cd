"""Throughput on 1 and N training processes (images per second), the same global batch.

    .venv/bin/python benchmarks/processes.py                     # 1 vs 2 processes, builtin tiny
    .venv/bin/python benchmarks/processes.py --model small --processes 1 2 --repeats 3

Each run is a real `difftrain train` (with `--num-processes N` above 1), the global batch
fixed (`--global-batch`, split evenly over the processes), the cores shared out evenly
(`OMP_NUM_THREADS = cores / N`). A run's figure is the median `step_time_s` of its steps after
the first `--warmup`; the runs alternate over `--repeats`, and the table gives the median of
the runs and its ratio to the single-process throughput. A measurement, not a test: it
always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="difftrain-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "DIFFTRAIN_CACHE": os.environ.get("DIFFTRAIN_CACHE", str(work))}
        data = work / "data"
        subprocess.run(
            [sys.executable, "-m", "difftrain", "make-dummy-data", "--output-dir", str(data),
             "--num-images", "16", "--image-size", str(args.resolution)],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        figures: dict[int, list[float]] = {n: [] for n in args.processes}
        for repeat in range(args.repeats):
            for count in args.processes:
                per_process = args.global_batch // count
                config = work / f"p{count}.yaml"
                config.write_text(
                    f"model: {{pretrained: 'builtin:{args.model}'}}\n"
                    f"data: {{train_dir: '{data}', resolution: {args.resolution}}}\n"
                    f"train: {{max_steps: {args.steps}, batch_size: {per_process}}}\n"
                    "checkpointing: {every_steps: 0}\n"
                )
                out = work / f"out-{count}-{repeat}"
                command = [sys.executable, "-m", "difftrain", "train", "--config", str(config),
                           "--output-dir", str(out)]  # fmt: skip
                if count > 1:
                    command += ["--num-processes", str(count)]
                threads = str(max(1, cores // count))
                subprocess.run(command, check=True, capture_output=True,
                               env={**env, "OMP_NUM_THREADS": threads})  # fmt: skip
                rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
                step = statistics.median(row["step_time_s"] for row in rows[args.warmup :])
                figures[count].append(args.global_batch / step)

    base = statistics.median(figures[args.processes[0]])
    print(f"builtin:{args.model}, {args.resolution} px, global batch {args.global_batch}, "
          f"{args.steps} steps x {args.repeats} repeats, {cores} cores")  # fmt: skip
    print(f"{'processes':>9} {'threads each':>12} {'images/s':>9} {'ratio':>6}  runs")
    for count in args.processes:
        median = statistics.median(figures[count])
        runs = " ".join(f"{value:.2f}" for value in figures[count])
        print(
            f"{count:>9} {max(1, cores // count):>12} {median:>9.2f} {median / base:>6.2f}  {runs}"
        )


if __name__ == "__main__":
    main()
