"""The data pipeline on several processes: a bucketed, cached run on two processes is the run
on one (the cache filled by both at once), a bucketed checkpoint resumes only on the same
batch x processes block, and `difftrain cache build` under a launcher splits the images.

    pytest tests/distributed/test_data_on_processes.py --run-slow --run-integration -v

Tolerances as in test_multiprocess.py: another process count adds gradients up in another
order, so runs agree to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_multiprocess import assert_close, environment, losses, run

from difftrain.data.cache import TensorCache
from difftrain.launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.distributed]

# Landscape, portrait and square images: three buckets at 64 px.
SHAPES = [(96, 64)] * 4 + [(64, 96)] * 4 + [(64, 64)] * 4


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    rng = random.Random(0)
    rows = []
    for i, (w, h) in enumerate(SHAPES):
        Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3))).save(
            folder / f"{i}.png"
        )
        rows.append({"file_name": f"{i}.png", "text": f"picture number {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def bucket_config(folder: Path, data: Path, cache: Path, batch: int, steps: int = 8) -> Path:
    path = folder / f"buckets-b{batch}-s{steps}.yaml"
    path.write_text(
        f"data: {{train_dir: '{data}', resolution: 64, buckets: true, center_crop: true,\n"
        f"       random_flip: true, cache_latents: true, cache_text_embeddings: true,\n"
        f"       cache_dir: '{cache}'}}\n"
        f"train: {{max_steps: {steps}, batch_size: {batch}, learning_rate: 1.0e-3,\n"
        "        deterministic: true}\n"
        "checkpointing: {every_steps: 4}\n"
    )
    return path


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_bucketed_cached_run_on_two_processes_is_the_run_on_one(
    tmp_path: Path, mixed_data: Path, builtin_cache: Path, tiny_model_dir: Path
) -> None:
    cache = tmp_path / "cache"
    two = tmp_path / "two"
    # Two processes fill the empty cache at the same time...
    run(["--config", str(bucket_config(tmp_path, mixed_data, cache, 2)), "--output-dir",
         str(two), "--num-processes", "2"], builtin_cache)  # fmt: skip
    entries = TensorCache(cache).info()
    assert entries["latent"]["entries"] > len(SHAPES)  # the (image, flip) pairs drawn
    # ...and one process, reading that cache, trains the same run with the same global batch.
    one = tmp_path / "one"
    err = run(["--config", str(bucket_config(tmp_path, mixed_data, cache, 4)), "--output-dir",
               str(one)], builtin_cache)  # fmt: skip
    assert_close(two, one)
    assert json.loads((two / "buckets.json").read_text()) == json.loads(
        (one / "buckets.json").read_text()
    )
    # The same draws, so every entry was there: nothing computed, nothing written.
    assert TensorCache(cache).info() == entries
    log = (one / "logs" / "train.log").read_text()
    assert "latent cache:" in log and "0 computed" in log, err

    # The 2 x 2 checkpoint resumes on 1 x 4 (the same block of 4 images per bucket batch)...
    stopped = tmp_path / "stopped-at-4"
    run(["--config", str(bucket_config(tmp_path, mixed_data, cache, 2, steps=4)),
         "--output-dir", str(stopped), "--num-processes", "2"], builtin_cache)  # fmt: skip
    on_one = Path(shutil.copytree(stopped, tmp_path / "two-then-one"))
    run(["--config", str(bucket_config(tmp_path, mixed_data, cache, 4)), "--output-dir",
         str(on_one), "--resume-from-checkpoint", "latest"], builtin_cache)  # fmt: skip
    assert losses(on_one) == pytest.approx(losses(two), rel=1e-5)

    # ...but not on 1 x 2: bucket batches would be cut differently. One line, nothing changed.
    before = hashes(stopped)
    err = run(["--config", str(bucket_config(tmp_path, mixed_data, cache, 2)), "--output-dir",
               str(stopped), "--resume-from-checkpoint", "latest"], builtin_cache, expect=2)  # fmt: skip
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "batch" in lines[0] and "process" in lines[0], lines[0]
    assert hashes(stopped) == before


def test_cache_build_under_a_launcher_splits_the_images_between_processes(
    tmp_path: Path, mixed_data: Path, builtin_cache: Path, tiny_model_dir: Path
) -> None:
    cache = tmp_path / "cache"
    config = bucket_config(tmp_path, mixed_data, cache, 2)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(free_port()), "-m", "difftrain", "cache", "build",
              "--config", str(config)]  # fmt: skip
    done = subprocess.run(
        launch, env=environment(builtin_cache), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    shares = [line for line in done.stdout.splitlines() if "images on this process" in line]
    assert sorted(line.rsplit(";", 1)[1].strip() for line in shares) == [
        "6 of 12 images on this process", "6 of 12 images on this process",
    ]  # fmt: skip
    assert TensorCache(cache).info()["latent"]["entries"] == 2 * len(SHAPES)
    # The run then computes nothing: every latent and caption was built by one process or other.
    out = tmp_path / "out"
    run(["--config", str(config), "--output-dir", str(out), "--num-processes", "2"],
        builtin_cache)  # fmt: skip
    summary = [
        line for line in (out / "logs" / "train.log").read_text().splitlines() if "cache:" in line
    ]
    assert summary and "latent cache:" in summary[-1], summary
    assert summary[-1].count(" 0 computed") == 2, summary[-1]
