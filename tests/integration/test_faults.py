"""Fault injection: a training process killed with SIGKILL again and again, some kills landing
inside a checkpoint write, resumed with `latest` each time, ends bit-identical to a run that
was never interrupted.

    pytest tests/integration/test_faults.py --run-slow --run-integration -v
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from watching import steps_done, wait_until

from difftrain.config import resolve_run_config
from difftrain.training.checkpoint import list_checkpoints
from difftrain.training.metrics import read_metrics
from difftrain.training.trainer import train

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
KILLS = 12
MAX_STEPS = 40


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.text2image
def test_sigkill_and_resume_matches_an_uninterrupted_run(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path
) -> None:
    config = tmp_path / "faults.yaml"
    config.write_text(
        f"data: {{train_dir: {dummy_data_dir}, resolution: 64, random_flip: true}}\n"
        f"train: {{max_steps: {MAX_STEPS}, batch_size: 3, gradient_accumulation_steps: 2,\n"
        "        learning_rate: 1.0e-3, lr_scheduler: cosine, deterministic: true}\n"
        "checkpointing: {every_steps: 1, total_limit: 2}\n"
    )
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "difftrain", "train", "--config", str(config),
        "--output-dir", str(out), "--resume-from-checkpoint", "latest",
    ]  # fmt: skip
    env = {**os.environ, "DIFFTRAIN_CACHE": str(builtin_cache)}
    rng = random.Random(1234)
    kills = inside_checkpoint_write = 0
    while True:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if kills < KILLS:
            start = steps_done(out)
            if kills % 2:
                # Odd kills: wait for a checkpoint write to begin, then kill inside it.
                alive = wait_until(lambda: any(out.glob(".checkpoint-*.partial")), process)
            else:
                # Even kills: a random moment a few steps on.
                target = start + rng.randint(1, 3)
                alive = wait_until(lambda target=target: steps_done(out) >= target, process)
                time.sleep(rng.uniform(0, 0.05))
            if alive and process.poll() is None:
                inside_checkpoint_write += any(out.glob(".checkpoint-*.partial"))
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                continue
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        break

    assert kills >= 10
    assert inside_checkpoint_write >= 3
    straight = train(resolve_run_config(config, output_dir=str(tmp_path / "straight")))
    a, b = load_file(straight.output_dir / UNET_WEIGHTS), load_file(out / UNET_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    killed_losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl")]
    assert killed_losses == straight.losses
    assert [step for step, _ in list_checkpoints(out)] == [MAX_STEPS - 1, MAX_STEPS]
    assert not list(out.glob(".checkpoint-*")) and not list(out.glob(".final.*"))
