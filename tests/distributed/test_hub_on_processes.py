"""`train.push_to_hub` on two processes: the main one uploads once the others are past the
last barrier, and a failed upload fails the run (the launcher exits non-zero with the line
that says how to upload later), with the outputs complete on disk.

    pytest tests/distributed/test_hub_on_processes.py --run-slow --run-integration -v
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_stand_in import REPO, HubStandIn

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.distributed]


@pytest.fixture
def stand_in(tmp_path: Path):
    hub = HubStandIn(tmp_path / "remote")
    yield hub
    hub.stop()


def push_on_two_processes(tmp_path: Path, data: Path, hub: HubStandIn, cache: Path):
    config = tmp_path / "push.yaml"
    config.write_text(
        f"data: {{train_dir: '{data}', resolution: 64}}\n"
        "train: {max_steps: 2, batch_size: 2, push_to_hub: true}\n"
        "checkpointing: {every_steps: 0}\n"
        f"hub: {{repo_id: {REPO}}}\n"
    )
    env = {
        **os.environ, "DIFFTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "hf_difftrainTestToken0123456789",
        "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
    }  # fmt: skip
    out = tmp_path / "out"
    command = [sys.executable, "-m", "difftrain", "train", "--config", str(config),
               "--output-dir", str(out), "--num-processes", "2"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return result, out


def test_the_main_process_uploads_the_outputs_once(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, stand_in: HubStandIn
) -> None:
    result, out = push_on_two_processes(tmp_path, dummy_data_dir, stand_in, builtin_cache)
    assert result.returncode == 0, result.stderr
    remote = stand_in.files()
    assert remote["model_index.json"] == (out / "model_index.json").read_bytes()
    assert (
        remote["unet/diffusion_pytorch_model.safetensors"]
        == (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert len(stand_in.commits) == 1  # one process uploaded, once


def test_a_failed_upload_fails_the_run_and_keeps_the_outputs(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, stand_in: HubStandIn
) -> None:
    stand_in.fail["commit"] = 403
    result, out = push_on_two_processes(tmp_path, dummy_data_dir, stand_in, builtin_cache)
    assert result.returncode != 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("difftrain: error")]
    assert len(errors) == 1 and "hf upload" in errors[0], result.stderr
    assert f"they are complete in {out}: upload them later with `hf upload " in errors[0]
    assert "Traceback" not in result.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not stand_in.files()
