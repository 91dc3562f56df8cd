"""Several training processes (gloo on the CPU): the same run as one process with the same
global batch, resumable on any number of processes, stopped cleanly by a signal, stopped
quickly when one process dies.

    pytest tests/distributed --run-slow --run-integration -v     (or: nox -s distributed)

Tolerance: runs on different numbers of processes add up gradients in a different order, so
they agree to float rounding (losses rel 1e-5; weights atol 1e-4 after 12 Adam steps at
lr 1e-3, which move weights by about 1e-2); runs on the same number are bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.launch import free_port
from difftrain.training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.distributed]

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
STEPS = 12
RTOL_LOSS, ATOL_WEIGHTS = 1e-5, 1e-4


def write_config(folder: Path, data: Path, batch_size: int, max_steps: int = STEPS) -> Path:
    path = folder / f"b{batch_size}-s{max_steps}.yaml"
    path.write_text(
        f"data: {{train_dir: '{data}', resolution: 64, random_flip: true}}\n"
        f"train: {{max_steps: {max_steps}, batch_size: {batch_size}, learning_rate: 1.0e-3,\n"
        "        deterministic: true}\n"
        "checkpointing: {every_steps: 3}\n"
    )
    return path


def environment(builtin_cache: Path) -> dict[str, str]:
    return {**os.environ, "DIFFTRAIN_CACHE": str(builtin_cache), "OMP_NUM_THREADS": "1"}


def difftrain(args: list[str], builtin_cache: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "difftrain", "train", *args],
        env=environment(builtin_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, **popen,
    )  # fmt: skip


def run(args: list[str], builtin_cache: Path, expect: int = 0) -> str:
    process = difftrain(args, builtin_cache)
    _, err = process.communicate(timeout=600)
    assert process.returncode == expect, err
    return err


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl")]


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = load_file(a / UNET_WEIGHTS), load_file(b / UNET_WEIGHTS)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(a) == losses(b)


def assert_close(a: Path, b: Path) -> None:
    assert losses(a) == pytest.approx(losses(b), rel=RTOL_LOSS)
    wa, wb = load_file(a / UNET_WEIGHTS), load_file(b / UNET_WEIGHTS)
    for key, value in wa.items():
        torch.testing.assert_close(wb[key], value, rtol=0, atol=ATOL_WEIGHTS)


@pytest.fixture(scope="module")
def work(tmp_path_factory, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path):
    """The reference: 12 steps on 2 processes x batch 2 (global batch 4)."""
    folder = tmp_path_factory.mktemp("distributed")
    straight = folder / "straight-2p"
    config = write_config(folder, dummy_data_dir, batch_size=2)
    run(["--config", str(config), "--output-dir", str(straight), "--num-processes", "2"],
        builtin_cache)  # fmt: skip
    return folder, straight


@pytest.fixture(scope="module")
def stopped_at_3(work, dummy_data_dir: Path, builtin_cache: Path) -> Path:
    """The same run stopped after step 3 (its checkpoint-3 and a 3-step pipeline)."""
    folder, _ = work
    out = folder / "stopped-at-3-on-2p"
    config = write_config(folder, dummy_data_dir, 2)
    run(["--config", str(config), "--output-dir", str(out), "--set", "train.max_steps=3",
         "--num-processes", "2"], builtin_cache)  # fmt: skip
    return out


def test_two_processes_train_like_one_with_the_same_global_batch(
    work, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, straight = work
    single = folder / "straight-1p"
    run(["--config", str(write_config(folder, dummy_data_dir, 4)), "--output-dir", str(single)],
        builtin_cache)  # fmt: skip
    assert_close(straight, single)
    # One run's files: one line per step, one set of checkpoints, one pipeline.
    assert [row["step"] for row in read_metrics(straight / "metrics.jsonl")] == list(range(1, 13))
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == [
        "checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"
    ]  # fmt: skip
    assert sorted((straight / "checkpoint-3").glob("rng_state_*")) == [
        straight / "checkpoint-3" / "rng_state_0.safetensors",
        straight / "checkpoint-3" / "rng_state_1.safetensors",
    ]
    env = json.loads((straight / "env.json").read_text())
    assert env["processes"]["num_processes"] == 2 and env["processes"]["backend"] == "gloo"
    log = (straight / "logs" / "train.log").read_text()
    assert "batch 2 x 1 accumulation x 2 processes = 4 images per step" in log


def test_resume_on_two_processes_is_bit_exact(
    work, stopped_at_3: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, straight = work
    out = folder / "resumed-2p"
    shutil.copytree(stopped_at_3, out)
    run(["--config", str(write_config(folder, dummy_data_dir, 2)), "--output-dir", str(out),
         "--resume-from-checkpoint", "latest", "--num-processes", "2"], builtin_cache)  # fmt: skip
    assert_bit_identical(straight, out)


def test_resume_on_another_number_of_processes(
    work, stopped_at_3: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, straight = work
    # 2 processes x batch 2 -> 1 process x batch 4: the same global batch, so allowed.
    on_one = folder / "2p-then-1p"
    shutil.copytree(stopped_at_3, on_one)
    run(["--config", str(write_config(folder, dummy_data_dir, 4)), "--output-dir", str(on_one),
         "--resume-from-checkpoint", "latest"], builtin_cache)  # fmt: skip
    assert_close(straight, on_one)
    # ...and 1 process x batch 4 -> 2 processes x batch 2.
    on_two = folder / "1p-then-2p"
    config4 = write_config(folder, dummy_data_dir, 4)
    run(["--config", str(config4), "--output-dir", str(on_two), "--set", "train.max_steps=3"],
        builtin_cache)  # fmt: skip
    run(["--config", str(write_config(folder, dummy_data_dir, 2)), "--output-dir", str(on_two),
         "--resume-from-checkpoint", "latest", "--num-processes", "2"], builtin_cache)  # fmt: skip
    assert_close(straight, on_two)


def test_killing_one_process_stops_both_and_latest_finishes_the_run(
    work, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, straight = work
    out = folder / "killed"
    config = write_config(folder, dummy_data_dir, 2)
    args = ["--config", str(config), "--output-dir", str(out), "--num-processes", "2"]
    launcher = difftrain(args, builtin_cache)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-3").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint-3"
        time.sleep(0.01)
    workers = children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert not any(alive(pid) for pid in workers)
    if (out / UNET_WEIGHTS).exists():
        pytest.skip("the run finished before the kill landed")
    run([*args, "--resume-from-checkpoint", "latest"], builtin_cache)
    assert_bit_identical(straight, out)


def start_endless_run(folder: Path, out: Path, data: Path, builtin_cache: Path) -> subprocess.Popen:
    """A 2-process run with no end in sight, returned once it has logged 2 steps."""
    config = write_config(folder, data, 2, max_steps=100_000)
    launcher = difftrain(
        ["--config", str(config), "--output-dir", str(out), "--num-processes", "2"], builtin_cache
    )
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return launcher


def assert_every_process_checkpointed_the_last_step(out: Path) -> None:
    """The checkpoint written for a signal, on the step it hit, holds both RNG states."""
    last_step = read_metrics(out / "metrics.jsonl")[-1]["step"]
    checkpoint = out / f"checkpoint-{last_step}"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*")) == [
        "rng_state_0.safetensors", "rng_state_1.safetensors"
    ]  # fmt: skip


def test_sigint_to_the_launcher_checkpoints_every_process(
    work, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, straight = work
    out = folder / "interrupted"
    launcher = start_endless_run(folder, out, dummy_data_dir, builtin_cache)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    # The launcher passes SIGINT on to the workers, and they exit with its code, 130.
    assert launcher.returncode == 130, err
    assert_every_process_checkpointed_the_last_step(out)
    assert "continue with --resume-from-checkpoint latest" in err


def test_sigterm_to_one_process_stops_both_after_the_same_step(
    work, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, _ = work
    out = folder / "one-signalled"
    launcher = start_endless_run(folder, out, dummy_data_dir, builtin_cache)
    workers = children(launcher.pid)
    os.kill(workers[-1], signal.SIGTERM)  # the second process only, as a scheduler might
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, err
    assert_every_process_checkpointed_the_last_step(out)
    assert not any(alive(pid) for pid in workers)


def test_two_nodes_on_localhost_equal_one_node_with_two_processes(
    work, stopped_at_3: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, _ = work
    one_node = stopped_at_3
    out = folder / "two-nodes"
    config = write_config(folder, dummy_data_dir, 2, max_steps=3)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "-m",
                "difftrain",
                "train",
                "--config",
                str(config),
                "--output-dir",
                str(out),
            ],
            env={**environment(builtin_cache), "ACCELERATE_USE_CPU": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err
    assert_bit_identical(one_node, out)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_fsdp_trains_like_ddp_and_resumes_bit_exactly(
    work, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, ddp = work
    config = folder / "fsdp.yaml"
    config.write_text(
        write_config(folder, dummy_data_dir, 2)
        .read_text()
        .replace("deterministic: true}", "deterministic: true, fsdp: true}")
        + f"validation: {{prompts: [a red circle], num_inference_steps: 2, every_steps: 6,\n"
        f"             loss_every_steps: 3, loss_dir: '{dummy_data_dir}'}}\n"
    )
    two = ["--num-processes", "2"]
    straight = folder / "fsdp-straight"
    run(["--config", str(config), "--output-dir", str(straight), *two], builtin_cache)
    # Sharded maths is DDP's maths: the same run to float rounding.
    assert_close(ddp, straight)
    # Outputs are ordinary: the pipeline and a checkpoint's UNet load without FSDP.
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    StableDiffusionPipeline.from_pretrained(straight)
    UNet2DConditionModel.from_pretrained(straight / "checkpoint-6" / "unet")
    rows = read_metrics(straight / "metrics.jsonl")
    assert [row["step"] for row in rows if "val_loss" in row] == [3, 6, 9, 12]
    assert (straight / "samples" / "step-6.png").is_file()
    # Stopped at step 3 and resumed (on the same 2 processes): bit for bit.
    resumed = folder / "fsdp-resumed"
    run(["--config", str(config), "--output-dir", str(resumed), "--set", "train.max_steps=3",
         *two], builtin_cache)  # fmt: skip
    run(["--config", str(config), "--output-dir", str(resumed), "--resume-from-checkpoint",
         "latest", *two], builtin_cache)  # fmt: skip
    assert_bit_identical(straight, resumed)


def test_lora_dropout_is_the_same_on_one_and_two_processes(
    work, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    folder, _ = work
    outs = {}
    for processes, batch in [(1, 4), (2, 2)]:
        config = folder / f"lora-{processes}.yaml"
        config.write_text(
            write_config(folder, dummy_data_dir, batch, max_steps=4).read_text()
            + "lora: {enabled: true, rank: 4, dropout: 0.3}\n"
        )
        outs[processes] = folder / f"lora-{processes}p"
        run(["--config", str(config), "--output-dir", str(outs[processes]),
             "--num-processes", str(processes)], builtin_cache)  # fmt: skip
    assert losses(outs[1]) == pytest.approx(losses(outs[2]), rel=RTOL_LOSS)
    a = load_file(outs[1] / "pytorch_lora_weights.safetensors")
    b = load_file(outs[2] / "pytorch_lora_weights.safetensors")
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=ATOL_WEIGHTS)
