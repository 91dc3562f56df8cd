"""Checkpoints and resume: a resumed run is bit-identical to the run never interrupted."""

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

from difftrain.config import config_from_dict
from difftrain.errors import StorageFull, TrainingInterrupted, TrainingStopped, UserError
from difftrain.training import run_checkpoints
from difftrain.training import trainer as trainer_module
from difftrain.training.checkpoint import is_complete, list_checkpoints
from difftrain.training.metrics import read_metrics
from difftrain.training.trainer import train

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def config(output_dir: Path, data_dir: Path, **sections):
    raw = {
        "model": {"pretrained": "builtin:tiny"},
        "data": {"train_dir": str(data_dir), "resolution": 64, "random_flip": True},
        "train": {"output_dir": str(output_dir), "max_steps": 8, "batch_size": 2,
                  "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 2,
                  "deterministic": True},
        "checkpointing": {"every_steps": 4},
    }  # fmt: skip
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def interrupt_after(monkeypatch, step: int) -> None:
    """Send this process SIGINT right after optimizer step `step` (a real Ctrl-C)."""
    real_log_step = trainer_module.TrainingRun._log_step

    def log_step(self, *args, **kwargs):
        real_log_step(self, *args, **kwargs)
        if self.progress.step == step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(trainer_module.TrainingRun, "_log_step", log_step)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / UNET_WEIGHTS)


def losses_after(folder: Path, step: int) -> list[float]:
    return [row["loss"] for row in read_metrics(folder / "metrics.jsonl") if row["step"] > step]


