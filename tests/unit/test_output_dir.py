"""The output folder: difftrain deletes only what it wrote, in a run folder it holds locked;
the final outputs are complete whenever the process stops."""

from __future__ import annotations

import errno
import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difftrain.cli import main
from difftrain.config import config_from_dict
from difftrain.errors import UserError
from difftrain.training import outputs as outputs_module
from difftrain.training.checkpoint import is_complete
from difftrain.training.output_lock import OutputLock
from difftrain.training.trainer import train

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def config(out: Path, data: Path, **train_options):
    return config_from_dict({
        "data": {"train_dir": str(data), "resolution": 64},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2, **train_options},
        "checkpointing": {"every_steps": 2},
    })  # fmt: skip


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_overwrite_in_a_folder_that_is_no_run_deletes_and_replaces_nothing(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "mine"
    for name in ("photos/holiday.png", "notes/checkpoint-1.txt", ".cache.old", ".x.tmp", "keep"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    before = hashes(out)
    train(config(out, dummy_data_dir, max_steps=1), overwrite=True)
    train(config(out, dummy_data_dir, max_steps=1, seed=3), overwrite=True)  # now a run folder
    after = hashes(out)
    assert {name: after.get(name) for name in before} == before
    assert (out / UNET_WEIGHTS).is_file()


@pytest.mark.parametrize("taken", ["unet/mine.bin", "README.md", "config.yaml", "samples/a.png"])
def test_overwrite_never_replaces_a_name_difftrain_writes_in_a_folder_that_is_no_run(
    tmp_path: Path, dummy_data_dir: Path, taken: str
) -> None:
    out = tmp_path / "mine"
    (out / taken).parent.mkdir(parents=True, exist_ok=True)
    (out / taken).write_text("mine")
    with pytest.raises(UserError, match="holds no difftrain run but has .*which a run writes"):
        train(config(out, dummy_data_dir, max_steps=1), overwrite=True)
    assert (out / taken).read_text() == "mine"


def test_nothing_is_deleted_or_written_through_a_link(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "run"
    train(config(out, dummy_data_dir, max_steps=1))
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    (elsewhere / "step-1.png").write_text("a photo")
    shutil.rmtree(out / "samples", ignore_errors=True)
    (out / "samples").symlink_to(elsewhere)
    with pytest.raises(UserError, match="samples is a symbolic link"):
        train(config(out, dummy_data_dir, max_steps=1), overwrite=True)
    assert (elsewhere / "step-1.png").read_text() == "a photo"
    (out / "samples").unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".difftrain.lock").unlink()
    (out / ".difftrain.lock").symlink_to(victim)
    with pytest.raises(UserError, match=r"\.difftrain\.lock is a symbolic link"):
        train(config(out, dummy_data_dir, max_steps=1), overwrite=True)
    assert victim.read_text() == "precious"


def test_overwrite_in_a_run_folder_deletes_only_what_difftrain_wrote(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "run"
    train(config(out, dummy_data_dir))
    (out / "notes.txt").write_text("my notes")
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / "favourite.png").write_text("not a grid")
    (out / "checkpoint-2" / "extra.txt").write_text("x")  # difftrain's folder: it goes
    train(config(out, dummy_data_dir, max_steps=1, seed=5), overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "samples" / "favourite.png").read_text() == "not a grid"
    assert not (out / "checkpoint-2").exists()


def test_a_killed_holder_leaves_no_lock_behind(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from difftrain.training.output_lock import OutputLock\n"
         f"held = OutputLock(Path({str(out)!r})).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"is in use by process {holder.pid} "):
            train(config(out, dummy_data_dir, max_steps=1))
    finally:
        holder.kill()
        holder.wait()
    train(config(out, dummy_data_dir, max_steps=1))  # the OS dropped the dead process's lock
    with OutputLock(out):  # ...and the run released its own at the end
        pass


def test_a_full_disk_during_the_final_save_is_one_line_and_keeps_the_checkpoint(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch, capsys
) -> None:
    def full_disk(staging, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs_module, "publish_pipeline", full_disk)
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{train_dir: '{dummy_data_dir}', resolution: 64}}\n"
                    "train: {max_steps: 2, batch_size: 2}\ncheckpointing: {every_steps: 2}\n")  # fmt: skip
    code = main(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == (
        f"difftrain: error: could not write the trained model to {tmp_path / 'out'} (No space "
        "left on device); checkpoint-2 is intact, continue from it with "
        "--resume-from-checkpoint latest once you free space or fix permissions"
    )
    assert is_complete(tmp_path / "out" / "checkpoint-2", verify_hashes=True)
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_a_signal_during_the_final_save_waits_for_complete_outputs(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch
) -> None:
    real_publish = outputs_module.publish_pipeline

    def interrupted_publish(staging, output_dir):
        signal.raise_signal(signal.SIGINT)  # a Ctrl-C in the middle of the final save
        time.sleep(0.05)
        real_publish(staging, output_dir)

    monkeypatch.setattr(outputs_module, "publish_pipeline", interrupted_publish)
    result = train(config(tmp_path / "out", dummy_data_dir))
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(result.output_dir)  # complete, loadable
    assert (result.output_dir / "README.md").is_file()


def test_publish_writes_model_index_last(tmp_path: Path, monkeypatch) -> None:
    staging, out = tmp_path / "staging", tmp_path / "out"
    for name in ("unet/w", "vae/w", "model_index.json"):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(name)
    out.mkdir()
    (out / "model_index.json").write_text("old")
    moves = []
    real_replace = outputs_module.replace_path

    def spy(source, target):
        moves.append((target.name, (out / "model_index.json").exists()))
        real_replace(source, target)

    monkeypatch.setattr(outputs_module, "replace_path", spy)
    outputs_module.publish_pipeline(staging, out)
    # No model_index.json while the components move in; the new one comes last.
    assert moves == [("unet", False), ("vae", False)]
    assert (out / "model_index.json").read_text() == "model_index.json"


def test_stop_signals_stay_caught_until_the_run_returns() -> None:
    from difftrain.training.signals import stop_signals

    before = signal.getsignal(signal.SIGINT)
    with stop_signals() as received:
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before
