"""difftrain against diffusers' train_text_to_image.py: wall, first step, s/step, save, memory.

    .venv/bin/python benchmarks/vs_diffusers.py [--models tiny,small] [--resolutions 64,128]
        [--batch-size 4] [--steps 40] [--warmup 3] [--repeats 3] [--cached] [--threads N]
        [--peer-script ../shared/peers/diffusers_train_text_to_image.py]
        [--peer-python /work/peer-env/venv/bin/python]

The peer runs exactly as ../shared/peers/README.md says a user runs it (`accelerate launch
--num_processes 1 --mixed_precision no ...`, HF_HUB_OFFLINE=1); build its environment once with
`bash ../shared/peers/setup_peer_env.sh /work/peer-env`. difftrain runs as `difftrain train
--config CFG --output-dir OUT` (one process, no launcher). Both get the same model folder (a
difftrain builtin, built into $DIFFTRAIN_CACHE or a temporary folder), the same generated image
folder (metadata.jsonl; steps x batch images, so no run crosses an epoch), batch, resolution,
steps, seed 0, AdamW lr 1e-4 constant without warmup, gradient clipping 1.0, centre crop, no
flip, no checkpoint, no validation, and the same environment: OMP_NUM_THREADS is set for both
(`accelerate launch` sets it to 1 in its child when it is unset, which would make the peer
single-threaded), PYTHONUNBUFFERED=1, and one datasets cache for the peer's Arrow files.

Before timing, each (model, resolution) gets one untimed 2-step run of each trainer (compiles
.pyc files, warms the file cache, writes the peer's Arrow dataset) and, with --cached, a
`difftrain cache build`. Then the runs alternate over --repeats (A B, then B A). Each figure is
measured from outside, the same way for both processes:

- process wall: spawn (just before Popen) to exit (os.wait4 returning).
- first step: spawn to the first sight of step 1 in the progress text on stderr, which is read
  unbuffered (os.read) as it arrives and split on both \\r and \\n: the peer's tqdm bar
  "Steps: ...| N/STEPS [" (redrawn after every optimizer step by set_postfix), difftrain's
  per-step line "step N/STEPS loss ..." (its log line when stderr is not a terminal). A step's
  timestamp is when its number first arrived, so it marks the end of that optimizer step.
- steady s/step: median over steps after --warmup of (time between two sighted steps) / (steps
  between them); a skipped redraw just makes one interval span two steps. difftrain's own
  metrics.jsonl `step_time_s` median is shown beside each run as a cross-check only.
- final save: the last step's timestamp to process exit (saving the pipeline, tear-down).
- peak RSS: ru_maxrss of os.wait4(pid), KiB on Linux. wait4 reports RUSAGE_BOTH of the reaped
  process: its own high-water mark and the largest of the descendants it reaped itself, and so
  on down (the kernel folds a reaped child's peak into its parent's). `accelerate launch` waits
  for its training child, so the figure is the training process's peak (the largest process of
  the tree, not the sum; the launcher alone peaks near 230 MiB). Checked: a 1 GiB allocation in
  the launched script shows as 1 GiB. No /proc polling, so no short peak is missed.
- CPU s: ru_utime + ru_stime of the same wait4 (the whole reaped tree), no target.

The table shows medians over repeats and the ratio difftrain / peer against the issue's targets,
then the floors of floors.py as fractions of the peer's figures: the imports alone (no
trainer's first step is shorter) and a plain PyTorch loop's peak RSS (the memory the same
arithmetic needs).
Other load on the machine moves both; the script says how much CPU others took (step_time.py).
The result is a measurement, not a test: the exit code is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_time, beside this file

REPO = Path(__file__).resolve().parent.parent
SETUP_HINT = "bash ../shared/peers/setup_peer_env.sh /work/peer-env"
# The peer's bar is "Steps:  25%|##5       | 10/40 [00:03<00:09, ...]"; other bars (data files,
# pipeline loading) have other descriptions. difftrain logs "step 10/40 loss 0.1 lr 1e-04".
PEER_STEP = re.compile(r"Steps:[^\r\n]*?(\d+)/(\d+) \[")
DIFFTRAIN_STEP = re.compile(r"^step (\d+)/(\d+) ")
WARMUP_RUN_STEPS = 2
# (figure, issue's target for difftrain / peer): lower is better for every one.
ROWS = [
    ("wall_s", "process wall s", 0.60),
    ("first_step_s", "first step s", 0.50),
    ("steady_s", "steady s/step", None),  # the target is on the cached run (row below)
    ("save_s", "final save s", 0.50),
    ("peak_rss_mib", "peak RSS MiB", 0.80),
    ("cpu_s", "CPU s (user+sys)", None),
]
CACHED_STEADY_TARGET, CACHED_TARGET_RESOLUTION = 0.85, 128


@dataclass
class Run:
    wall_s: float
    first_step_s: float | None
    steady_s: float | None
    save_s: float | None
    peak_rss_mib: float
    cpu_s: float
    returncode: int
    tail: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer-script",
        type=Path,
        default=(REPO / "../shared/peers/diffusers_train_text_to_image.py").resolve(),
    )
    parser.add_argument("--peer-python", type=Path, default=Path("/work/peer-env/venv/bin/python"))
    parser.add_argument("--models", default="tiny,small", help="difftrain builtins, comma list")
    parser.add_argument("--resolutions", default="64,128", help="comma list")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of steady")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each trainer")
    parser.add_argument(
        "--cached",
        action="store_true",
        help="also time difftrain with cache_latents + cache_text_embeddings",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for both (default: $OMP_NUM_THREADS, else torch's)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.steps < args.warmup + 2:
        parser.error("--steps must be at least --warmup + 2 (two steady intervals)")
    args.models = [m for m in args.models.split(",") if m]
    args.resolutions = [int(r) for r in args.resolutions.split(",") if r]
    return args


# ---------------------------------------------------------------- one process, timed from outside


def run_timed(command: list[str], env: dict, steps: int, pattern: re.Pattern, warmup: int) -> Run:
    """Spawn `command` (no shell), timestamp its progress on stderr, reap it with wait4."""
    seen: dict[int, float] = {}  # step -> when its number first arrived
    tail: deque[str] = deque(maxlen=20)  # the last stderr lines, shown if the run fails
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def read_stderr() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        # os.read returns whatever has arrived (no buffering to a full line or block), so a
        # tqdm redraw, which ends in no newline until the next one, is seen when written.
        while chunk := os.read(process.stderr.fileno(), 65536):
            now = time.perf_counter()
            pending += decoder.decode(chunk)
            *done, pending = re.split(r"[\r\n]", pending)
            for piece in [*done, pending]:  # the unfinished piece too: a bar is never finished
                match = pattern.search(piece)
                if match and int(match[2]) == steps and int(match[1]) not in seen:
                    seen[int(match[1])] = now
            tail.extend(piece for piece in done if piece.strip())

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)  # reaped here, so Popen never waits itself
    ended = time.perf_counter()
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)  # a leftover grandchild holding the pipe must not hang us
    process.stderr.close()
    return Run(
        wall_s=ended - started,
        first_step_s=seen[1] - started if 1 in seen else None,
        steady_s=steady_seconds(seen, warmup),
        save_s=ended - seen[steps] if steps in seen else None,
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        cpu_s=usage.ru_utime + usage.ru_stime,
        returncode=process.returncode,
        tail=list(tail),
    )


def steady_seconds(seen: dict[int, float], warmup: int) -> float | None:
    # Intervals start at step max(warmup, 1): step 1's own interval would start at spawn.
    points = sorted((n, t) for n, t in seen.items() if n >= max(warmup, 1))
    rates = [(t2 - t1) / (n2 - n1) for (n1, t1), (n2, t2) in zip(points, points[1:], strict=False)]
    return statistics.median(rates) if rates else None


# ---------------------------------------------------------------- the two command lines


def difftrain_config(args, model_dir: Path, data_dir: Path, resolution: int, steps: int,
                     cache_dir: Path | None, path: Path) -> Path:  # fmt: skip
    data = {"train_dir": str(data_dir), "resolution": resolution, "center_crop": True,
            "random_flip": False, "num_workers": 0}  # fmt: skip
    if cache_dir is not None:
        data.update(cache_latents=True, cache_text_embeddings=True, cache_dir=str(cache_dir))
    config = {
        "model": {"pretrained": str(model_dir)},
        "data": data,
        "train": {"seed": 0, "max_steps": steps, "batch_size": args.batch_size,
                  "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "max_grad_norm": 1.0, "mixed_precision": "no", "report_to": "none"},
        "checkpointing": {"every_steps": 0},
        "validation": {"prompts": []},
    }  # fmt: skip
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return path


def difftrain_command(config: Path, out: Path) -> list[str]:
    script = Path(sys.executable).parent / "difftrain"
    return [str(script), "train", "--config", str(config), "--output-dir", str(out)]


def peer_command(args, model_dir: Path, data_dir: Path, resolution: int, steps: int,
                 out: Path) -> list[str]:  # fmt: skip
    # The README's command; `python -m accelerate.commands.launch` is its `accelerate launch`.
    return [
        str(args.peer_python), "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--mixed_precision", "no", str(args.peer_script),
        "--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
        "--resolution", str(resolution), "--center_crop", "--train_batch_size",
        str(args.batch_size), "--max_train_steps", str(steps), "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_grad_norm", "1.0",
        "--seed", "0", "--dataloader_num_workers", "0", "--output_dir", str(out),
        "--checkpointing_steps", "1000000",
    ]  # fmt: skip


def median_steps_in_metrics(out: Path, warmup: int) -> float | None:
    try:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").open(encoding="utf-8")]
    except OSError:
        return None
    times = [float(r["step_time_s"]) for r in rows if "step_time_s" in r][warmup:]
    return statistics.median(times) if times else None


# ---------------------------------------------------------------- one (model, resolution)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def describe(label: str, run: Run, extra: str = "") -> None:
    """One line per run, so a disturbed run stands out; the last stderr lines if it failed."""
    failed = "" if run.returncode == 0 else f", EXIT {run.returncode}"
    print(f"  {label:<20} wall {run.wall_s:.2f} s, first step {fmt(run.first_step_s, 2)} s, "
          f"steady {fmt(run.steady_s, 4)} s/step, save {fmt(run.save_s, 2)} s, "
          f"peak {run.peak_rss_mib:.0f} MiB{extra}{failed}", flush=True)  # fmt: skip
    if run.returncode != 0:
        print("\n".join(f"    | {line}" for line in run.tail[-12:]))


def measure(args, env: dict, work: Path, model: str, resolution: int, peer_ok: bool) -> dict:
    """Warm up, then the interleaved timed runs of one (model, resolution); runs by trainer."""
    from difftrain.data.dummy import make_dummy_imagefolder
    from difftrain.models.tiny import builtin_model_path

    model_dir = builtin_model_path(model)  # one folder, handed to both trainers
    case = work / f"{model}-{resolution}"
    data_dir = make_dummy_imagefolder(case / "data", args.steps * args.batch_size, resolution)
    settings = {"difftrain": (args.steps, None), "warm-up": (WARMUP_RUN_STEPS, None),
                "cached": (args.steps, case / "latent-cache")}  # fmt: skip
    configs = {
        name: difftrain_config(args, model_dir, data_dir, resolution, steps, cache,
                               case / f"{name}.yaml")
        for name, (steps, cache) in settings.items()
    }  # fmt: skip

    def timed(name: str, out: Path, warm_up: bool = False) -> Run:
        steps = WARMUP_RUN_STEPS if warm_up else args.steps
        if name == "peer":
            command = peer_command(args, model_dir, data_dir, resolution, steps, out)
        else:
            command = difftrain_command(configs["warm-up" if warm_up else name], out)
        pattern = PEER_STEP if name == "peer" else DIFFTRAIN_STEP
        return run_timed(command, env, steps, pattern, 0 if warm_up else args.warmup)

    names = ["difftrain", "peer"] if peer_ok else ["difftrain"]
    # Untimed: .pyc compiles, the file cache, the peer's Arrow dataset in HF_DATASETS_CACHE.
    for name in list(names):
        run = timed(name, case / f"warm-{name}", warm_up=True)
        describe(f"warm-up {name}:", run)
        if run.returncode != 0:
            if name != "peer":
                return {}
            print("  the peer failed: measuring difftrain alone for this case")
            names.remove("peer")
    if args.cached:
        build = [str(Path(sys.executable).parent / "difftrain"), "cache", "build",
                 "--config", str(configs["cached"])]  # fmt: skip
        subprocess.run(build, cwd=REPO, env=env, check=True, capture_output=True)
        names.append("cached")

    runs: dict[str, list[Run]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        # Alternate the order, so a trend in machine load favours neither trainer.
        for name in names if repeat % 2 == 0 else reversed(names):
            out = case / f"out-{name}-{repeat}"
            run = timed(name, out)
            extra = ""
            if name != "peer":  # its own clock, a cross-check of the external steady figure
                extra = f"; metrics.jsonl {fmt(median_steps_in_metrics(out, args.warmup), 4)}"
            describe(f"repeat {repeat + 1} {name}:", run, extra)
            if run.returncode == 0:
                runs[name].append(run)
            shutil.rmtree(out, ignore_errors=True)  # saved pipelines add up over many runs
    return runs


def median_of(runs: list[Run], key: str) -> float | None:
    values = [getattr(run, key) for run in runs if getattr(run, key) is not None]
    return statistics.median(values) if values else None


def verdict(ratio: float | None, target: float | None) -> str:
    if target is None:
        return ""
    if ratio is None:
        return f"<= {target:.2f}  -"
    return f"<= {target:.2f}  {'OK' if ratio <= target else 'ABOVE TARGET'}"


def report(args, model: str, resolution: int, runs: dict, imports: tuple, loop_rss: float) -> None:
    counts = ", ".join(f"{name} {len(r)}" for name, r in runs.items())
    first_steady = max(args.warmup, 1) + 1
    print(f"\nbuiltin:{model}, {resolution} px, batch {args.batch_size}, {args.steps} steps "
          f"(steady: steps {first_steady}-{args.steps}); medians of runs ({counts})")  # fmt: skip
    print(f"{'':<24}{'difftrain':>10}{'peer':>10}{'ratio':>8}  target")
    table = [(key, label, target, runs.get("difftrain", [])) for key, label, target in ROWS]
    if "cached" in runs:
        target = CACHED_STEADY_TARGET if resolution == CACHED_TARGET_RESOLUTION else None
        table.append(("steady_s", "cached steady s/step", target, runs["cached"]))
    for key, label, target, ours in table:
        mine, theirs = median_of(ours, key), median_of(runs.get("peer", []), key)
        ratio = mine / theirs if mine is not None and theirs else None
        line = (
            f"{label:<24}{fmt(mine):>10}{fmt(theirs):>10}{fmt(ratio):>8}  {verdict(ratio, target)}"
        )
        if label == "cached steady s/step" and target is None:
            line += f"(target <= {CACHED_STEADY_TARGET} is for {CACHED_TARGET_RESOLUTION} px)"
        print(line.rstrip())
    if "cached" not in runs:
        print(f"(the steady target, <= {CACHED_STEADY_TARGET}, is for cached difftrain at "
              f"{CACHED_TARGET_RESOLUTION} px: add --cached)")  # fmt: skip
    from floors import describe_floors

    peer = runs.get("peer", [])
    peer_first, peer_rss = median_of(peer, "first_step_s"), median_of(peer, "peak_rss_mib")
    print(describe_floors(imports, loop_rss, peer_first, peer_rss))


def peer_missing(args) -> str | None:
    for what, path in [("peer script", args.peer_script), ("peer python", args.peer_python)]:
        if not path.exists():
            return f"{what} {path} not found"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from floors import import_floor, plain_loop_peak
    from step_time import cpu_seconds, print_other_load

    from difftrain.models.tiny import builtin_model_path
    from difftrain.quiet import quiet_third_party

    quiet_third_party(libraries_loaded_soon=True)  # building a builtin here prints library noise

    missing = peer_missing(args)
    if missing:
        print(f"{missing}: build it with `{SETUP_HINT}`; measuring difftrain alone")
    if args.threads is None:
        import torch

        args.threads = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="difftrain-vs-diffusers-") as tmp:
        work = Path(tmp)
        if not os.environ.get("DIFFTRAIN_CACHE"):  # An empty value means unset to difftrain.
            os.environ["DIFFTRAIN_CACHE"] = str(work / "cache")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(args.threads),
               "HF_DATASETS_CACHE": str(work / "hf-datasets")}  # fmt: skip
        print(f"batch {args.batch_size}, {args.steps} steps, {args.repeats} repeats, "
              f"OMP_NUM_THREADS={args.threads} for both; cache {os.environ['DIFFTRAIN_CACHE']}",
              flush=True)  # fmt: skip
        imports = import_floor(sys.executable, env, repeats=args.repeats)
        started, cpu_before = time.perf_counter(), cpu_seconds()
        results = []
        for model in args.models:
            for resolution in args.resolutions:
                print(f"\nbuiltin:{model}, {resolution} px", flush=True)
                runs = measure(args, env, work, model, resolution, peer_ok=missing is None)
                loop_rss = plain_loop_peak(
                    sys.executable, env, builtin_model_path(model), resolution, args.batch_size
                )
                results.append((model, resolution, runs, loop_rss))
        wall = time.perf_counter() - started
        cpu_after = cpu_seconds()
    for model, resolution, runs, loop_rss in results:
        if runs:
            report(args, model, resolution, runs, imports, loop_rss)
    print()
    print_other_load(cpu_before, cpu_after, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
