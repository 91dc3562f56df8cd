"""Throughput on a GPU: difftrain against diffusers' train_text_to_image.py at real model sizes.

    python benchmarks/gpu_throughput.py [--models sd15,sdxl] [--steps 30] [--warmup 5]
        [--batch-size N] [--repeats 2] [--cached] [--num-workers 4] [--peak-tflops T]
        [--work DIR] [--peer-python /work/peer-env/venv/bin/python]
        [--peer-script ../shared/peers/diffusers_train_text_to_image.py]
    .venv/bin/python benchmarks/gpu_throughput.py --tiny --steps 4 --warmup 1 --repeats 1

`sd15` is an SD-1.5-size UNet (860 M parameters) at 512 px, batch 8; `sdxl` the SDXL base
layout (2.6 B) at 1024 px, batch 4: random weights, with full-size CLIP-L / bigG text encoders
and the SD / SDXL VAE, built once into --work (default $DIFFTRAIN_CACHE/gpu-throughput) with
the tokenizers and scheduler of difftrain's tiny builtins, so nothing is downloaded. Both
trainers get the same folder, generated images (steps x batch), seed 0, bf16 mixed precision,
TF32, AdamW 1e-4 constant, clipping 1.0, centre crop, no checkpoint or validation, and
--num-workers loader workers. --tiny is the CPU self-check: tiny widths, 64 px, fp32.

difftrain runs in this process (`train(cfg)`): s/step is the median `step_time_s` of
metrics.jsonl after --warmup steps, peak memory torch.cuda.max_memory_allocated. The peer runs
as vs_diffusers.py runs it (accelerate launch, s/step from its progress bar), with
`--mixed_precision bf16` and `--allow_tf32`, for sd15 only (no SDXL peer script here).
nvidia-smi's per-process memory (CUDA context + the allocator's reserved pool) is polled every
0.2 s for both: the one memory figure the two can be compared on. MFU: the denoiser's FLOPs
per step (torch's FlopCounterMode on one forward + backward at the run's shapes; the VAE and
text encoders are not counted) over s/step x the GPU's dense bf16 peak. Always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_diffusers, step_time beside us

from gpu_parts import (  # noqa: E402
    BATCH,
    RESOLUTION,
    UNET,
    GpuMemoryPoll,
    build_model,
    denoiser_flops,
    free_memory,
)  # fmt: skip

REPO = Path(__file__).resolve().parent.parent
# Dense bf16 peaks (spec sheets), matched against torch.cuda.get_device_name(). H100 PCIe and
# NVL have lower peaks, so they match nothing and --peak-tflops must say.
PEAK_BF16 = [(r"H200", 989e12), (r"H100(?!.*(PCIe|NVL))", 989e12), (r"A100", 312e12),
             (r"\bL4\b", 121e12)]  # fmt: skip
PEER_SCRIPT = REPO / "../shared/peers/diffusers_train_text_to_image.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    add("--steps", type=int, default=None, help="optimizer steps per run (30; tiny 4)")
    add("--warmup", type=int, default=None, help="first steps not counted (5; tiny 1)")
    add("--batch-size", type=int, default=None, help="default 8 for sd15, 4 for sdxl (tiny 2)")
    add("--repeats", type=int, default=2, help="timed runs of each trainer")
    add("--cached", action="store_true", help="also difftrain with the latent + text cache")
    add("--num-workers", type=int, default=None, help="data-loader workers of both (4; tiny 0)")
    add("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    add("--work", type=Path, default=None, help="model folders, data and runs (reused)")
    add("--tiny", action="store_true", help="CPU self-check: tiny widths, 64 px, fp32")
    add("--peer-script", type=Path, default=PEER_SCRIPT.resolve())
    add("--peer-python", type=Path, default=Path("/work/peer-env/venv/bin/python"))
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.warmup = (1 if args.tiny else 5) if args.warmup is None else args.warmup
    args.num_workers = (0 if args.tiny else 4) if args.num_workers is None else args.num_workers
    args.precision = "no" if args.tiny else "bf16"
    args.models = [m for m in args.models.split(",") if m]
    if unknown := set(args.models) - set(UNET):
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(UNET)}")
    if args.steps < args.warmup + 2:  # the peer's figure needs two steady intervals
        parser.error("--steps must be at least --warmup + 2")
    if args.work is None:  # An empty DIFFTRAIN_CACHE means unset, as for difftrain.
        root = os.environ.get("DIFFTRAIN_CACHE") or Path.home() / ".cache" / "difftrain"
        args.work = Path(root) / "gpu-throughput"
    return args


# ---------------------------------------------------------------- the two trainers


def difftrain_config(args, model_dir, data_dir, resolution, batch, out, cache=None) -> dict:
    data = {"train_dir": str(data_dir), "resolution": resolution, "center_crop": True,
            "random_flip": False, "num_workers": args.num_workers}  # fmt: skip
    if cache is not None:
        data.update(cache_latents=True, cache_text_embeddings=True, cache_dir=str(cache))
    train = {"output_dir": str(out), "seed": 0, "max_steps": args.steps, "batch_size": batch,
             "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0,
             "max_grad_norm": 1.0, "mixed_precision": args.precision, "allow_tf32": True,
             "report_to": "none"}  # fmt: skip
    return {"model": {"pretrained": str(model_dir)}, "data": data, "train": train,
            "checkpointing": {"every_steps": 0}, "validation": {"prompts": []}}  # fmt: skip


def run_difftrain(args, raw: dict) -> dict | None:
    """train(cfg) in this process: s/step, torch's peak allocated GiB, nvidia-smi's GiB."""
    import torch

    from difftrain.config.loader import config_from_dict
    from difftrain.training.metrics import read_metrics
    from difftrain.training.trainer import train

    free_memory()  # what earlier runs left in the allocator's pool must not count
    if cuda := torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    poll, log = GpuMemoryPoll(own=True), io.StringIO()
    out = Path(raw["train"]["output_dir"])
    poll.start()
    try:
        with contextlib.redirect_stderr(log):  # train() logs every step: keep the table clear
            train(config_from_dict(raw))
        times = [float(r["step_time_s"]) for r in read_metrics(out / "metrics.jsonl")]
    except Exception as error:  # reported; the other runs still run
        print(f"    difftrain failed: {error!r}\n" + "".join(log.getvalue().splitlines(True)[-12:]))
        return None
    finally:
        smi_gib, mark = poll.gib()
        shutil.rmtree(out, ignore_errors=True)  # a saved SDXL pipeline is over 10 GB
    return {"s_step": statistics.median(times[args.warmup :]), "smi_gib": smi_gib, "mark": mark,
            "torch_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip


def run_peer(args, env, model_dir, data_dir, resolution, batch, out) -> dict | None:
    import vs_diffusers

    peer = argparse.Namespace(peer_python=args.peer_python, peer_script=args.peer_script,
                              batch_size=batch)  # fmt: skip
    command = vs_diffusers.peer_command(peer, model_dir, data_dir, resolution, args.steps, out)
    # vs_diffusers' command at this run's precision and workers, with TF32 as difftrain has.
    command[command.index("--mixed_precision") + 1] = args.precision  # accelerate's flag
    command[command.index("--dataloader_num_workers") + 1] = str(args.num_workers)
    command.append("--allow_tf32")
    poll = GpuMemoryPoll(own=False)
    poll.start()
    run = vs_diffusers.run_timed(command, env, args.steps, vs_diffusers.PEER_STEP, args.warmup)
    smi_gib, mark = poll.gib()
    shutil.rmtree(out, ignore_errors=True)
    if run.returncode != 0 or run.steady_s is None:
        print(f"    peer failed (exit {run.returncode}):\n" + "\n".join(run.tail[-12:]))
        return None
    return {"s_step": run.steady_s, "torch_gib": None, "smi_gib": smi_gib, "mark": mark}


# ---------------------------------------------------------------- one model, and its table


def peak_flops(args, device) -> tuple[float | None, str]:
    import torch

    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"peak {args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "MFU: no peak for a CPU; --peak-tflops gives one"
    name = torch.cuda.get_device_name()
    for pattern, peak in PEAK_BF16:
        if re.search(pattern, name):
            return peak, f"MFU against {name}'s {peak / 1e12:.0f} TFLOP/s dense bf16"
    return None, f"MFU: {name} is not in the peak table; --peak-tflops gives its peak"


def measure(args, env, device, name: str, peer_missing: str | None) -> None:
    import torch

    from difftrain.data.dummy import make_dummy_imagefolder

    resolution = 64 if args.tiny else RESOLUTION[name]
    batch = args.batch_size or (2 if args.tiny else BATCH[name])
    model_dir = build_model(name, args.tiny, args.work / "models" / (name + "-tiny" * args.tiny))
    count = args.steps * batch  # no run crosses an epoch
    data_dir = args.work / f"data-{resolution}px-{count}"
    if not (data_dir / "metadata.jsonl").is_file():
        make_dummy_imagefolder(data_dir, count, resolution)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    flops, params = denoiser_flops(model_dir, resolution, device, dtype)
    flops *= batch
    runs, cache = args.work / "runs", args.work / f"latent-cache-{name}"
    names = ["difftrain"]
    if args.cached:  # filled before timing, by the CLI in its own process (as vs_diffusers)
        config = runs / f"{name}-cache.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        raw = difftrain_config(args, model_dir, data_dir, resolution, batch, runs / "c", cache)
        config.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
        build = [sys.executable, "-m", "difftrain", "cache", "build", "--config", str(config)]
        done = subprocess.run(build, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            names.append("cached")
        else:
            print(f"  cache build failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    peak, peak_note = peak_flops(args, device)
    notes = [peak_note, peer_missing]
    if name != "sd15":
        notes[1] = f"peer: train_text_to_image_{name} not in ../shared/peers"
    elif peer_missing is None:
        names.append("peer")
    text = "CLIP-L (12 layers)" + " + bigG (32 layers)" * (name == "sdxl")
    if args.tiny:
        text = "tiny (2 layers)"
    elif name == "sd15":  # SD-1.5's VAE config asks for it too (force_upcast, by default)
        notes.append("VAE: difftrain encodes in fp32 (the config's force_upcast), the peer bf16")
    print(f"\n{name}: UNet {params / 1e6:.1f} M parameters, {resolution} px, batch {batch}, "
          f"{'fp32' if args.tiny else 'bf16'}, {args.steps} steps (median after {args.warmup}); "
          f"text: {text}", flush=True)  # fmt: skip
    results: dict[str, list[dict]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for who in names if repeat % 2 == 0 else names[::-1]:  # a load trend favours neither
            out = runs / f"{name}-{who}-{repeat}"
            if who == "peer":
                run = run_peer(args, env, model_dir, data_dir, resolution, batch, out)
            else:
                raw = difftrain_config(args, model_dir, data_dir, resolution, batch, out,
                                       cache if who == "cached" else None)  # fmt: skip
                run = run_difftrain(args, raw)
            if run is not None:
                results[who].append(run)
                smi_gib = f"{fmt(run['smi_gib'], 2)}{run['mark']}"
                print(f"  repeat {repeat + 1} {who:<9} {run['s_step']:.4f} s/step, "
                      f"nvidia-smi {smi_gib} GiB", flush=True)  # fmt: skip
    report(results, batch, flops, peak, notes)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"


def report(results: dict, batch: int, flops: float, peak: float | None, notes: list) -> None:
    def figures(who: str) -> dict:
        def median(key: str) -> float | None:
            values = [r[key] for r in results[who] if r[key] is not None]
            return statistics.median(values) if values else None

        s_step = median("s_step")
        tflops = flops / s_step / 1e12 if s_step else None
        return {"images/s": batch / s_step if s_step else None, "s/step": s_step,
                "peak GPU GiB (torch)": median("torch_gib"),
                "peak GPU GiB (nvidia-smi)": median("smi_gib"), "TFLOP/s achieved": tflops,
                "MFU %": 100 * tflops * 1e12 / peak if tflops and peak else None}  # fmt: skip

    table = {who: figures(who) for who in results}
    ours = [who for who in results if who != "peer"]
    ratios = [f"{who}/peer" for who in ours if "peer" in results]
    counts = ", ".join(f"{who} {len(r)}" for who, r in results.items())
    print(f"  denoiser {flops / 1e12:.4g} TFLOP per step (forward + backward); medians of runs "
          f"({counts})\n  {'':<26}" + "".join(f"{h:>16}" for h in [*results, *ratios]))  # fmt: skip
    for row in table["difftrain"]:
        theirs = table.get("peer", {}).get(row)
        cells = [table[who][row] for who in results]
        cells += [table[who][row] / theirs if table[who][row] and theirs else None
                  for who in ours if ratios]  # fmt: skip
        print(f"  {row:<26}" + "".join(f"{fmt(c):>16}" for c in cells))
    if any(r["mark"] for runs in results.values() for r in runs):
        notes.append("*: nvidia-smi listed no process of ours; the whole GPU's rise in use instead")
    print("".join(f"  ({note})\n" for note in notes if note), end="")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import vs_diffusers
    from step_time import cpu_seconds, print_other_load

    from difftrain.quiet import quiet_third_party

    quiet_third_party(libraries_loaded_soon=True)  # building the models prints library noise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its fork warning, per worker
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    missing = vs_diffusers.peer_missing(args)
    if missing:
        missing = f"peer: {missing}; build it with `{vs_diffusers.SETUP_HINT}`"
    args.work.mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    # As vs_diffusers.py: `accelerate launch` would give the peer OMP_NUM_THREADS=1.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads),
           "HF_DATASETS_CACHE": str(args.work / "hf-datasets")}  # fmt: skip
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    print(f"{gpu}, torch {torch.__version__}; {args.repeats} repeats, {args.num_workers} loader "
          f"workers, OMP_NUM_THREADS={threads}; work {args.work}", flush=True)  # fmt: skip
    started, cpu_before = time.perf_counter(), cpu_seconds()
    for model in args.models:
        measure(args, env, device, model, missing)
    print()
    if device.type == "cpu":
        print("(on a CPU, FlopCounterMode counts no attention: torch has no CPU formula for it)")
    print_other_load(cpu_before, cpu_seconds(), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
