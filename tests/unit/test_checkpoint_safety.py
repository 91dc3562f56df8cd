"""A checkpoint is input: loading one never unpickles, so a crafted one runs no code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from difftrain.cli import main
from difftrain.config import config_from_dict
from difftrain.training.checkpoint import write_manifest
from difftrain.training.trainer import train


class CreatesAFile:
    """Unpickling this runs `os.system("touch MARKER")`: what a crafted pickle can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def config(out: Path, data: Path, **train):
    return config_from_dict({
        "data": {"train_dir": str(data), "resolution": 64},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2, **train},
        "checkpointing": {"every_steps": 2},
    })  # fmt: skip


@pytest.fixture
def run_with_checkpoint(tmp_path: Path, dummy_data_dir: Path, tiny_model_dir) -> Path:
    out = tmp_path / "out"
    train(config(out, dummy_data_dir))
    return out


def resume_cli(out: Path, data: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"data: {{train_dir: '{data}', resolution: 64}}\n"
        "train: {max_steps: 3, batch_size: 2}\ncheckpointing: {every_steps: 2}\n"
    )
    code = main(["train", "--config", str(path), "--output-dir", str(out),
                 "--resume-from-checkpoint", "latest"])  # fmt: skip
    return code, capsys.readouterr().err


def test_the_crafted_pickle_really_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesAFile(marker)))
    assert marker.exists()  # so its absence below means the file was never unpickled


def test_pickles_beside_the_state_are_never_opened(
    run_with_checkpoint: Path, dummy_data_dir: Path, tmp_path: Path, capsys
) -> None:
    checkpoint = run_with_checkpoint / "checkpoint-2"
    marker = tmp_path / "pwned"
    # What accelerate's load_state would unpickle, with a manifest recomputed to match.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(CreatesAFile(marker)))
    write_manifest(checkpoint, 2)
    code, err = resume_cli(run_with_checkpoint, dummy_data_dir, tmp_path, capsys)
    assert code == 0, err
    assert not marker.exists()


def test_a_crafted_optimizer_state_is_refused(
    run_with_checkpoint: Path, dummy_data_dir: Path, tmp_path: Path, capsys
) -> None:
    checkpoint = run_with_checkpoint / "checkpoint-2"
    marker = tmp_path / "pwned"
    torch.save({"state": CreatesAFile(marker)}, checkpoint / "optimizer.pt")
    write_manifest(checkpoint, 2)
    code, err = resume_cli(run_with_checkpoint, dummy_data_dir, tmp_path, capsys)
    assert code == 2
    (line,) = err.strip().splitlines()[-1:]
    assert "optimizer.pt: not an optimizer state this difftrain wrote" in line
    assert "Traceback" not in err
    assert not marker.exists()


def test_a_checkpoint_of_the_pickled_format_is_refused(
    run_with_checkpoint: Path, dummy_data_dir: Path, tmp_path: Path, capsys
) -> None:
    checkpoint = run_with_checkpoint / "checkpoint-2"
    (checkpoint / "training_state.json").unlink()
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(CreatesAFile(tmp_path / "x")))
    write_manifest(checkpoint, 2)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["format_version"]  # as difftrain 0.1 wrote it
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    code, err = resume_cli(run_with_checkpoint, dummy_data_dir, tmp_path, capsys)
    assert code == 2
    assert "checkpoint-2: format 1, and this difftrain resumes format 2 only" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()