@pytest.mark.parametrize(
    "train_overrides",
    [
        {},  # 8 images, batch 2: the checkpoint at step 4 ends epoch 1
        {"batch_size": 3},  # the checkpoint at step 4 falls in the middle of epoch 2
        {"gradient_accumulation_steps": 2, "batch_size": 3},
    ],
    ids=["epoch-boundary", "mid-epoch", "grad-accumulation"],
)
def test_resume_is_bit_exact(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, train_overrides, monkeypatch
) -> None:
    straight = train(config(tmp_path / "straight", dummy_data_dir, train=train_overrides))

    # The same 8-step run, interrupted (a real SIGINT) after step 4, then resumed.
    resumed_dir = tmp_path / "resumed"
    interrupt_after(monkeypatch, 4)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(resumed_dir, dummy_data_dir, train=train_overrides))
    assert stopped.value.exit_code == 130
    monkeypatch.undo()
    assert not (resumed_dir / UNET_WEIGHTS).exists()
    second = train(
        config(
            resumed_dir,
            dummy_data_dir,
            train={**train_overrides, "resume_from_checkpoint": "latest"},
        )
    )
    assert second.resumed_from == resumed_dir / "checkpoint-4"
    assert second.steps == 4  # steps 5..8, stopping exactly at max_steps

    assert second.losses == straight.losses[4:]
    assert losses_after(resumed_dir, 4) == losses_after(straight.output_dir, 4)
    assert [row["step"] for row in read_metrics(resumed_dir / "metrics.jsonl")] == list(range(1, 9))
    a, b = weights(straight.output_dir), weights(resumed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [step for step, _ in list_checkpoints(resumed_dir)] == [4, 8]  # numbering continues


def test_latest_without_a_checkpoint_starts_fresh(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, caplog
) -> None:
    caplog.set_level("INFO", logger="difftrain")
    result = train(
        config(
            tmp_path / "out",
            dummy_data_dir,
            train={"max_steps": 2, "resume_from_checkpoint": "latest"},
        )
    )
    assert result.resumed_from is None and result.steps == 2
    assert "no checkpoint in" in caplog.text and "starting fresh" in caplog.text


def test_resume_from_an_explicit_checkpoint_path(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    train(config(out, dummy_data_dir, train={"max_steps": 4}, checkpointing={"every_steps": 2}))
    result = train(
        config(
            out,
            dummy_data_dir,
            train={"max_steps": 4, "resume_from_checkpoint": str(out / "checkpoint-2")},
        )
    )
    assert result.steps == 2
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_checkpoint_without_a_complete_manifest_is_never_picked(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    train(config(out, dummy_data_dir, train={"max_steps": 4}))
    torn = out / "checkpoint-6"
    shutil.copytree(out / "checkpoint-4", torn)
    (torn / "manifest.json").unlink()
    cut = out / "checkpoint-7"
    shutil.copytree(out / "checkpoint-4", cut)
    (cut / "optimizer.pt").write_bytes(b"torn")
    assert [step for step, _ in list_checkpoints(out)] == [4]
    with pytest.raises(UserError, match=r"checkpoint-6 is not a complete checkpoint \(no manif"):
        train(config(out, dummy_data_dir, train={"resume_from_checkpoint": str(torn)}))
    result = train(config(out, dummy_data_dir, train={"resume_from_checkpoint": "latest"}))
    assert result.resumed_from == out / "checkpoint-4"
    # Corrupt checkpoints after the one resumed from are set aside, never deleted.
    assert (out / "checkpoint-6.corrupt").is_dir() and (out / "checkpoint-7.corrupt").is_dir()


def test_resume_with_a_changed_config_is_refused_unless_allowed(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    train(config(out, dummy_data_dir, train={"max_steps": 4}))
    changed = {"resume_from_checkpoint": "latest", "learning_rate": 5e-4, "seed": 3}
    with pytest.raises(
        UserError,
        match=r"differs in train.learning_rate, train.seed; .*--allow-config-change train.learning_rate,train.seed",
    ):
        train(config(out, dummy_data_dir, train=changed))
    # Output-only settings may change freely; named keys may change when allowed.
    result = train(
        config(
            out,
            dummy_data_dir,
            train=changed,
            checkpointing={"every_steps": 2},
            validation={"seed": 9},
        ),
        allow_config_change=("train.learning_rate", "train.seed"),
    )
    assert result.resumed_from == out / "checkpoint-4" and result.steps == 4
    # The allowed change takes effect: cosine after 2 warmup steps of 8 is at 0.75 of the
    # (new) peak for step 5.
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[4]["step"] == 5 and rows[4]["lr"] == pytest.approx(5e-4 * 0.75)


def test_resume_from_an_older_checkpoint_drops_the_abandoned_branch(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    train(config(out, dummy_data_dir, train={"max_steps": 6}, checkpointing={"every_steps": 2}))
    spec = str(out / "checkpoint-2")
    interrupt = {"max_steps": 6, "resume_from_checkpoint": spec}
    train(config(out, dummy_data_dir, train=interrupt, checkpointing={"every_steps": 0}))
    # checkpoint-4 and -6 came after the one resumed from: `latest` must not find them.
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_from_another_folder_does_not_touch_this_one(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    source, other = tmp_path / "source", tmp_path / "other"
    train(config(source, dummy_data_dir, train={"max_steps": 4}))
    train(config(other, dummy_data_dir, train={"max_steps": 4, "seed": 7}))
    before = (other / "metrics.jsonl").read_text()
    resume = {"max_steps": 8, "resume_from_checkpoint": str(source / "checkpoint-4")}
    with pytest.raises(UserError, match="holds a different run"):
        train(config(other, dummy_data_dir, train=resume))
    assert (other / "metrics.jsonl").read_text() == before
    # Into a new folder it continues the source run there.
    result = train(config(tmp_path / "new", dummy_data_dir, train=resume))
    assert result.steps == 4
    assert [row["step"] for row in read_metrics(tmp_path / "new" / "metrics.jsonl")] == [5, 6, 7, 8]
    assert [step for step, _ in list_checkpoints(source)] == [4]


def test_latest_skips_a_checkpoint_whose_files_do_not_match_their_hashes(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    train(config(out, dummy_data_dir, train={"max_steps": 4}, checkpointing={"every_steps": 2}))
    weights_file = out / "checkpoint-4" / UNET_WEIGHTS
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: a torn write the size cannot show
    weights_file.write_bytes(bytes(data))
    result = train(config(out, dummy_data_dir, train={"resume_from_checkpoint": "latest"}))
    assert result.resumed_from == out / "checkpoint-2"


def test_a_signal_during_the_last_step_just_finishes(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch
) -> None:
    interrupt_after(monkeypatch, 2)
    result = train(config(tmp_path / "out", dummy_data_dir, train={"max_steps": 2}))
    assert result.steps == 2 and (result.output_dir / UNET_WEIGHTS).is_file()


def test_resuming_from_a_folder_that_is_not_a_checkpoint(
    tmp_path: Path, dummy_data_dir: Path
) -> None:
    with pytest.raises(
        UserError, match="train.resume_from_checkpoint: .* is not a complete checkpoint"
    ):
        train(
            config(
                tmp_path / "out",
                dummy_data_dir,
                train={"resume_from_checkpoint": str(dummy_data_dir)},
            )
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (OSError(28, "No space left on device"), "No space left on device"),
        (
            RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed"),
            "PytorchStreamWriter failed",
        ),
    ],
    ids=["oserror", "torch-save"],
)
def test_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch, error, shown
) -> None:
    from difftrain.training import state as state_module

    real_save = state_module.save_main_state
    calls = []

    def failing_save(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            Path(folder, "half-written").write_text("x")
            raise error
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(run_checkpoints, "save_main_state", failing_save)
    out = tmp_path / "out"
    with pytest.raises(
        StorageFull,
        match=rf"could not write checkpoint .*checkpoint-4 \(.*{shown}.*\); earlier checkpoints are intact",
    ):
        train(config(out, dummy_data_dir, train={"max_steps": 6}, checkpointing={"every_steps": 2}))
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert is_complete(out / "checkpoint-2", verify_hashes=True)
    assert not list(out.glob(".checkpoint-*"))


def poison_losses(monkeypatch, steps: set[int]) -> None:
    real_loss = trainer_module.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) in steps else loss

    monkeypatch.setattr(trainer_module, "diffusion_loss", poisoned)


def test_on_nonfinite_skip_drops_the_update_and_counts_it(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch
) -> None:
    poison_losses(monkeypatch, {2})
    out = tmp_path / "out"
    result = train(config(out, dummy_data_dir, train={"max_steps": 3, "on_nonfinite": "skip"}))
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["skipped"] for row in rows] == [False, True, False]
    assert rows[1]["loss"] == "nan" and rows[2]["nonfinite_total"] == 1
    assert result.steps == 3
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_on_nonfinite_skip_stops_after_too_many_in_a_row(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch
) -> None:
    poison_losses(monkeypatch, {2, 3, 4})
    cfg = config(
        tmp_path / "out", dummy_data_dir, train={"on_nonfinite": "skip", "max_nonfinite_steps": 3}
    )
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row, the last at step 4"):
        train(cfg)


def test_on_bad_image_skip_lists_what_it_skipped(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    data = tmp_path / "data"
    shutil.copytree(dummy_data_dir, data)
    (data / "00001.png").write_bytes(b"not a png")
    whole = (data / "00002.png").read_bytes()
    (data / "00002.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    train(config(out, data, train={"max_steps": 1}, data={"on_bad_image": "skip"}))
    listed = (out / "skipped_images.txt").read_text().splitlines()
    assert [Path(line.split("\t")[0]).name for line in listed] == ["00001.png", "00002.png"]
    assert "skipped 2 unreadable images" in (out / "logs" / "train.log").read_text()
    with pytest.raises(UserError, match="cannot read image .*00001.png"):
        train(config(tmp_path / "strict", data, train={"max_steps": 1}))


def test_sigterm_checkpoints_and_exits_143(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{train_dir: {dummy_data_dir}, resolution: 64}}\n"
        "train: {max_steps: 100000, batch_size: 1, deterministic: true}\n"
        "checkpointing: {every_steps: 0}\n"
    )
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "difftrain",
        "train",
        "--config",
        str(cfg),
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "DIFFTRAIN_CACHE": str(builtin_cache)}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < 2:
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    ((step, path),) = list_checkpoints(out)
    assert f"stopped after step {step} with checkpoint {path}" in last
    assert "--resume-from-checkpoint latest" in last
    assert step == read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert json.loads((path / "manifest.json").read_text())["step"] == step


def test_a_checkpoint_config_without_newer_keys_reads_as_their_defaults() -> None:
    from difftrain.config import Config, config_to_dict
    from difftrain.training.resume import _with_defaults
    from difftrain.training.run_dir import differing_keys

    now = config_to_dict(Config())
    old = {section: dict(values) for section, values in now.items()}
    del old["data"]["buckets"], old["data"]["sources"], old["data"]["bucket_max_ratio"]
    assert differing_keys(old, now) == ["data.bucket_max_ratio", "data.buckets", "data.sources"]
    assert differing_keys(_with_defaults(old), now) == []
    old["data"]["resolution"] = 1024  # a real change still shows
    assert differing_keys(_with_defaults(old), now) == ["data.resolution"]


def test_resume_on_another_process_count_with_the_same_config_is_refused(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    from difftrain.training.resume import check_resume_config

    out = tmp_path / "out"
    train(config(out, dummy_data_dir, train={"max_steps": 4}))
    checkpoint = out / "checkpoint-4"
    same = config(out, dummy_data_dir)
    check_resume_config(checkpoint, same, num_processes=1)
    # No key differs, yet two processes would take 4 images per step instead of 2.
    with pytest.raises(UserError, match=r"1 process\(es\) x batch 2 x 1 accumulation = 2 images"):
        check_resume_config(checkpoint, same, num_processes=2)
    check_resume_config(checkpoint, same, ("train.batch_size",), num_processes=2)
    # Half the batch on each of two processes is the same run.
    check_resume_config(checkpoint, config(out, dummy_data_dir, train={"batch_size": 1}),
                        num_processes=2)  # fmt: skip
