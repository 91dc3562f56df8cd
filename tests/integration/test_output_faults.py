"""Faults around the output folder, with real processes: a second run on a busy folder, kills
and Ctrl-C during the final save, Ctrl-C during start-up.

    pytest tests/integration/test_output_faults.py --run-slow --run-integration -v
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from watching import steps_done, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.text2image]


def write_config(tmp_path: Path, data: Path, max_steps: int, every: int) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{train_dir: '{data}', resolution: 64}}\n"
        f"train: {{max_steps: {max_steps}, batch_size: 2}}\n"
        f"checkpointing: {{every_steps: {every}}}\n"
    )
    return config


def start(config: Path, out: Path, builtin_cache: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "difftrain", "train", "--config", str(config),
               "--output-dir", str(out), *extra]  # fmt: skip
    env = {**os.environ, "DIFFTRAIN_CACHE": str(builtin_cache)}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def pipeline_is_complete(out: Path) -> bool:
    """Every component model_index.json names is there with its config and weights."""
    index = json.loads((out / "model_index.json").read_text())
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = out / name
        if not folder.is_dir() or not any(folder.iterdir()):
            return False
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out)  # raises on anything torn
    return True


def test_a_second_run_on_a_busy_folder_is_refused_and_changes_nothing(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path
) -> None:
    config = write_config(tmp_path, dummy_data_dir, max_steps=100_000, every=5)
    out = tmp_path / "out"
    first = start(config, out, builtin_cache)
    try:
        assert wait_until(lambda: steps_done(out) >= 3, first)
        second = start(config, out, builtin_cache, "--resume-from-checkpoint", "latest")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        (line,) = err.strip().splitlines()
        assert line == (
            f"difftrain: error: --output-dir {out} is in use by process {first.pid} (another "
            "difftrain run); wait for it to finish, or choose another --output-dir"
        )
        assert first.poll() is None  # the first run never noticed
    finally:
        first.send_signal(signal.SIGTERM)  # checkpoint and stop
        _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, in order
    # The lock went with the first run: the folder can be continued now.
    third = start(config, out, builtin_cache, "--resume-from-checkpoint", "latest",
                  "--set", f"train.max_steps={len(steps) + 1}")  # fmt: skip
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert pipeline_is_complete(out)


def test_kills_during_the_final_save_never_leave_a_torn_pipeline(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path
) -> None:
    config = write_config(tmp_path, dummy_data_dir, max_steps=2, every=2)
    out = tmp_path / "out"
    # How long the save takes on this machine, from its temporary folder to the exit: the
    # kills below are spread over that window (a fixed delay misses a save that got faster).
    process = start(config, out, builtin_cache, "--resume-from-checkpoint", "latest")
    assert wait_until(lambda: any(out.glob(".final.*")), process)
    began = time.monotonic()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    window = time.monotonic() - began
    kills = 0
    for attempt in range(8):
        process = start(config, out, builtin_cache, "--resume-from-checkpoint", "latest")
        if wait_until(lambda: any(out.glob(".final.*")), process):
            time.sleep(window * attempt / 10)  # from the save's start to 70% of the way
            process.kill()
            kills += process.wait() == -signal.SIGKILL
        else:
            _, err = process.communicate()
            assert process.returncode == 0, err
        if (out / "model_index.json").exists():
            assert pipeline_is_complete(out), f"torn pipeline after attempt {attempt}"
    assert kills >= 4, f"only {kills} of 8 kills landed before the exit ({window:.2f} s save)"
    process = start(config, out, builtin_cache, "--resume-from-checkpoint", "latest")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert pipeline_is_complete(out)
    assert not list(out.glob(".final.*")) and not list(out.glob(".*.difftrain-old"))


def test_ctrl_c_during_the_final_save_finishes_it(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path
) -> None:
    config = write_config(tmp_path, dummy_data_dir, max_steps=2, every=2)
    out = tmp_path / "out"
    process = start(config, out, builtin_cache)
    assert wait_until(lambda: any(out.glob(".final.*")), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "SIGINT arrived after the last step: the outputs are complete" in err
    assert "Traceback" not in err
    assert pipeline_is_complete(out) and (out / "README.md").is_file()


@pytest.mark.parametrize("delay", [0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0])
def test_ctrl_c_at_any_moment_of_start_up_is_exit_130_without_a_traceback(
    delay: float, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path
) -> None:
    config = write_config(tmp_path, dummy_data_dir, max_steps=1000, every=0)
    process = start(config, tmp_path / "out", builtin_cache)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(("difftrain: interrupted", "difftrain: training stopped"))
    )
