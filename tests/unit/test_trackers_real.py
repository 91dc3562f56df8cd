"""TensorBoard and W&B for real: a short tiny run, then its tracker files read back.

No fakes: the event files are read with TensorBoard's own EventAccumulator, and the W&B
offline run's `.wandb` log record by record with wandb's own protobuf schema. The scalars
must be the numbers of metrics.jsonl at their steps, and each validation grid must be there
as an image with the pixels of samples/step-N.png. The W&B run is a `difftrain train`
process of its own, offline, with every W&B folder in the test's tmp and no API key, so its
terminal output can be checked too.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from difftrain.config import config_from_dict
from difftrain.training.metrics import read_metrics
from difftrain.training.trainer import train

STEPS = 4
SCALARS = ("loss", "lr", "grad_norm", "val_loss")
GRID_STEPS = (2, 4)


def sections(data_dir: Path, report_to: str) -> dict:
    return {
        "model": {"pretrained": "builtin:tiny"},
        "data": {"train_dir": str(data_dir), "resolution": 64},
        "train": {"max_steps": STEPS, "batch_size": 2, "learning_rate": 1e-3,
                  "deterministic": True, "report_to": report_to},
        "checkpointing": {"every_steps": 2},
        "validation": {"prompts": ["a red circle", "a blue square"], "every_steps": 2,
                       "num_inference_steps": 2, "loss_every_steps": 2,
                       "loss_dir": str(data_dir), "loss_timesteps": [100, 900]},
    }  # fmt: skip


def pixels(data: bytes | Path):
    """An image file's (size, RGB bytes)."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.size, image.convert("RGB").tobytes()


def metrics_by_key(out: Path) -> dict[str, list[tuple[int, float]]]:
    rows = read_metrics(out / "metrics.jsonl")
    return {key: [(r["step"], r[key]) for r in rows if key in r] for key in SCALARS}


# --- TensorBoard ------------------------------------------------------------------------------


def tensorboard_events(out: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(out / "logs" / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    events.Reload()
    return events


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, dummy_data_dir: Path, tiny_model_dir: Path) -> Path:
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tensorboard") / "out"
    raw = sections(dummy_data_dir, "tensorboard")
    raw["train"]["output_dir"] = str(out)
    train(config_from_dict(raw))
    return out


def test_tensorboard_scalars_are_the_metrics_at_their_steps(tensorboard_run: Path) -> None:
    events = tensorboard_events(tensorboard_run)
    expected = metrics_by_key(tensorboard_run)
    assert [step for step, _ in expected["val_loss"]] == [2, 4]
    assert [step for step, _ in expected["loss"]] == [1, 2, 3, 4]
    for key in SCALARS:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [s for s, _ in expected[key]], key
        for (_, got), (_, want) in zip(logged, expected[key], strict=True):
            assert got == pytest.approx(want, rel=1e-6), key  # events hold float32


def test_tensorboard_has_each_validation_grid_as_an_image(tensorboard_run: Path) -> None:
    events = tensorboard_events(tensorboard_run)
    images = events.Images("samples")
    assert [image.step for image in images] == list(GRID_STEPS)
    for image in images:
        grid = tensorboard_run / "samples" / f"step-{image.step}.png"
        size, data = pixels(image.encoded_image_string)
        assert (image.width, image.height) == size
        assert (size, data) == pixels(grid)  # PNG both ways: the very same pixels


def test_resumed_tensorboard_run_has_no_doubled_steps(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    raw = sections(dummy_data_dir, "tensorboard")
    raw["train"]["output_dir"] = str(out)
    raw["validation"] = {"loss_every_steps": 2, "loss_dir": str(dummy_data_dir)}
    train(config_from_dict(raw))
    # Back to checkpoint-2: steps 3 and 4 train again, in a second events file.
    raw["train"]["resume_from_checkpoint"] = str(out / "checkpoint-2")
    train(config_from_dict(raw))

    assert len(list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = tensorboard_events(out)
    expected = metrics_by_key(out)
    for key in ("loss", "val_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [s for s, _ in expected[key]], key  # each step once
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected[key]], rel=1e-6)


# --- Weights & Biases (offline) ---------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """Every record of a `.wandb` transaction log, as wandb's own protobuf `Record`s.

    The log is LevelDB's log format (32 KiB blocks of checksummed chunks) after a 7-byte
    W&B header; wandb has no public Python reader for it any more.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, records, pending, pos = 32768, [], b"", 7
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # padding to the block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records) -> dict[int, dict[str, object]]:
    """Step -> {key: value} of the run's history rows (nested keys joined with '.')."""
    rows: dict[int, dict[str, object]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = rows.setdefault(record.history.step.num, {})
            for item in record.history.item:
                key = ".".join(item.nested_key) if item.nested_key else item.key
                row[key] = json.loads(item.value_json)
    return rows


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, dummy_data_dir: Path, builtin_cache: Path, tiny_model_dir: Path):
    """`difftrain train` with report_to: wandb, offline, in a child process."""
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(sections(dummy_data_dir, "wandb")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline", WANDB_DIR=str(root / "wandb-dir"),
        WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_CACHE_DIR=str(root / "wandb-cache"),
        WANDB_DATA_DIR=str(root / "wandb-data"), DIFFTRAIN_CACHE=str(builtin_cache),
    )  # fmt: skip
    out = root / "out"
    done = subprocess.run(
        [sys.executable, "-m", "difftrain", "train", "--config", str(config),
         "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    return out, run_dir, done


def test_wandb_prints_nothing_on_the_console(wandb_run) -> None:
    _, _, done = wandb_run
    for stream in (done.stdout, done.stderr):
        assert not [line for line in stream.splitlines() if line.lstrip().startswith("wandb:")]
        assert "W&B" not in stream and "wandb sync" not in stream
    assert "step 4/4" in done.stderr  # the run's own lines are there


def test_wandb_history_has_the_metrics_at_their_steps(wandb_run) -> None:
    out, run_dir, _ = wandb_run
    (log,) = run_dir.glob("run-*.wandb")
    history = wandb_history(wandb_records(log))
    assert run_dir.name.endswith((out / "logs" / "wandb-run-id").read_text().strip())
    for key, expected in metrics_by_key(out).items():
        logged = [(step, row[key]) for step, row in sorted(history.items()) if key in row]
        assert logged == expected, key  # JSON both ways: the exact numbers


def test_wandb_has_the_run_config(wandb_run) -> None:
    out, run_dir, _ = wandb_run
    (log,) = run_dir.glob("run-*.wandb")
    (run,) = [r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run"]
    logged = {item.key: json.loads(item.value_json) for item in run.config.update}
    logged.pop("_wandb", None)  # wandb's own bookkeeping
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert logged == resolved
    assert run.project == "difftrain"


def test_wandb_has_each_validation_grid_as_an_image(wandb_run) -> None:
    out, run_dir, _ = wandb_run
    (log,) = run_dir.glob("run-*.wandb")
    history = wandb_history(wandb_records(log))
    grids = {step: row for step, row in history.items() if "samples._type" in row}
    assert sorted(grids) == list(GRID_STEPS)
    for step, row in grids.items():
        assert row["samples._type"] == "image-file"
        image = run_dir / "files" / row["samples.path"]
        size, data = pixels(image)
        assert (row["samples.width"], row["samples.height"]) == size
        assert (size, data) == pixels(out / "samples" / f"step-{step}.png")
