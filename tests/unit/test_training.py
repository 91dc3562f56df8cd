"""Training end to end on the built-in tiny model: artifacts, determinism, failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from difftrain.config import config_from_dict
from difftrain.errors import TrainingStopped, UserError
from difftrain.training import objective as objective_module
from difftrain.training import trainer as trainer_module
from difftrain.training.checkpoint import is_complete, list_checkpoints
from difftrain.training.metrics import read_metrics
from difftrain.training.trainer import train

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def make_config(output_dir: Path, data_dir: Path, **sections):
    raw = {
        "model": {"pretrained": "builtin:tiny"},
        "data": {"train_dir": str(data_dir), "resolution": 64, "random_flip": True},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "deterministic": True,
        },
        "checkpointing": {"every_steps": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / UNET_WEIGHTS)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, dummy_data_dir: Path, tiny_model_dir: Path):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    cfg = make_config(
        output_dir,
        dummy_data_dir,
        validation={"prompts": ["a red circle"], "num_inference_steps": 2},
    )
    return train(cfg), cfg


def test_two_steps_write_every_artifact(two_step_run) -> None:
    result, cfg = two_step_run
    out = result.output_dir
    for name in (
        "model_index.json",
        UNET_WEIGHTS,
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "logs/train.log",
        "samples/step-2.png",
    ):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 2
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["determinism"]["deterministic_algorithms"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(set(row) >= {"step", "loss", "lr"} for row in rows)
    assert [row["loss"] for row in rows] == result.losses
    assert "step 2/2 loss" in (out / "logs" / "train.log").read_text()


def test_training_changes_the_unet_and_only_the_unet(two_step_run, tiny_model_dir: Path) -> None:
    result, _ = two_step_run
    before, after = unet_weights(tiny_model_dir), unet_weights(result.output_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(after[k].dtype == torch.float32 and torch.isfinite(after[k]).all() for k in after)
    vae = "vae/diffusion_pytorch_model.safetensors"
    frozen_before, frozen_after = (
        load_file(tiny_model_dir / vae),
        load_file(result.output_dir / vae),
    )
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)


def test_trained_pipeline_loads_in_diffusers_and_generates(two_step_run) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(two_step_run[0].output_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_checkpoint_is_complete_and_its_unet_loads_alone(two_step_run) -> None:
    from diffusers import UNet2DConditionModel

    result, _ = two_step_run
    ((step, path),) = list_checkpoints(result.output_dir)
    assert step == 2 and path.name == "checkpoint-2"
    assert is_complete(path, verify_hashes=True)
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"config.yaml", "optimizer.pt", UNET_WEIGHTS} <= set(manifest["files"])
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    final = unet_weights(result.output_dir)
    assert all(torch.equal(v, final[k]) for k, v in unet.state_dict().items())


def test_validation_grid_is_a_png(two_step_run) -> None:
    from PIL import Image

    with Image.open(two_step_run[0].output_dir / "samples" / "step-2.png") as grid:
        assert grid.format == "PNG" and grid.size[0] == 64


def test_two_deterministic_runs_are_bit_identical(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    runs = [train(make_config(tmp_path / name, dummy_data_dir)) for name in ("a", "b")]
    assert runs[0].losses == runs[1].losses
    a, b = (unet_weights(r.output_dir) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [(r.output_dir / "metrics.jsonl").read_text().splitlines() for r in runs]
    assert [json.loads(x)["loss"] for x in lines[0]] == [json.loads(x)["loss"] for x in lines[1]]


def test_different_seed_gives_a_different_run(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    a = train(make_config(tmp_path / "a", dummy_data_dir))
    b = train(make_config(tmp_path / "b", dummy_data_dir, train={"seed": 1}))
    assert a.losses != b.losses


def test_gradient_accumulation_and_schedule(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    cfg = make_config(
        tmp_path / "out",
        dummy_data_dir,
        train={
            "gradient_accumulation_steps": 2,
            "max_steps": 3,
            "lr_scheduler": "linear",
            "lr_warmup_steps": 1,
        },
    )
    result = train(cfg)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    assert len(rows) == 3
    # Each optimizer step consumed 2 batches of 2 images out of 8.
    assert [row["epoch"] for row in rows] == [0.5, 1.0, 1.5]
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)
    assert rows[2]["lr"] < rows[1]["lr"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_two_accumulated_batches_of_2_equal_one_batch_of_4(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, lora: bool
) -> None:
    # Every sample draws its noise, timestep (and LoRA dropout masks) by its stream position,
    # so the same 4 samples give the same update however they are split into micro-batches.
    runs = {}
    for batch, accumulation in [(4, 1), (2, 2)]:
        cfg = make_config(
            tmp_path / f"b{batch}",
            dummy_data_dir,
            train={"batch_size": batch, "gradient_accumulation_steps": accumulation,
                   "max_steps": 2, "deterministic": True},
            **({"lora": {"enabled": True, "dropout": 0.3, "rank": 4}} if lora else {}),
        )  # fmt: skip
        result = train(cfg)
        weights = LORA_WEIGHTS if lora else UNET_WEIGHTS
        runs[batch] = (result.losses, load_file(result.output_dir / weights))
    (losses4, weights4), (losses2, weights2) = runs[4], runs[2]
    assert losses2 == pytest.approx(losses4, rel=1e-5)
    # Adam divides by the gradients' size, so float noise in tiny gradients shows up to ~1e-6;
    # a step moves weights by ~lr = 1e-3, and a different split of the draws by as much.
    for name, value in weights4.items():
        torch.testing.assert_close(weights2[name], value, rtol=0, atol=2e-5)
    if not lora:  # (LoRA's B matrices start at zero, so any move shows the run trained)
        base = load_file(tiny_model_dir / UNET_WEIGHTS)
        moves = [(value - base[name]).abs().max().item() for name, value in weights4.items()]
        assert max(moves) > 5e-4  # the runs trained: equal weights are not just the base ones


def test_bf16_runs_on_the_cpu(tmp_path: Path, dummy_data_dir: Path, tiny_model_dir) -> None:
    result = train(make_config(tmp_path / "out", dummy_data_dir, train={"mixed_precision": "bf16"}))
    weights = unet_weights(result.output_dir)
    assert all(v.dtype == torch.float32 for v in weights.values())  # fp32 master weights
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)


def test_fp16_on_the_cpu_is_a_clear_error(tmp_path: Path, dummy_data_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed where CUDA is available")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train(make_config(tmp_path / "out", dummy_data_dir, train={"mixed_precision": "fp16"}))
    assert not (tmp_path / "out").exists()


def test_v_prediction_model_trains_on_velocity(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    import shutil

    model = tmp_path / "vpred"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}))
    seen = []
    original = objective_module.training_target
    monkeypatch.setattr(
        objective_module,
        "training_target",
        lambda kind, *a: seen.append(kind) or original(kind, *a),
    )
    train(make_config(tmp_path / "out", dummy_data_dir, model={"pretrained": str(model)}))
    assert seen and set(seen) == {"v_prediction"}


def test_non_finite_loss_stops_before_any_weights_are_saved(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch
) -> None:
    real_loss = trainer_module.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(trainer_module, "diffusion_loss", poisoned)
    cfg = make_config(
        tmp_path / "out", dummy_data_dir, train={"max_steps": 4}, checkpointing={"every_steps": 1}
    )
    with pytest.raises(TrainingStopped, match="non-finite loss .* at step 2"):
        train(cfg)
    out = tmp_path / "out"
    assert not (out / UNET_WEIGHTS).exists()
    assert [step for step, _ in list_checkpoints(out)] == [1]  # the last good state survives
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1]


def test_output_dir_with_a_different_run_is_refused(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    train(make_config(out, dummy_data_dir))
    before = unet_weights(out)
    with pytest.raises(
        UserError, match=r"holds a different run \(differs in train.seed\); pass --overwrite"
    ):
        train(make_config(out, dummy_data_dir, train={"seed": 5}))
    with pytest.raises(UserError, match="already holds a trained run"):
        train(make_config(out, dummy_data_dir))
    after = unet_weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    result = train(make_config(out, dummy_data_dir, train={"seed": 5}), overwrite=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 5
    assert len(read_metrics(out / "metrics.jsonl")) == result.steps


def test_checkpoint_total_limit_keeps_the_newest(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    cfg = make_config(
        tmp_path / "out",
        dummy_data_dir,
        train={"max_steps": 4},
        checkpointing={"every_steps": 1, "total_limit": 2},
    )
    train(cfg)
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [3, 4]
    assert not list((tmp_path / "out").glob(".checkpoint-*"))


def test_lora_dropout_survives_gradient_checkpointing(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    # The recomputed forward inside backward must draw the same per-sample masks.
    runs = []
    for checkpointing in (False, True):
        cfg = make_config(
            tmp_path / f"gc{checkpointing}",
            dummy_data_dir,
            train={"gradient_checkpointing": checkpointing, "max_steps": 2},
            lora={"enabled": True, "dropout": 0.3, "rank": 4},
        )
        result = train(cfg)
        runs.append((result.losses, load_file(result.output_dir / LORA_WEIGHTS)))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=0, atol=2e-5)
