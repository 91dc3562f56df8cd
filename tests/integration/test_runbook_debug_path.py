"""The runbook's debug path, run as a test engineer runs it: three scripts as subprocesses,
from the folder above the checkout, with exactly the runbook's command lines.

The smoke config names a hub model; it is laid into a private Hugging Face cache and loaded
with HF_HUB_OFFLINE=1, so the real hub-loading code runs without a network.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO.parent / "shared" / "runbook.md"
DEBUG_PATH = [
    "python ./difftrain/scripts/make_dummy_imagefolder.py --output-dir ./data/smoke_text2image --num-images 4 --image-size 64",
    "python ./difftrain/scripts/validate_config.py --config ./difftrain/configs/smoke_text2image.yaml --output-dir ./difftrain/_tmp_run --deterministic",
    "python ./difftrain/scripts/train_text_to_image.py --config ./difftrain/configs/smoke_text2image.yaml --output-dir ./difftrain/_tmp_run",
]
SMOKE_HUB_MODEL = "hf-internal-testing/tiny-stable-diffusion-pipe"


def test_commands_match_the_runbook() -> None:
    if not RUNBOOK.is_file():
        pytest.skip(f"the runbook is not beside this checkout ({RUNBOOK})")
    commands = re.findall(r"`(python \./difftrain/scripts/[^`]+)`", RUNBOOK.read_text())
    assert commands == DEBUG_PATH


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.text2image
def test_runbook_debug_path_runs_as_written(
    tmp_path: Path, hub_cache, tiny_model_dir: Path
) -> None:
    import subprocess
    import sys

    # The folder the test engineer stands in: ./difftrain is the checkout (its scripts and configs).
    checkout = tmp_path / "difftrain"
    for part in ("scripts", "configs"):
        shutil.copytree(REPO / part, checkout / part)
    hub_cache.install(SMOKE_HUB_MODEL, tiny_model_dir)
    env = {**hub_cache.env, "PATH": f"{Path(sys.executable).parent}:{hub_cache.env['PATH']}"}

    for command in DEBUG_PATH:
        result = subprocess.run(
            shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

    run = tmp_path / "difftrain" / "_tmp_run"
    assert (tmp_path / "data" / "smoke_text2image" / "metadata.jsonl").is_file()
    for name in (
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "unet/diffusion_pytorch_model.safetensors",
    ):
        assert (run / name).is_file(), name
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2
    assert json.loads((run / "env.json").read_text())["determinism"]["deterministic_algorithms"]
