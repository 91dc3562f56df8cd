"""Aspect-ratio buckets: their shapes, which image goes where, a stream of single-bucket
batches that resumes exactly, and training runs on them."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image
from test_families import family_config

from difftrain.data.buckets import BucketSampler, assign_buckets, bucket_sizes
from difftrain.training.trainer import train

SHAPES = [(96, 64)] * 6 + [(64, 96)] * 6 + [(64, 64)] * 5 + [(200, 50)]


@pytest.fixture
def mixed_data(tmp_path: Path) -> Path:
    """18 captioned images: landscape, portrait, square, and one far too wide."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = random.Random(0)
    rows = []
    for i, (w, h) in enumerate(SHAPES):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (w, h), colour).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a red circle"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


@pytest.mark.parametrize(("resolution", "step"), [(64, 8), (512, 8), (1024, 16)])
def test_bucket_sides_are_steps_and_the_area_is_about_the_resolution_squared(
    resolution: int, step: int
) -> None:
    sizes = bucket_sizes(resolution, step, 2.0)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert max(w / h, h / w) <= 2.0
        assert abs(w * h / resolution**2 - 1) < 0.2
    assert len(bucket_sizes(resolution, step, 1.0)) == 1


def test_each_image_goes_to_the_bucket_nearest_its_shape() -> None:
    buckets = assign_buckets([(1500, 1000), (1000, 1500), (800, 800)], 512, 8, 2.0)
    (wide_w, wide_h), (tall_w, tall_h), square = (buckets.size_of(i) for i in range(3))
    assert wide_w > wide_h and tall_h > tall_w and square == (512, 512)
    assert math.isclose(wide_w / wide_h, 1.5, rel_tol=0.1)


def test_every_batch_of_every_process_is_one_bucket_and_resume_continues_exactly() -> None:
    sizes = [(1500, 1000)] * 7 + [(1000, 1500)] * 9 + [(800, 800)] * 5
    buckets = assign_buckets(sizes, 512, 8, 2.0)
    batch, world = 2, 2
    streams = [
        list(itertools.islice(iter(BucketSampler(buckets, batch * world, 3, rank=r,
                                                 world_size=world)), 40))
        for r in range(world)
    ]  # fmt: skip
    for stream in streams:
        for start in range(0, len(stream), batch):
            chunk = stream[start : start + batch]
            assert len({buckets.of_item[key.index] for key in chunk}) == 1
    # One epoch uses every image of a bucket that fills whole blocks, each once.
    sampler = BucketSampler(buckets, batch * world, 3)
    epoch = list(itertools.islice(iter(sampler), sampler.epoch_length))
    assert sampler.epoch_length == 4 + 8 + 4
    assert len({key.index for key in epoch}) == sampler.epoch_length
    # Resumed at position p: the same keys the uninterrupted stream had from p on.
    full = list(itertools.islice(iter(BucketSampler(buckets, 4, 3)), 60))
    resumed = list(itertools.islice(iter(BucketSampler(buckets, 4, 3, start_position=22)), 38))
    assert resumed == full[22:]
    other_seed = list(itertools.islice(iter(BucketSampler(buckets, 4, 4)), 60))
    assert other_seed != full


def test_a_run_on_buckets_trains_each_shape_and_resumes_bit_exactly(
    tmp_path: Path, mixed_data: Path, builtin_cache, monkeypatch
) -> None:
    from difftrain.models.families import sdxl

    seen = []
    original = sdxl.time_ids

    def spy(batch, **kwargs):
        seen.append((tuple(batch["target_size"][0].tolist()), tuple(batch["pixel_values"].shape)))
        return original(batch, **kwargs)

    monkeypatch.setattr(sdxl, "time_ids", spy)

    def config(name: str, **train_cfg):
        return family_config(
            "sdxl", tmp_path / name, mixed_data, data={"buckets": True},
            train={"max_steps": 8, **train_cfg}, checkpointing={"every_steps": 4},
        )  # fmt: skip

    straight = train(config("straight"))
    table = json.loads((tmp_path / "straight" / "buckets.json").read_text())
    assert table["unused"] == ["88x48"] and table["images_per_epoch"] == 16
    # The UNet saw batches of several shapes, each with its own size conditioning.
    shapes = {pixels[2:] for _, pixels in seen}
    assert len(shapes) >= 2
    assert all(target == pixels[2:] for target, pixels in seen)
    train(config("resumed", max_steps=4))
    resumed = train(config("resumed", resume_from_checkpoint="latest"))
    assert resumed.losses == straight.losses[4:]


def test_buckets_work_with_the_latent_cache(
    tmp_path: Path, mixed_data: Path, builtin_cache
) -> None:
    data = {"buckets": True, "center_crop": True, "cache_latents": True,
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    plain = train(family_config("sd", tmp_path / "p", mixed_data,
                                data={"buckets": True, "center_crop": True}))  # fmt: skip
    cached = train(family_config("sd", tmp_path / "c", mixed_data, data=data))
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)


def test_no_bucket_that_fills_a_batch_is_refused(tmp_path: Path, mixed_data: Path, capsys) -> None:
    from difftrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train_dir: '{mixed_data}', resolution: 64, buckets: true}}\n"
                      "train: {batch_size: 7}\n")  # fmt: skip
    code = main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.buckets: no aspect-ratio bucket holds 7" in err[0]
    assert not (tmp_path / "o").exists()
