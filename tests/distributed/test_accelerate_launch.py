"""accelerate's own launcher runs difftrain as `difftrain train --num-processes` does: on one
machine and as two "machines" on localhost (two launches, one process each).

    pytest tests/distributed/test_accelerate_launch.py --run-slow --run-integration -v

On a machine without GPUs, `accelerate launch --num_processes 2` alone starts one process
(its CPU mode needs MPI); `--multi_gpu` picks its torch launcher, and ACCELERATE_USE_CPU=1
makes each process train on the CPU with gloo. On GPUs the same command, without the
variable, is the one in the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_multiprocess import assert_bit_identical, environment, run, write_config

from difftrain.launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.distributed]


def accelerate_launch(machine_args: list[str], config: Path, out: Path, cache: Path):
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
         "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
         *machine_args, "-m", "difftrain", "train", "--config", str(config),
         "--output-dir", str(out)],
        env={**environment(cache), "ACCELERATE_USE_CPU": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path):
    """3 steps of `difftrain train --num-processes 2` (batch 2): its config and outputs."""
    folder = tmp_path_factory.mktemp("accelerate-launch")
    config = write_config(folder, dummy_data_dir, batch_size=2, max_steps=3)
    out = folder / "num-processes"
    run(["--config", str(config), "--output-dir", str(out), "--num-processes", "2"], builtin_cache)
    return config, out


@pytest.mark.parametrize("machines", [1, 2], ids=["one-machine", "two-machines"])
def test_accelerate_launch_trains_the_run_of_num_processes(
    machines: int, reference, tmp_path: Path, builtin_cache: Path
) -> None:
    config, expected = reference
    out = tmp_path / "accelerate"
    port = str(free_port())
    if machines == 1:
        launches = [accelerate_launch(["--main_process_port", port], config, out, builtin_cache)]
    else:
        machine = ["--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port"]
        launches = [
            accelerate_launch(
                [*machine, port, "--machine_rank", str(rank)], config, out, builtin_cache
            )
            for rank in (0, 1)
        ]
    for launch in launches:
        _, err = launch.communicate(timeout=600)
        assert launch.returncode == 0, err
    assert_bit_identical(expected, out)
    processes = json.loads((out / "env.json").read_text())["processes"]
    assert processes["num_processes"] == 2 and processes["backend"] == "gloo"
    assert processes["num_machines"] == machines
